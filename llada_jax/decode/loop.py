"""Draft-and-Edit decoding for LLaDA2.1 block diffusion (REFERENCE §5).

Blocks of `block_length` tokens are decoded left to right. Inside a block every step runs
the model once, fills masked positions whose confidence passes `threshold` (M2T, with an
at-least-one fallback) and rewrites already-filled, non-prompt positions of the block whose
argmax differs from the current token with confidence above `editing_threshold` (T2T).
`decode` is the jitted core (`llada_jax.decode.generation.generate` is the host entry point), one `jax.lax.while_loop` with no host round trip.

How the loop is organised. Every iteration is exactly one model forward for the whole batch;
each row carries its own block index and *phase*, so rows with different prompt lengths,
numbers of steps per block or stopping blocks share the loop:

  DENOISE  a denoising step on the row's current block (the reference's forward);
  COMMIT   re-run the finished block to write its clean K/V (cached path only, and only when
           the last denoising forward did not already see the final tokens);
  PROPOSE  Multi-Block Editing: one edit forward over a window of `mbe_window` blocks (the new
           one and history blocks chosen by `mbe_select`), at most `mbe_max_steps` per block;
  REWRITE  block-causal K/V of `mbe_window` contiguous blocks from the first one an edit changed
           (after the window, or before another edit step when the window misses a block
           after the changed one);
  DONE     the row is finished and never changes again.

DENOISE and COMMIT feed a block of B tokens, PROPOSE and REWRITE a chunk of `mbe_window*B`
tokens; with MBE on, an iteration runs whichever of the two shapes some row needs (the window
first) and rows that need the other one sit that forward out. Per-row statistics count only
the forwards a row took part in, so a row's numbers are the ones it would get alone.

KV cache. The cache covers the whole canvas and lives in the loop carry, updated in place
(`llada_jax.decode.kvcache`: the layer scan returns only the chunk's new K/V, written with one
dynamic-update-slice per row). The prompt's full blocks are written once by a block-causal,
chunked prefill; a forward reads the cached keys of its prefix (`j <` the chunk's start) only up
to a length bucket, plus the chunk's own fresh keys, so stale entries at or after the current
block are never read; a finished block's clean K/V come either from its last denoising forward
(when that step changed nothing, as at the normal end of an LLaDA2.1 block) or from a COMMIT
forward. `use_cache=False` keeps the reference's algorithm: every step recomputes the whole
canvas under the block-causal mask (logits of block b do not depend on later blocks, so this
equals running the window x[:(b+1)B]); it is the oracle for the cached path.

Multi-Block Editing ("Beyond Block Boundaries" as REFERENCE §5 describes it; `_window_op`). The
window's blocks are gathered into one chunk that reads the cached K/V of every other block before
the new one; inside it they attend as `mbe_attention` says: "bidirectional" (default), every
block of the window sees every other one, so an earlier block is revised in light of the newer
ones; "block_causal", each sees itself and earlier ones only, which is what its last denoising
step saw, so it rarely edits. Edit forwards write no cache; when the window closes, K/V are
rewritten block-causally from the first changed block (or the new block, if stale) up to the new
one, and blocks before that keep theirs bit for bit. The uncached oracle runs the same chunk
against a full block-causal recompute of the canvas (a duplicated input: the canvas, then the
chunk), which is what the cache holds.

Shapes and compiles. `generate` pads the canvas to a power of two of blocks and the prefill is
a loop of fixed-size chunks, so varied prompt lengths share a few compiled programs; per-row
knobs (`Knobs` fields may be scalars or [N]) and `step` as a public pure function let
`llada_jax.decode.engine` drive the same loop with continuous batching.

Deviations from the reference, all in degenerate cases: the mask token is never proposed (the
reference would loop forever on a position that keeps predicting it), greedy decoding ignores
`top_k`/`top_p` (as the official code does), and with `llada20` a block's step budget is
unbounded (the reference uses `steps=block_length`, which the one-token fallback never
exceeds).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from llada_jax import model
from llada_jax.decode import kvcache
from llada_jax.decode.options import DecodeSettings, Knobs
from llada_jax.model import masks
from llada_jax.model.config import ModelConfig

DENOISE, COMMIT, PROPOSE, REWRITE, DONE = range(5)

@flax.struct.dataclass
class DecodeState:
    """The while-loop carry; per-row counters count only forwards the row took part in."""

    canvas: Int[Array, "N L"]
    block: Int[Array, "N"]  # block being decoded (or just finished, in COMMIT/PROPOSE/REWRITE)
    phase: Int[Array, "N"]
    post_steps: Int[Array, "N"]  # the reference's post_steps for the current block
    steps: Int[Array, "N"]  # denoising forwards (the reference's forward count)
    cache_writes: Int[Array, "N"]  # prefill, COMMIT and REWRITE forwards
    mbe_forwards: Int[Array, "N"]  # PROPOSE forwards
    commit_step: Int[Array, "N L"]  # denoising step that last wrote each position, -1 if none
    # log p(token) of each position's last write under the model's distribution at that forward
    # (softmax of the raw logits: before penalty, temperature and top-k/top-p), 0.0 if never written
    logprob: Float[Array, "N L"]
    stale: Bool[Array, "N"]  # the finished block's cached K/V are not clean (read in PROPOSE)
    cache: Any  # KV cache {"dense"|"moe": {"k", "v": [layers, N, L, K, H]}}, or None uncached
    # With `settings.record_writes = W`: every write of every position, in order. write_step
    # [N, L, W] is the row's denoising-step index of the write (-1 for an empty slot), write_token
    # the token written, write_count [N, L] the number of writes (it may exceed W only if the
    # bound were wrong; `summarize` checks). None when not recorded.
    write_step: Any = None
    write_token: Any = None
    write_count: Any = None
    # Multi-Block Editing (`mbe_fields`; None without a window): the open window's blocks [N, W]
    # (the new block last) and which of them are real, the edit forwards it has run, the first
    # block an edit changed since the cache was last made clean (num_blocks = none), the next
    # block a REWRITE writes, and whether a REWRITE returns to the window (more edit steps).
    window: Any = None
    window_ok: Any = None
    mbe_steps: Any = None
    dirty_from: Any = None
    cursor: Any = None
    resume: Any = None

    @property
    def forwards(self) -> Int[Array, "N"]:
        return self.steps + self.cache_writes + self.mbe_forwards


# --------------------------------------------------------------------------- token choice
def _col(x, ndim: int):
    """A scalar or per-row [N] knob shaped to broadcast against an [N, ...] array of `ndim` dims."""
    return jnp.reshape(x, (-1,) + (1,) * (ndim - 1))


def choose_tokens(logits: Float[Array, "N C V"], prev: Int[Array, "N C"], keys, knobs: Knobs,
                  settings: DecodeSettings) -> tuple[Int[Array, "N C"], Float[Array, "N C"]]:
    """Proposed token and its confidence at each position (the reference's `x0, x0_p`).

    `prev` is the current token of the previous position (-1 for none): `penalty_lambda` is
    subtracted from its logit (anti-stutter). Greedy: argmax and its softmax probability.
    Sampled: temperature, then top-k, then top-p filtering; a draw from the filtered
    distribution and its probability there. The mask id is never proposed. With sampling
    compiled in (`settings.greedy` False), rows whose temperature is 0 still decode greedily.
    """
    vocab = logits.shape[-1]
    logits = logits - _col(knobs.penalty_lambda, 3) * jax.nn.one_hot(prev, vocab, dtype=logits.dtype)
    never = jnp.arange(vocab) == settings.mask_id  # [V]
    g_probs = jax.nn.softmax(logits, axis=-1)
    g_tok = jnp.argmax(jnp.where(never, -jnp.inf, logits), axis=-1)
    g_p = jnp.take_along_axis(g_probs, g_tok[..., None], axis=-1)[..., 0]
    if settings.greedy:
        return g_tok.astype(jnp.int32), g_p
    temperature = _col(knobs.temperature, 3)
    logits = jnp.where(never, -jnp.inf, logits) / jnp.where(temperature > 0, temperature, 1.0)
    if settings.filter_top:
        desc = -jnp.sort(-logits, axis=-1)  # [N, C, V], descending
        k_idx = jnp.broadcast_to(_col(knobs.top_k, 3) - 1, desc.shape[:-1] + (1,))
        kth = jnp.take_along_axis(desc, k_idx, axis=-1)  # [N, C, 1]
        desc = jnp.where(desc < kth, -jnp.inf, desc)
        # top-p: keep the sorted prefix whose mass before each token is <= top_p.
        p_desc = jax.nn.softmax(desc, axis=-1)
        keep = (jnp.cumsum(p_desc, axis=-1) - p_desc) <= _col(knobs.top_p, 3)
        cutoff = jnp.take_along_axis(desc, keep.sum(-1, keepdims=True) - 1, axis=-1)
        logits = jnp.where(logits < jnp.maximum(kth, cutoff), -jnp.inf, logits)
    probs = jax.nn.softmax(logits, axis=-1)
    tok = jax.vmap(lambda k, lg: jax.random.categorical(k, lg, axis=-1))(keys, logits)
    p = jnp.take_along_axis(probs, tok[..., None], axis=-1)[..., 0]
    greedy_row = _col(knobs.temperature, 2) == 0
    return jnp.where(greedy_row, g_tok, tok).astype(jnp.int32), jnp.where(greedy_row, g_p, p)


# --------------------------------------------------------------------------- the loop
_slice = jax.vmap(lambda a, i, n: jax.lax.dynamic_slice_in_dim(a, i, n, axis=0), in_axes=(0, 0, None))
_update = jax.vmap(lambda a, u, i: jax.lax.dynamic_update_slice_in_dim(a, u, i, axis=0))


def _record(state: DecodeState, start, size: int, write: Bool[Array, "N C"], tok: Int[Array, "N C"],
            step: Int[Array, "N"]) -> DecodeState:
    """Appends the writes of one forward to the trajectory record (a no-op when not recording)."""
    if state.write_step is None:
        return state
    count = _slice(state.write_count, start, size)  # [N, C]
    slots = state.write_step.shape[-1]
    put = write[..., None] & (jnp.arange(slots) == count[..., None])  # [N, C, W]
    steps = jnp.where(put, step[:, None, None], _slice(state.write_step, start, size))
    tokens = jnp.where(put, tok[..., None], _slice(state.write_token, start, size))
    return state.replace(write_step=_update(state.write_step, steps, start),
                         write_token=_update(state.write_token, tokens, start),
                         write_count=_update(state.write_count, count + write, start))


def _model_chunk(params, config, settings, state: DecodeState, start, size, reading, writing,
                 chunk_mask: Bool[Array, "N C C"], full_mask: Bool[Array, "N L L"] | None):
    """Logits [N, size, V] for canvas[:, start:start+size] (per-row `start`), and the cache.

    Cached: the chunk sees the cached prefix `j < start` and its own keys under `chunk_mask`;
    the prefix read is bounded by the longest prefix among `reading` rows; `writing` rows store
    the chunk's K/V. Uncached: the whole canvas under `full_mask`, sliced.
    """
    canvas = state.canvas
    b = settings.block_length
    if not settings.use_cache:
        logits = model.forward(params, config, canvas, mask=full_mask)  # [N, L, V]
        return _slice(logits, start, size), state.cache
    tokens = _slice(canvas, start, size)  # [N, C]
    positions = start[:, None] + jnp.arange(size, dtype=jnp.int32)  # [N, C]
    buckets = prefix_buckets(settings, canvas.shape[1] // b)
    needed = jnp.where(reading, start // b, 0).max()
    logits, kv = kvcache.forward_chunk(params, config, tokens, positions, start, chunk_mask, state.cache,
                                       kvcache.bucket_index(buckets, needed), prefix_buckets=buckets,
                                       block_length=b)
    return logits, kvcache.write(state.cache, kv, start, writing)


def prefix_buckets(settings: DecodeSettings, num_blocks: int) -> tuple[int, ...]:
    """The prefix-read buckets (in blocks) of a canvas of `num_blocks` under these settings."""
    return kvcache.buckets(num_blocks, growth=settings.prefix_growth, max_buckets=settings.prefix_max_buckets)


def _token_logprobs(logits: Float[Array, "N C V"], tok: Int[Array, "N C"]) -> Float[Array, "N C"]:
    """log softmax(logits)[tok]: the model's own log-probability of each chosen token."""
    picked = jnp.take_along_axis(logits, tok[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _prev_tokens(canvas, positions):
    prev = jnp.take_along_axis(canvas, jnp.maximum(positions - 1, 0), axis=1)
    return jnp.where(positions > 0, prev, -1)


def _step_keys(row_keys, state: DecodeState):
    return jax.vmap(jax.random.fold_in)(row_keys, state.forwards)


def _finish_block(state: DecodeState, ended, stale, prompt_lens, num_blocks, knobs: Knobs,
                  settings: DecodeSettings):
    """Next phase and block of rows whose block `state.block` just became final.

    Stops after the canvas' last block, or (eos_early_stop, or always with llada20) when the
    generated part up to this block has no masks and holds an EOS. Otherwise a stale cache
    gets a COMMIT forward, and a clean one moves straight to the next block.
    """
    b = settings.block_length
    pos = jnp.arange(state.canvas.shape[1], dtype=jnp.int32)[None, :]
    gen = (pos >= prompt_lens[:, None]) & (pos < (state.block[:, None] + 1) * b)
    has_mask = (gen & (state.canvas == settings.mask_id)).any(-1)
    has_eos = (gen & (state.canvas == settings.eos_id)).any(-1)
    eos_stop = (knobs.eos_early_stop | knobs.llada20) & ~has_mask & has_eos
    stop = (state.block == num_blocks - 1) | eos_stop
    commit = ~stop & stale & settings.use_cache
    advance = ended & ~stop & ~commit
    phase = jnp.where(stop, DONE, jnp.where(commit, COMMIT, DENOISE))
    return state.replace(
        phase=jnp.where(ended, phase, state.phase),
        block=state.block + advance,
        post_steps=jnp.where(ended, 0, state.post_steps))


def _block_op(params, row_keys, prompt_lens, num_blocks, knobs, state: DecodeState, *, config, settings):
    """One B-token forward: a denoising step for DENOISE rows, a K/V commit for COMMIT rows."""
    b = settings.block_length
    length = state.canvas.shape[1]
    denoising = state.phase == DENOISE
    committing = state.phase == COMMIT
    start = state.block * b
    full_mask = None if settings.use_cache else masks.block_causal(length, b)[None]
    logits, cache = _model_chunk(params, config, settings, state, start, b, denoising | committing,
                                 denoising | committing, jnp.ones((1, b, b), bool), full_mask)
    positions = start[:, None] + jnp.arange(b, dtype=jnp.int32)  # [N, B]
    tokens = _slice(state.canvas, start, b)  # [N, B]
    tok, p = choose_tokens(logits, _prev_tokens(state.canvas, positions), _step_keys(row_keys, state),
                           knobs, settings)
    llada20 = _col(knobs.llada20, 2)

    masked = tokens == settings.mask_id
    any_masked = masked.any(-1)
    fill = masked & (p > _col(knobs.threshold, 2))  # M2T, Gamma
    best = jnp.argmax(jnp.where(masked, p, -jnp.inf), axis=-1)  # most confident masked position
    fallback = any_masked & ~fill.any(-1)
    fill |= fallback[:, None] & (jnp.arange(b) == best[:, None])
    edit = (~masked & (positions >= prompt_lens[:, None]) & (tok != tokens)  # T2T, Delta
            & (p > _col(knobs.editing_threshold, 2)) & ~llada20)
    write = (fill | edit) & denoising[:, None]
    new_tokens = jnp.where(write, tok, tokens)
    stamp = jnp.where(write, state.steps[:, None], _slice(state.commit_step, start, b))
    logprob = jnp.where(write, _token_logprobs(logits, tok), _slice(state.logprob, start, b))

    edited = edit.any(-1)
    masks_left = (new_tokens == settings.mask_id).any(-1)
    post_next = state.post_steps + ~masks_left
    # LLaDA2.1: a post-fill step that edits nothing ends the block, and its forward already saw
    # the final tokens; otherwise the block ends before a forward that would exceed the budget.
    clean_end = ~any_masked & ~edited
    end21 = clean_end | (post_next > knobs.max_post_steps)
    ended = denoising & jnp.where(knobs.llada20, ~masks_left, end21)
    stale = knobs.llada20 | ~clean_end

    state = _record(state, start, b, write, tok, state.steps)
    state = state.replace(
        canvas=_update(state.canvas, new_tokens, start),
        commit_step=_update(state.commit_step, stamp, start),
        logprob=_update(state.logprob, logprob, start),
        post_steps=jnp.where(denoising, post_next, state.post_steps),
        steps=state.steps + denoising,
        cache_writes=state.cache_writes + committing,
        cache=cache,
        # COMMIT rows move on to the next block.
        phase=jnp.where(committing, DENOISE, state.phase),
        block=state.block + committing)
    if not settings.mbe_window:
        return _finish_block(state, ended, stale, prompt_lens, num_blocks, knobs, settings)
    propose = ended & knobs.mbe
    state = _finish_block(state, ended & ~propose, stale, prompt_lens, num_blocks, knobs, settings)
    return state.replace(phase=jnp.where(propose, PROPOSE, state.phase), stale=jnp.where(ended, stale, state.stale),
                         mbe_steps=jnp.where(propose, 0, state.mbe_steps))


def mbe_fields(n: int, window: int, length: int, block_length: int) -> dict:
    """The Multi-Block Editing fields of a fresh `DecodeState` (N rows, window W, canvas L)."""
    # distinct buffers (the engine donates its slot state, and a buffer may be donated once)
    return dict(window=jnp.zeros((n, window), jnp.int32), window_ok=jnp.zeros((n, window), bool),
                mbe_steps=jnp.zeros((n,), jnp.int32), dirty_from=jnp.full((n,), length // block_length, jnp.int32),
                cursor=jnp.zeros((n,), jnp.int32), resume=jnp.zeros((n,), bool))


def block_surprisal(logprob: Float[Array, "N L"], prompt_lens: Int[Array, "N"],
                    block_length: int) -> tuple[Float[Array, "N NB"], Int[Array, "N NB"]]:
    """Mean surprisal -log p of each block's generated tokens (as written: `DecodeState.logprob`)
    and their count; the score by which "surprisal" windows reopen history blocks."""
    n, length = logprob.shape
    gen = jnp.arange(length)[None, :] >= prompt_lens[:, None]
    total = jnp.where(gen, -logprob, 0.0).reshape(n, -1, block_length).sum(-1)
    count = gen.reshape(n, -1, block_length).sum(-1)
    return total / jnp.maximum(count, 1), count


def choose_window(state: DecodeState, prompt_lens, knobs: Knobs, settings: DecodeSettings,
                  width: int) -> tuple[Int[Array, "N W"], Bool[Array, "N W"]]:
    """The blocks a Multi-Block Editing window reopens: up to `width - 1` history blocks, then the
    block just finished. "last": the blocks right before it. "surprisal" (*Project choice* on the
    paper's "entropy-based surprisal watermark"): the watermark keeps the most uncertain
    `mbe_fraction` of the generated history blocks (ceil of the share, by `block_surprisal`), and
    the window takes the most uncertain of those. Slots that are not real repeat the new block
    with `ok` False."""
    b = settings.block_length
    cur = state.block
    if width == 1:
        return cur[:, None], jnp.ones_like(cur[:, None], bool)
    first_gen = prompt_lens // b  # the first block holding a generated position
    if settings.mbe_select == "last":
        hist = cur[:, None] - (width - 1) + jnp.arange(width - 1, dtype=jnp.int32)[None, :]
        ok = hist >= first_gen[:, None]
    else:
        score, count = block_surprisal(state.logprob, prompt_lens, b)
        blk = jnp.arange(score.shape[1], dtype=jnp.int32)[None, :]
        cand = (blk >= first_gen[:, None]) & (blk < cur[:, None]) & (count > 0)
        keep = jnp.ceil(_col(knobs.mbe_fraction, 1) * cand.sum(-1)).astype(jnp.int32)  # above the watermark
        top, idx = jax.lax.top_k(jnp.where(cand, score, -jnp.inf), width - 1)
        ok = (jnp.arange(width - 1)[None, :] < jnp.minimum(keep, width - 1)[:, None]) & (top > -jnp.inf)
        hist = idx.astype(jnp.int32)
    window = jnp.concatenate([jnp.where(ok, hist, cur[:, None]), cur[:, None]], axis=1)
    return window, jnp.concatenate([ok, jnp.ones_like(ok[:, :1])], axis=1)


def _gather(a, idx):
    return jnp.take_along_axis(a, jnp.clip(idx, 0, a.shape[1] - 1), axis=1)


def _scatter(a, idx, values, write):
    """a[r, idx[r, i]] = values[r, i] where `write` (other slots are dropped, never raced)."""
    idx = jnp.where(write, idx, a.shape[1])
    return jax.vmap(lambda row, i, v: row.at[i].set(v, mode="drop"))(a, idx, values)


def _record_at(state: DecodeState, idx, write, tok, step) -> DecodeState:
    """`_record` for a chunk gathered from canvas positions `idx` [N, C]."""
    if state.write_step is None:
        return state
    count = _gather(state.write_count, idx)  # [N, C]
    slots = state.write_step.shape[-1]
    put = write[..., None] & (jnp.arange(slots) == count[..., None])  # [N, C, W]
    gather3 = jax.vmap(lambda a, i: a[jnp.clip(i, 0, a.shape[0] - 1)])
    steps = jnp.where(put, step[:, None, None], gather3(state.write_step, idx))
    tokens = jnp.where(put, tok[..., None], gather3(state.write_token, idx))
    return state.replace(write_step=_scatter(state.write_step, idx, steps, write),
                         write_token=_scatter(state.write_token, idx, tokens, write),
                         write_count=_scatter(state.write_count, idx, count + write, write))


def _window_op(params, row_keys, prompt_lens, num_blocks, knobs, state: DecodeState, *, config, settings):
    """One window forward (Multi-Block Editing) for PROPOSE and REWRITE rows.

    PROPOSE: the window's blocks (`choose_window`, fixed for the window's edit steps) are gathered
    into one chunk that reads the cached K/V of every other block before the new one; inside the
    chunk they attend as `mbe_attention` says. Masked positions are filled above `mbe_threshold`
    (w_mask), generated tokens edited above `mbe_editing_threshold` (w_edit). Nothing is written
    to the cache. Another edit step follows while the last one changed something and fewer than
    `mbe_max_steps` ran; before it, a REWRITE makes clean the blocks after an edited one that the
    window does not hold (their cached K/V read the old tokens). When the window closes, the cache
    is rewritten from the first changed block (or the new block, if its K/V are stale) to the new
    block, and only then: a window that changed nothing leaves every cached K/V bit for bit.
    REWRITE: block-causal K/V of `mbe_window` contiguous blocks from `cursor`, written for the
    blocks from `cursor` to the new one (blocks before `cursor` are read, never overwritten).
    """
    b = settings.block_length
    length = state.canvas.shape[1]
    nb = length // b
    w = min(settings.mbe_window, nb)
    size = w * b
    bidirectional = settings.mbe_attention == "bidirectional"
    proposing = state.phase == PROPOSE
    rewriting = state.phase == REWRITE
    cur = state.block
    slot = jnp.arange(size, dtype=jnp.int32) // b  # [C] window slot of each chunk position

    # PROPOSE rows: the window (chosen at its first edit step), gathered.
    fresh = proposing & (state.mbe_steps == 0)
    chosen, chosen_ok = choose_window(state, prompt_lens, knobs, settings, w)
    window = jnp.where(fresh[:, None], chosen, state.window)
    window_ok = jnp.where(fresh[:, None], chosen_ok, state.window_ok)
    q_blk_p = window[:, slot]  # [N, C] canvas block of each chunk position
    ok_p = window_ok[:, slot]
    same_slot = slot[:, None] == slot[None, :]
    sees = ok_p[:, None, :] & (True if bidirectional else q_blk_p[:, None, :] <= q_blk_p[:, :, None])
    mask_p = sees | same_slot[None]  # [N, C, C]; a slot that is not real sees only itself
    limit_p = jnp.broadcast_to(cur[:, None], q_blk_p.shape) if bidirectional else q_blk_p
    limit_p = limit_p * b  # [N, C]: a query reads the cached keys j < its limit
    pos_blk = jnp.arange(length, dtype=jnp.int32) // b  # [L]
    hidden = ((pos_blk[None, :, None] == window[:, None, :]) & window_ok[:, None, :]).any(-1)  # [N, L]

    # REWRITE rows: `w` contiguous blocks ending inside the canvas, block causal.
    first = jnp.minimum(state.cursor, nb - w)  # [N]
    q_blk_r = first[:, None] + slot[None, :]
    mask_r = q_blk_r[:, None, :] <= q_blk_r[:, :, None]

    q_blk = jnp.where(proposing[:, None], q_blk_p, q_blk_r)
    idx = q_blk * b + jnp.arange(size, dtype=jnp.int32)[None, :] % b  # [N, C] canvas positions
    chunk_mask = jnp.where(proposing[:, None, None], mask_p, mask_r)
    limit = jnp.where(proposing[:, None], limit_p, first[:, None] * b)
    hidden = hidden & proposing[:, None]
    tokens = _gather(state.canvas, idx)
    write_kv = rewriting[:, None] & (q_blk >= state.cursor[:, None]) & (q_blk <= cur[:, None])

    if settings.use_cache:
        buckets = prefix_buckets(settings, nb)
        needed = jnp.where(proposing, cur, jnp.where(rewriting, first, 0)).max()
        logits, kv = kvcache.forward_chunk(params, config, tokens, idx, first * b, chunk_mask, state.cache,
                                           kvcache.bucket_index(buckets, needed), prefix_buckets=buckets,
                                           block_length=b, prefix_limit=limit, hidden=hidden)
        cache = kvcache.write(state.cache, kv, first * b, rewriting, positions=write_kv)
    else:
        # The oracle, without a cache: the whole canvas block causal (what the cache holds), and
        # the chunk's own copy of its tokens reading it as the cached forward reads the cache.
        n = tokens.shape[0]
        canvas_mask = jnp.broadcast_to((pos_blk[None, :] <= pos_blk[:, None])[None], (n, length, length))
        keys = jnp.arange(length, dtype=jnp.int32)
        chunk_reads = (keys[None, None, :] < limit[:, :, None]) & ~hidden[:, None, :]  # [N, C, L]
        full = jnp.concatenate([
            jnp.concatenate([canvas_mask, jnp.zeros((n, length, size), bool)], axis=2),
            jnp.concatenate([chunk_reads, chunk_mask], axis=2)], axis=1)
        positions = jnp.concatenate([jnp.broadcast_to(keys, (n, length)), idx], axis=1)
        logits = model.forward(params, config, jnp.concatenate([state.canvas, tokens], axis=1), positions,
                               mask=full)[:, length:]
        cache = state.cache
    tok, p = choose_tokens(logits, _prev_tokens(state.canvas, idx), _step_keys(row_keys, state), knobs, settings)
    generated = (idx >= prompt_lens[:, None]) & ok_p & proposing[:, None]
    masked = tokens == settings.mask_id
    write = generated & jnp.where(masked, p > _col(knobs.mbe_threshold, 2),
                                  (tok != tokens) & (p > _col(knobs.mbe_editing_threshold, 2)))
    edited = write.any(-1)
    changed = jnp.where(write, q_blk, nb).min(-1)
    stamp = jnp.where(write, state.steps[:, None] - 1, _gather(state.commit_step, idx))
    logprob = jnp.where(write, _token_logprobs(logits, tok), _gather(state.logprob, idx))
    state = _record_at(state, idx, write, tok, state.steps - 1)

    # PROPOSE bookkeeping: another edit step, a REWRITE first, or the window closes.
    dirty = jnp.where(proposing, jnp.minimum(state.dirty_from, changed), state.dirty_from)
    steps_done = state.mbe_steps + proposing
    more = proposing & edited & (steps_done < knobs.mbe_max_steps)
    in_window = ((pos_blk[None, ::b, None] == window[:, None, :]) & window_ok[:, None, :]).any(-1)  # [N, NB]
    blocks = jnp.arange(nb, dtype=jnp.int32)[None, :]
    gap = ((blocks > dirty[:, None]) & (blocks < cur[:, None]) & ~in_window).any(-1)
    closing = proposing & ~more
    pending = jnp.minimum(dirty, jnp.where(state.stale, cur, nb))  # first block whose K/V must be rewritten
    # REWRITE rows: the next chunk, or the end of the rewrite.
    after_first = first + w
    rewrite_done = rewriting & (after_first > cur)
    back = rewrite_done & state.resume
    onward = rewrite_done & ~state.resume
    clean = rewrite_done  # the cache holds clean K/V up to the new block again
    state = state.replace(
        canvas=_scatter(state.canvas, idx, tok, write),
        commit_step=_scatter(state.commit_step, idx, stamp, write),
        logprob=_scatter(state.logprob, idx, logprob, write),
        mbe_forwards=state.mbe_forwards + proposing,
        cache_writes=state.cache_writes + rewriting,
        cache=cache,
        window=window, window_ok=window_ok, mbe_steps=steps_done,
        dirty_from=jnp.where(clean, nb, dirty),
        stale=jnp.where(clean, False, state.stale),
        cursor=jnp.where(rewriting, after_first, state.cursor),
        phase=jnp.where(back, PROPOSE, jnp.where(onward, DENOISE, state.phase)),
        block=state.block + onward)
    # More edit steps: straight on when the window holds every block after the first edit, else
    # after a REWRITE from it (the new block's K/V included).
    mid = more & gap & settings.use_cache  # (without a cache there is nothing to make clean)
    state = state.replace(phase=jnp.where(mid, REWRITE, state.phase), cursor=jnp.where(mid, dirty, state.cursor),
                          resume=jnp.where(mid, True, jnp.where(closing, False, state.resume)))
    # The window closes: stop, rewrite from the first stale block, or go on to the next block.
    after = _finish_block(state, closing, pending <= cur, prompt_lens, num_blocks, knobs, settings)
    rewrite = closing & (after.phase == COMMIT) & (pending < cur)
    return after.replace(phase=jnp.where(rewrite, REWRITE, after.phase),
                         cursor=jnp.where(rewrite, pending, after.cursor),
                         dirty_from=jnp.where(closing, nb, after.dirty_from),
                         stale=jnp.where(closing, False, after.stale))


def init_state(params, canvas: Int[Array, "N L"], prompt_lens: Int[Array, "N"], *, config: ModelConfig,
               settings: DecodeSettings, cache: Any = None) -> DecodeState:
    """The loop state before the first step: each row at its prompt's last block, the prompt's
    full blocks prefilled into a fresh cache (cached path). `cache`: the rows' prefilled cache
    instead (`decode.rollouts.prefill_groups` shares one prefill among a group's rows)."""
    n, length = canvas.shape
    b = settings.block_length
    zeros = jnp.zeros((n,), jnp.int32)
    cache_writes = zeros
    if not settings.use_cache:
        cache = None
    elif cache is None:
        cache = kvcache.prefill(params, config, canvas, prompt_lens // b, kvcache.init_cache(config, n, length),
                                block_length=b, chunk_blocks=settings.prefill_chunk_blocks,
                                prefix_buckets=prefix_buckets(settings, length // b))
    if settings.use_cache:
        cache_writes = (prompt_lens >= b).astype(jnp.int32)
    record = mbe_fields(n, min(settings.mbe_window, length // b), length, b) if settings.mbe_window else {}
    if settings.record_writes:
        w = settings.record_writes
        record.update(write_step=jnp.full((n, length, w), -1, jnp.int32),
                      write_token=jnp.full((n, length, w), settings.mask_id, jnp.int32),
                      write_count=jnp.zeros((n, length), jnp.int32))
    return DecodeState(
        canvas=canvas, block=prompt_lens // b, phase=zeros + DENOISE, post_steps=zeros, steps=zeros,
        cache_writes=cache_writes, mbe_forwards=zeros, commit_step=jnp.full(canvas.shape, -1, jnp.int32),
        logprob=jnp.zeros(canvas.shape, jnp.float32),
        stale=jnp.zeros((n,), bool), cache=cache, **record)


def step(params, state: DecodeState, prompt_lens: Int[Array, "N"], num_blocks: Int[Array, "N"], knobs: Knobs,
         row_keys: jax.Array, *, config: ModelConfig, settings: DecodeSettings) -> DecodeState:
    """One loop iteration, exactly one model forward for the batch (pure; `decode` loops over it).

    Row r decodes blocks floor(P_r/B) .. num_blocks[r] - 1; DONE rows never change. `row_keys`
    [N] are the rows' sampling keys (step keys fold in the row's forward count).
    """
    ops = dict(config=config, settings=settings)
    block_op = functools.partial(_block_op, params, row_keys, prompt_lens, num_blocks, knobs, **ops)
    if not settings.mbe_window:
        return block_op(state)
    window_op = functools.partial(_window_op, params, row_keys, prompt_lens, num_blocks, knobs, **ops)
    in_window = (state.phase == PROPOSE) | (state.phase == REWRITE)
    return jax.lax.cond(in_window.any(), window_op, block_op, state)


def row_keys_for(rng: jax.Array, n: int, offset=0) -> jax.Array:
    """The per-row sampling keys `generate` uses: fold_in(rng, row), rows `offset .. offset + n - 1`."""
    return jax.vmap(jax.random.fold_in, (None, 0))(rng, offset + jnp.arange(n))


@functools.partial(jax.jit, static_argnames=("config", "settings", "on_block"))
def decode(params, canvas: Int[Array, "N L"], prompt_lens: Int[Array, "N"], canvas_lens: Int[Array, "N"],
           knobs: Knobs, rng: jax.Array, *, config: ModelConfig, settings: DecodeSettings,
           on_block: Optional[Callable] = None) -> DecodeState:
    """The jitted decoding loop over a batch of canvases (prompt, then mask ids).

    Row r decodes blocks floor(P_r/B) .. canvas_lens[r]/B - 1 of its canvas; positions past
    canvas_lens[r] are never read by it. Compiled once per (N, L, settings); `knobs` are traced.
    Returns the final loop state (canvases, per-row statistics, commit steps).

    `on_block(finished [N] bool, block [N] int, canvas [N, L])`, a host function, is called after
    every forward through `jax.debug.callback`; rows with `finished` just completed `block`
    (streaming). It is a static argument: pass the same function to reuse the compiled loop.
    """
    n, _ = canvas.shape
    num_blocks = canvas_lens // settings.block_length
    row_keys = row_keys_for(rng, n)
    state = init_state(params, canvas, prompt_lens, config=config, settings=settings)
    body = functools.partial(step, params, prompt_lens=prompt_lens, num_blocks=num_blocks, knobs=knobs,
                             row_keys=row_keys, config=config, settings=settings)
    if on_block is not None:
        one = body

        def body(st):  # noqa: F811 - streaming wraps the step
            new = one(st)
            advanced = new.block > st.block
            finished = advanced | ((new.phase == DONE) & (st.phase != DONE))
            jax.debug.callback(on_block, finished, jnp.where(advanced, st.block, new.block), new.canvas)
            return new
    return jax.lax.while_loop(lambda st: (st.phase != DONE).any(), body, state)


def canvas_bucket(num_blocks: int, max_blocks: int) -> int:
    """Blocks of the compiled canvas: the next power of two (at most `max_blocks`, at least
    `num_blocks`), so prompts of many lengths share a few programs."""
    return max(num_blocks, min(1 << max(num_blocks - 1, 0).bit_length(), max_blocks))
