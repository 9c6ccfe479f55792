"""The decoding forward: a chunk of tokens against a stacked KV cache kept in a loop carry.

`model.forward_cached` threads the cache through `nn.scan` as an input and an output, so every
call allocates and copies both `[layers, N, S, K, H]` buffers, and its queries attend over all S
keys. This module is the decoder's forward instead (same parameters, same math):

  * the cache is read, never rebuilt, inside the layer scan: each layer slices the keys it needs
    from the stacked buffers (a closed-over constant of the scan), and the scan returns only the
    chunk's own new K/V, `[layers, N, C, K, H]`. `write` then puts them into the carried buffers
    with one dynamic-update-slice per row, which XLA performs in place on a `while_loop` carry
    (or on a donated argument);
  * a query sees the cached keys of the *prefix* `j < start[r]` plus the chunk's fresh keys
    under `chunk_mask`; the prefix is read only up to a static bucket of `prefix_buckets`
    (in blocks, spaced by `buckets`' growth: doubling by default, a step closer to 1 reads closer
    to the prefix for more compiled branches), chosen at run time by `lax.switch` from the longest
    prefix in the batch, so a step early in a long canvas reads a short prefix. Only the attention is in the switch, the
    projections and the MoE are not, so the buckets cost little compile time.

Nothing at or after `start[r]` is read from the cache, so a chunk's stale or garbage entries
there (an unfinished block, a prefill's padding) never matter. Rows with `participate=False`
leave their cache rows untouched.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from llada_jax import model
from llada_jax.model.config import ModelConfig
from llada_jax.kernels.attention import _NEG
from llada_jax.parallel.sharding import constrain

_GROUPS = (("dense", False), ("moe", True))


def init_cache(config: ModelConfig, batch: int, length: int, dtype=None):
    """{"dense"|"moe": {"k", "v": [layers, N, S, K, H]}}, zeros (the layout of `model.init_cache`)."""
    return model.init_cache(config, batch, length, dtype)


def buckets(num_blocks: int, *, growth: float = 2.0, max_buckets: int = 64) -> tuple[int, ...]:
    """Prefix lengths in blocks, 0 .. num_blocks, each at most `growth` times the one before and at
    least one block more: growth 2.0 gives (0, 1, 2, 4, 8, ...), 1.25 gives (0, 1, ..., 8, 10, 12,
    15, 18, ...), 1.0 every block. A read bounded by the next bucket wastes < `growth`x; each bucket
    is one more attention branch to compile, so where `growth` would give more than `max_buckets`
    the spacing widens (growth raised in steps of 5%) until it fits. Any spacing gives the same
    result: keys past a row's prefix are masked."""
    from llada_jax.decode.options import fail

    if isinstance(growth, bool) or not isinstance(growth, (int, float)) or not growth >= 1.0:
        fail("prefix_growth", "a number >= 1.0 (1.0: a bucket per block)", growth)
    if isinstance(max_buckets, bool) or not isinstance(max_buckets, int) or max_buckets < 3:
        fail("prefix_max_buckets", "an integer >= 3 (0, 1 and the whole canvas at least)", max_buckets)

    def spaced(g):
        out, b = [0], 1
        while b < num_blocks:
            out.append(b)
            b = max(b + 1, int(b * g))
        out.append(num_blocks)
        return tuple(sorted(set(out)))

    out = spaced(growth)
    while len(out) > max_buckets:
        growth = max(growth * 1.05, 1.05)
        out = spaced(growth)
    return out


def bucket_index(prefix_buckets: Sequence[int], needed_blocks: Int[Array, ""]) -> Int[Array, ""]:
    """Index of the smallest bucket >= needed_blocks (the last one if none is)."""
    idx = jnp.searchsorted(jnp.asarray(prefix_buckets, jnp.int32), needed_blocks.astype(jnp.int32))
    return jnp.minimum(idx, len(prefix_buckets) - 1)


def _norm(config, p, x):
    dt, pdt = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    return model.RMSNorm(config.rms_norm_eps, dt, pdt).apply({"params": p}, x)


def _attention(config, p, x, positions, start, chunk_mask, cache_k, cache_v, layer, bucket, prefix_buckets,
               block_length, prefix_limit=None, hidden=None):
    """One layer's attention; returns (output [N, C, D], chunk K [N, C, K, H], chunk V)."""
    c = config
    dt = jnp.dtype(c.dtype)
    n_heads, k_heads, h = c.num_heads, c.num_kv_heads, c.head_dim
    q = jnp.einsum("btd,dnh->btnh", x, p["q_proj"].astype(dt))  # [N, C, Nh, H]
    k = jnp.einsum("btd,dkh->btkh", x, p["k_proj"].astype(dt))  # [N, C, K, H]
    v = jnp.einsum("btd,dkh->btkh", x, p["v_proj"].astype(dt))
    q = model.rope(_norm(c, p["q_norm"], q), positions, c.rotary_dim, c.rope_theta)
    k = model.rope(_norm(c, p["k_norm"], k), positions, c.rotary_dim, c.rope_theta)
    q = constrain(q, ("act_batch", "act_length", "act_heads", None))
    k = constrain(k, ("act_batch", "act_length", "act_kv_heads", None))
    v = constrain(v, ("act_batch", "act_length", "act_kv_heads", None))
    n, t = q.shape[:2]
    qg = q.reshape(n, t, k_heads, n_heads // k_heads, h)  # [N, C, K, G, H]
    scale = jnp.sqrt(jnp.float32(h))
    s_chunk = jnp.einsum("btkgh,bskh->bkgts", qg, k).astype(jnp.float32) / scale  # [N, K, G, C, C]
    s_chunk = jnp.where(chunk_mask[:, None, None], s_chunk, _NEG)

    def with_prefix(kb):
        def attend(_):
            if kb == 0:
                probs = jax.nn.softmax(s_chunk, axis=-1).astype(dt)
                return jnp.einsum("bkgts,bskh->btkgh", probs, v)
            size = kb * block_length
            kp = jax.lax.dynamic_slice(cache_k, (layer, 0, 0, 0, 0), (1, n, size, k_heads, h))[0].astype(dt)
            vp = jax.lax.dynamic_slice(cache_v, (layer, 0, 0, 0, 0), (1, n, size, k_heads, h))[0].astype(dt)
            s_pre = jnp.einsum("btkgh,bskh->bkgts", qg, kp).astype(jnp.float32) / scale  # [N, K, G, C, kb*B]
            keys = jnp.arange(size, dtype=jnp.int32)
            if prefix_limit is None:
                visible = (keys[None, :] < start[:, None])[:, None, :]  # [N, 1, kb*B]
            else:  # per query: keys before its own limit
                visible = keys[None, None, :] < prefix_limit[:, :, None]  # [N, C, kb*B]
            if hidden is not None:  # cached entries whose fresh K/V are in the chunk
                visible = visible & ~hidden[:, None, :size]
            s_pre = jnp.where(visible[:, None, None], s_pre, _NEG)
            probs = jax.nn.softmax(jnp.concatenate([s_pre, s_chunk], axis=-1), axis=-1).astype(dt)
            return (jnp.einsum("bkgts,bskh->btkgh", probs[..., :size], vp)
                    + jnp.einsum("bkgts,bskh->btkgh", probs[..., size:], v))
        return attend

    branches = [with_prefix(kb) for kb in prefix_buckets]
    out = branches[0](None) if len(branches) == 1 else jax.lax.switch(bucket, branches, None)
    out = constrain(out.reshape(n, t, n_heads, h), ("act_batch", "act_length", "act_heads", None))
    return jnp.einsum("btnh,nhd->btd", out, p["o_proj"].astype(dt)), k, v


def forward_chunk(params, config: ModelConfig, tokens: Int[Array, "N C"], positions: Int[Array, "N C"],
                  start: Int[Array, "N"], chunk_mask: Bool[Array, "N C C"], cache, bucket: Int[Array, ""],
                  *, prefix_buckets: Sequence[int], block_length: int, prefix_limit=None, hidden=None):
    """Logits of a chunk and its new K/V, reading the cached prefix `j < start[r]`.

    chunk_mask [N|1, C, C]: which chunk keys each chunk query sees. `bucket` indexes
    `prefix_buckets` (blocks of the cache read; it must cover max(start) over the rows whose
    output is used). Returns (logits [N, C, V] fp32, {"dense"|"moe": {"k", "v": [layers, N, C, K, H]}}).
    A chunk gathered from several places of the canvas (a Multi-Block Editing window) passes
    `prefix_limit` [N, C] (query i reads cached keys j < prefix_limit[r, i] instead of j < start[r])
    and `hidden` [N, S] (cached entries no query reads: the blocks whose fresh K/V the chunk holds).
    """
    c = config
    dt = jnp.dtype(c.dtype)
    x = jnp.take(params["embed"], tokens, axis=0).astype(dt)  # [N, C, D]
    new_kv = {}
    for group, moe in _GROUPS:
        if group not in cache:
            continue
        layers = params[f"{group}_layers"]
        cache_k, cache_v = cache[group]["k"], cache[group]["v"]
        num = cache_k.shape[0]

        def body(x, scanned, moe=moe, cache_k=cache_k, cache_v=cache_v):
            p, layer = scanned
            x = constrain(x, ("act_batch", "act_length", "act_embed"))
            h, k, v = _attention(c, p["attn"], _norm(c, p["input_norm"], x), positions, start, chunk_mask,
                                 cache_k, cache_v, layer, bucket, prefix_buckets, block_length, prefix_limit, hidden)
            x = x + h
            hn = _norm(c, p["post_attn_norm"], x)
            if moe:
                x = x + model.MoE(c).apply({"params": p["moe"]}, hn)
            else:
                x = x + model.MLP(c, c.intermediate_size).apply({"params": p["mlp"]}, hn)
            return x, {"k": k.astype(cache_k.dtype), "v": v.astype(cache_v.dtype)}

        x, new_kv[group] = jax.lax.scan(body, x, (layers, jnp.arange(num, dtype=jnp.int32)))
    x = _norm(c, params["final_norm"], x)
    logits = jnp.einsum("btd,dv->btv", x, params["lm_head"].astype(dt)).astype(jnp.float32)
    return constrain(logits, ("act_batch", "act_length", "act_vocab")), new_kv


def write(cache, new_kv, start: Int[Array, "N"], participate: Bool[Array, "N"], positions=None):
    """The chunk K/V written into the cache at each row's `start` (rows not taking part keep theirs).

    `positions` [N, C] (optional) restricts the write to those chunk positions; the others keep
    their cached K/V bit for bit. One dynamic-update-slice per row: on a loop carry or a donated
    buffer XLA does it in place."""
    def put(buf, upd):  # buf [layers, N, S, K, H], upd [layers, N, C, K, H]
        size = upd.shape[2]
        rows = jnp.arange(buf.shape[1])

        def one(buf, r):
            old = jax.lax.dynamic_slice_in_dim(buf[:, r], start[r], size, axis=1)
            keep = participate[r] if positions is None else participate[r] & positions[r][None, :, None, None]
            new = jnp.where(keep, upd[:, r], old)
            return jax.lax.dynamic_update_slice(buf, new[:, None], (0, r, start[r], 0, 0)), None

        buf, _ = jax.lax.scan(one, buf, rows)
        return buf

    return jax.tree.map(put, cache, new_kv)


def prefill(params, config: ModelConfig, tokens: Int[Array, "N L"], num_blocks: Int[Array, "N"], cache,
            *, block_length: int, chunk_blocks: int, prefix_buckets: Sequence[int], skip_blocks=0):
    """Block-causal K/V of each row's first `num_blocks[r]` blocks of `tokens`, written at 0.

    Chunked: a `while_loop` of forwards over `chunk_blocks` blocks each, every chunk reading the
    prefix cached by the ones before (bounded by `prefix_buckets`), so one compiled forward
    serves every prompt length and the work follows the longest prompt. The last chunk is moved
    back to end at the canvas' end where it would pass it (it recomputes blocks that are already
    cached, identically). Positions past a row's own prompt blocks get K/V too, which is
    harmless: they lie at or after the row's first decoding chunk and are overwritten before
    being read.

    `skip_blocks` (an int or a traced scalar): the first blocks of every row already hold their
    K/V (a prefix-cache hit, `llada_jax.decode.prefix_cache`); the chunks start after them.
    """
    n, length = tokens.shape
    b = block_length
    size = min(chunk_blocks, length // b) * b
    blk = jnp.arange(size, dtype=jnp.int32) // b
    mask = (blk[None, :] <= blk[:, None])[None]  # [1, T, T]
    needed = num_blocks * b  # [N] tokens to cache per row

    def body(carry):
        done, cache = carry
        start = jnp.minimum(done, length - size)
        starts = jnp.full((n,), start, jnp.int32)
        positions = start + jnp.arange(size, dtype=jnp.int32)
        tok = jax.lax.dynamic_slice_in_dim(tokens, start, size, axis=1)
        _, kv = forward_chunk(params, config, tok, jnp.broadcast_to(positions, (n, size)), starts, mask, cache,
                              bucket_index(prefix_buckets, start // b), prefix_buckets=prefix_buckets,
                              block_length=b)
        return start + size, write(cache, kv, starts, needed > start)

    first = jnp.asarray(skip_blocks, jnp.int32) * b
    _, cache = jax.lax.while_loop(lambda carry: carry[0] < needed.max(), body, (first, cache))
    return cache
