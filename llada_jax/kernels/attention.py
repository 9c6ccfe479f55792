"""Attention implementations behind one interface, chosen by `ModelConfig.attention_impl`.

`attention(q, k, v, mask, impl=...)` takes queries `[B, T, N, H]`, keys and values `[B, S, K, H]`
(GQA: N = K * G) and an `AttentionMask` description, and returns `[B, T, N, H]` in q's dtype.
Scores are fp32 (`preferred_element_type`), scaled by 1/sqrt(H), softmax in fp32.

  xla      the dense path: `[B, K, G, T, S]` scores under the mask's dense twin. The oracle
           that every other implementation is tested against (values and gradients).
  blocked  exact, plain XLA, for the CPU (or any backend): query tiles against only the key
           ranges their rows may see. The tiles, their key ranges and their in-tile masks are a
           static list built from the mask's structure at trace time (composite: noisy tiles read
           their own noisy block(s) plus the clean prefix, clean tiles the clean prefix; block
           causal: the prefix), so FLOPs and score memory drop to the allowed area plus the
           diagonal tiles (about 1/4 of dense for the composite mask at L = 2048).
  splash   Pallas splash attention (TPU; `interpret=True` elsewhere): the static structure as a
           `NumpyMask`, so fully masked tiles are skipped; packed documents and key padding go
           in as segment ids. T must be a multiple of 128.
  cudnn    `jax.nn.dot_product_attention` with `implementation="cudnn"` on GPU for bf16/fp16
           (dense mask, fused kernel, no `[B, N, T, S]` scores in HBM); elsewhere, or for fp32
           inputs, which cuDNN does not take, the same call with `implementation="xla"`.
  auto     by platform: tpu -> splash (blocked when T is not a multiple of 128), gpu -> cudnn,
           cpu -> blocked. The platform is read from the mesh in context (`jax.set_mesh`) as
           MaxText does, so an ahead-of-time compile for TPU on a CPU host picks the TPU kernel.

A `dense` mask (an explicit boolean: the public `forward(mask=...)` and the KV cache) always
runs `xla`: no other implementation can know its structure, and the result is the same.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from llada_jax.config import ATTENTION_IMPLS
from llada_jax.kernels.mask import AttentionMask, allowed

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a fully masked row gives no NaN


@dataclasses.dataclass(frozen=True)
class TileSizes:
    """Tile sizes of the kernels (not architecture, so not in `ModelConfig`)."""

    blocked_q: int = 256  # query rows per tile of `blocked` (rounded to whole mask blocks)
    splash_q: int = 512  # splash block_q (capped at T; multiples of 128)
    splash_kv: int = 512  # splash block_kv


DEFAULT_TILES = TileSizes()


def platform() -> str:
    """'cpu' / 'gpu' / 'tpu' of the mesh in context, else of the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        dev = getattr(mesh, "abstract_device", None)
        if dev is not None and getattr(dev, "platform", None):
            return {"cuda": "gpu", "rocm": "gpu"}.get(dev.platform, dev.platform)
    return {"cuda": "gpu", "rocm": "gpu"}.get(jax.default_backend(), jax.default_backend())


def resolve(impl: str, mask: AttentionMask, length: int) -> str:
    """The implementation that will run: `auto` by platform; dense masks always `xla`."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl: expected one of {ATTENTION_IMPLS}, found {impl!r}")
    if not mask.structured:
        return "xla"
    if impl != "auto":
        return impl
    plat = platform()
    if plat == "tpu":
        return "splash" if length % 128 == 0 else "blocked"
    return "cudnn" if plat == "gpu" else "blocked"


def attention(q: Float[Array, "B T N H"], k: Float[Array, "B S K H"], v: Float[Array, "B S K H"],
              mask: AttentionMask, *, impl: str = "xla", tiles: TileSizes = DEFAULT_TILES,
              interpret: bool | None = None) -> Float[Array, "B T N H"]:
    """Masked softmax attention with the implementation `impl` (see the module docstring)."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    if n % kh:
        raise ValueError(f"attention: expected query heads ({n}) to be a multiple of kv heads ({kh})")
    mask.check(b, t, s)
    # Queries against a longer key set (a KV cache) without a structure: nothing to skip.
    name = "xla" if s != t else resolve(impl, mask, t)
    if name == "xla":
        return xla_attention(q, k, v, mask)
    if name == "blocked":
        return blocked_attention(q, k, v, mask, q_tile=tiles.blocked_q)
    if name == "splash":
        return splash_attention(q, k, v, mask, tiles=tiles,
                                interpret=(platform() != "tpu") if interpret is None else interpret)
    return cudnn_attention(q, k, v, mask)


# ------------------------------------------------------------------------------------------ xla
def _scores(qg, kk, scale):
    # [B, T, K, G, H] x [B, S, K, H] -> [B, K, G, T, S], fp32 even for bf16 inputs
    return jnp.einsum("btkgh,bskh->bkgts", qg, kk, preferred_element_type=jnp.float32) / scale


def xla_attention(q, k, v, mask: AttentionMask):
    """Dense scores under the dense twin of `mask`: the oracle."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    scores = _scores(qg, k, jnp.sqrt(jnp.float32(h)))
    if mask.kind != "bidirectional" or mask.segment_ids is not None or mask.key_valid is not None:
        scores = jnp.where(mask.dense(t)[:, None, None, :, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, n, h)


# ------------------------------------------------------------------------------------------ blocked
@dataclasses.dataclass(frozen=True)
class Tile:
    q_start: int
    q_end: int
    key_runs: tuple[tuple[int, int], ...]  # contiguous key ranges the tile's rows may see
    local: np.ndarray  # [q_end - q_start, sum of run lengths] structural mask inside the tile
    full: bool  # local is all True (no where needed)


def _runs(cols: np.ndarray) -> tuple[tuple[int, int], ...]:
    idx = np.flatnonzero(cols)
    if idx.size == 0:
        return ()
    breaks = np.flatnonzero(np.diff(idx) > 1)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks] + 1, [idx[-1] + 1]])
    return tuple((int(a), int(b)) for a, b in zip(starts, ends))


@functools.lru_cache(maxsize=64)
def blocked_tiles(kind: str, block_size: int, length: int, q_tile: int) -> tuple[Tile, ...]:
    """The static tiling of a structured mask: query tiles (whole mask blocks, never straddling
    the composite's noisy/clean boundary) with the key runs they need and their in-tile mask."""
    if kind in ("block_causal", "composite"):
        q_tile = max(block_size, q_tile // block_size * block_size)
    segments = [(0, length // 2), (length // 2, length)] if kind == "composite" else [(0, length)]
    keys = np.arange(length)
    tiles = []
    for seg_start, seg_end in segments:
        for qs in range(seg_start, seg_end, q_tile):
            qe = min(qs + q_tile, seg_end)
            rows = np.asarray(allowed(np, kind, block_size, length, np.arange(qs, qe)[:, None], keys[None, :]))
            runs = _runs(rows.any(axis=0))
            cols = np.concatenate([np.arange(a, b) for a, b in runs])
            local = rows[:, cols]
            tiles.append(Tile(qs, qe, runs, local, bool(local.all())))
    return tuple(tiles)


def _take(x, runs, axis=1):
    parts = [jax.lax.slice_in_dim(x, a, b, axis=axis) for a, b in runs]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def blocked_attention(q, k, v, mask: AttentionMask, q_tile: int = 256):
    """Exact attention computing only the tiles the mask allows (see `blocked_tiles`)."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    scale = jnp.sqrt(jnp.float32(h))
    outs = []
    for tile in blocked_tiles(mask.kind, mask.block_size, t, q_tile):
        qs, qe = tile.q_start, tile.q_end
        qg = q[:, qs:qe].reshape(b, qe - qs, kh, n // kh, h)
        kt, vt = _take(k, tile.key_runs), _take(v, tile.key_runs)
        scores = _scores(qg, kt, scale)  # [B, K, G, Tq, Sk]
        allow = None if tile.full else jnp.asarray(tile.local)[None]
        if mask.segment_ids is not None:
            same = mask.segment_ids[:, qs:qe, None] == _take(mask.segment_ids, tile.key_runs)[:, None, :]
            allow = same if allow is None else allow & same
        if mask.key_valid is not None:
            valid = _take(mask.key_valid, tile.key_runs)[:, None, :]
            allow = valid if allow is None else allow & valid
        if allow is not None:
            scores = jnp.where(allow[:, None, None], scores, _NEG)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        outs.append(jnp.einsum("bkgts,bskh->btkgh", probs, vt).reshape(b, qe - qs, n, h))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def blocked_flops_fraction(kind: str, block_size: int, length: int, q_tile: int = 256) -> float:
    """Score entries `blocked` computes over the dense T*T (for benchmarks and docs)."""
    tiles = blocked_tiles(kind, block_size, length, q_tile)
    return sum(tl.local.size for tl in tiles) / float(length * length)


# ------------------------------------------------------------------------------------------ splash
@functools.lru_cache(maxsize=32)
def _splash_kernel(kind: str, block_size: int, length: int, heads: int, block_q: int, block_kv: int,
                   interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    i = np.arange(length)
    structure = np.asarray(allowed(np, kind, block_size, length, i[:, None], i[None, :]))
    sizes = sk.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                          block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                          block_q_dq=block_q, block_kv_dq=block_kv)
    mh = sm.MultiHeadMask([sm.NumpyMask(structure)] * heads)
    # Cached across traces, so its mask tables must be concrete arrays, never a trace's constants.
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mqa_single_device(mh, block_sizes=sizes, interpret=interpret)


def _splash_block(size: int, length: int) -> int:
    b = min(size, length)
    while length % b:
        b -= 128
    return b


def splash_attention(q, k, v, mask: AttentionMask, *, tiles: TileSizes = DEFAULT_TILES, interpret: bool = False):
    """Pallas splash attention, one MQA kernel per (example, kv head) over its G query heads."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    if t % 128:
        raise ValueError(f"splash attention: expected a sequence length that is a multiple of 128, found {t}")
    kernel = _splash_kernel(mask.kind, mask.block_size, t, g, _splash_block(tiles.splash_q, t),
                            _splash_block(tiles.splash_kv, t), interpret)
    # The kernel does not scale: fold 1/sqrt(H) into q (fp32, then back to q's dtype).
    qs = (q.astype(jnp.float32) / jnp.sqrt(jnp.float32(h))).astype(q.dtype)
    qs = qs.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    ks, vs = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]

    seg = None
    if mask.segment_ids is not None or mask.key_valid is not None:
        q_seg = jnp.zeros((b, t), jnp.int32) if mask.segment_ids is None else \
            jnp.broadcast_to(mask.segment_ids, (b, t)).astype(jnp.int32)
        kv_seg = q_seg
        if mask.key_valid is not None:
            # A padding key gets an id no query has, so no query attends it.
            kv_seg = jnp.where(jnp.broadcast_to(mask.key_valid, (b, t)), q_seg, jnp.iinfo(jnp.int32).min)
        seg = (q_seg, kv_seg)

    def one(qb, kb, vb, sq, skv):  # [G, T, H], [T, H], [T, H]
        ids = None if sq is None else sk.SegmentIds(q=sq, kv=skv)
        return kernel(qb, kb, vb, segment_ids=ids)

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))  # over kv heads
    if seg is None:
        out = jax.vmap(lambda qb, kb, vb: per_head(qb, kb, vb, None, None))(qs, ks, vs)
    else:
        out = jax.vmap(per_head)(qs, ks, vs, *seg)
    return out.astype(q.dtype).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


# ------------------------------------------------------------------------------------------ cudnn
def cudnn_attention(q, k, v, mask: AttentionMask):
    """`jax.nn.dot_product_attention` under the dense twin (cuDNN's fused kernel on GPU)."""
    t, h = q.shape[1], q.shape[3]
    use_cudnn = platform() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    dense = None
    if mask.kind != "bidirectional" or mask.segment_ids is not None or mask.key_valid is not None:
        dense = mask.dense(t)[:, None]  # [B|1, 1, T, S]
    return jax.nn.dot_product_attention(q, k, v, mask=dense, scale=1.0 / float(np.sqrt(h)),
                                        implementation="cudnn" if use_cudnn else "xla")
