"""Attention implementations behind one interface, chosen by `ModelConfig.attention_impl`.

`attention(q, k, v, mask, impl=...)` takes queries `[B, T, N, H]`, keys and values `[B, S, K, H]`
(GQA: N = K * G) and an `AttentionMask` description, and returns `[B, T, N, H]` in q's dtype.
Scores are fp32 (`preferred_element_type`), scaled by 1/sqrt(H), softmax in fp32.

  xla      the dense path: `[B, K, G, T, S]` scores under the mask's dense twin. The oracle
           that every other implementation is tested against (values and gradients).
  blocked  exact, plain XLA, for the CPU (or any backend): query tiles against only the key
           ranges their rows may see. The tiles, their key ranges and their in-tile masks are a
           static list built from the mask's structure at trace time (composite: noisy tiles read
           their own noisy block(s) plus the clean prefix, clean tiles the clean prefix; with
           Multi-Block Editing links also the next window - 1 noisy blocks; block
           causal: the prefix), so FLOPs and score memory drop to the allowed area plus the
           diagonal tiles (about 1/4 of dense for the composite mask at L = 2048).
  splash   Pallas splash attention (TPU; `interpret=True` elsewhere): the static structure as a
           computable splash mask, so fully masked tiles are skipped; packed documents and key
           padding go in as segment ids. Under a mesh it runs inside `jax.shard_map` over the
           batch and head axes (XLA cannot partition a Pallas kernel; MaxText does the same).
           A T that is not a multiple of 128 is padded to whole tiles (exact). The one rule
           for short sequences: T < 128 (less than one tile: the model's 8-token init trace,
           toy shapes) runs `xla` instead, at most 128 x 128 scores per head; T >= 128
           always runs the kernel.
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

from llada_jax.kernels.mask import AttentionMask, allowed

# The attention implementations behind `attention` (ModelConfig.attention_impl takes one of them).
ATTENTION_IMPLS = ("xla", "blocked", "splash", "cudnn", "auto")

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
    if name == "splash" and t < SPLASH_MIN_LENGTH:
        name = "xla"  # below one splash tile: the dense oracle, at most 128 x 128 scores per head
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
def blocked_tiles(kind: str, block_size: int, length: int, q_tile: int, window: int = 1,
                  clean_sees_noisy: bool = False) -> tuple[Tile, ...]:
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
            rows = np.asarray(allowed(np, kind, block_size, length, np.arange(qs, qe)[:, None], keys[None, :],
                                      window, clean_sees_noisy))
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
    for tile in blocked_tiles(mask.kind, mask.block_size, t, q_tile, mask.window, mask.clean_sees_noisy):
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


def blocked_flops_fraction(kind: str, block_size: int, length: int, q_tile: int = 256, window: int = 1,
                           clean_sees_noisy: bool = False) -> float:
    """Score entries `blocked` computes over the dense T*T (for benchmarks and docs)."""
    tiles = blocked_tiles(kind, block_size, length, q_tile, window, clean_sees_noisy)
    return sum(tl.local.size for tl in tiles) / float(length * length)


# ------------------------------------------------------------------------------------------ splash
SPLASH_MIN_LENGTH = 128  # splash's smallest tile; shorter sequences run the dense oracle (see `attention`)


def _splash_rule(kind: str, block_size: int, length: int, links=(1, False)):
    """The structure as a function of query / key index arrays, for a sequence padded past `length`.

    Operators only (no `xp`), so that splash evaluates it both in numpy (which tiles to skip) and
    inside the kernel (the partial tiles). Real rows see what `allowed` says; a padding row (index
    >= length) sees only itself, so that its softmax is defined and no real row sees it.
    """

    def rule(q, k):
        if kind == "bidirectional":
            real = (q >= 0) & (k >= 0)
        else:
            real = allowed(np, kind, block_size, length, q, k, *links)
        return ((q < length) & (k < length) & real) | ((q >= length) & (q == k))

    return rule


def _structure_mask(kind: str, block_size: int, length: int, padded: int, links=(1, False)):
    """A splash `_ComputableMask` for the structure (hashable, so splash's mask processing caches it).

    Computable rather than a `NumpyMask`: at 2L = 16384 a dense numpy structure is 256 MiB per
    copy, and the kernel would load partial tiles from memory instead of computing them.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    class StructureMask(sm._ComputableMask):  # noqa: SLF001 (the documented way to define a lazy mask)
        def __init__(self):
            self.key = (kind, block_size, length, padded, tuple(links))
            super().__init__(shape=(padded, padded), mask_function=_splash_rule(kind, block_size, length, links))

        def __eq__(self, other):
            return type(other).__name__ == "StructureMask" and getattr(other, "key", None) == self.key

        def __hash__(self):
            return hash(("StructureMask",) + self.key)

    return StructureMask()


def _splash_kernel(kind: str, block_size: int, length: int, padded: int, heads: int, block_q: int,
                   block_kv: int, interpret: bool, links=(1, False)):
    """An MQA splash kernel over `heads` query heads. Built per trace: its mask tables become that
    trace's constants (a kernel cached across traces leaks one trace's tables into the next);
    splash caches the expensive part, the numpy mask processing, itself."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    sizes = sk.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                          block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                          block_q_dq=block_q, block_kv_dq=block_kv)
    mh = sm.MultiHeadMask([_structure_mask(kind, block_size, length, padded, links)] * heads)
    return sk.make_splash_mqa_single_device(mh, block_sizes=sizes, interpret=interpret)


def _splash_block(size: int, length: int) -> int:
    """The largest multiple of 128 that is <= `size` and divides `length` (a multiple of 128)."""
    b = max(128, min(size, length) // 128 * 128)
    while length % b:
        b -= 128
    return b


def _splash_local(q, k, v, q_seg, kv_seg, *, kind: str, block_size: int, tiles: TileSizes, interpret: bool,
                 links=(1, False)):
    """Splash on one device's shard: `[b, T, n, H]` queries, `[b, T, k, H]` keys / values, whole
    sequences; one MQA kernel per (example, kv head) over its n / k query heads."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    padded = -(-t // 128) * 128
    kernel = _splash_kernel(kind, block_size, t, padded, g, _splash_block(tiles.splash_q, padded),
                            _splash_block(tiles.splash_kv, padded), interpret, links)
    # The kernel does not scale: fold 1/sqrt(H) into q (fp32, then back to q's dtype).
    qs = (q.astype(jnp.float32) / jnp.sqrt(jnp.float32(h))).astype(q.dtype)
    qs = qs.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    ks, vs = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
    if padded != t:  # whole tiles; padding rows see only themselves (`_splash_rule`)
        pad = padded - t
        qs = jnp.pad(qs, ((0, 0),) * 3 + ((0, pad), (0, 0)))
        ks, vs = (jnp.pad(a, ((0, 0), (0, 0), (0, pad), (0, 0))) for a in (ks, vs))
        if q_seg is not None:
            q_seg, kv_seg = (jnp.pad(a, ((0, 0), (0, pad))) for a in (q_seg, kv_seg))

    def one(qb, kb, vb, sq, skv):  # [G, T, H], [T, H], [T, H]
        ids = None if sq is None else sk.SegmentIds(q=sq, kv=skv)
        return kernel(qb, kb, vb, segment_ids=ids)

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))  # over kv heads
    if q_seg is None:
        out = jax.vmap(lambda qb, kb, vb: per_head(qb, kb, vb, None, None))(qs, ks, vs)
    else:
        out = jax.vmap(per_head)(qs, ks, vs, q_seg, kv_seg)
    out = out[:, :, :, :t]
    return out.astype(q.dtype).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _splash_specs(q_shape, k_shape):
    """shard_map specs for q / k, v / segment ids under the mesh in context, or None without one.

    The batch and head axes are those the logical rules give the model's activations
    (`act_batch`, `act_heads`, `act_kv_heads`; the rules of `nn.logical_axis_rules`, else
    `sharding.DEFAULT_RULES`), so nothing is resharded on the way in. Sequences stay whole
    (splash shards neither queries nor keys here). Heads are split only when query and kv heads
    split over the same axes, so that each device holds whole GQA groups; otherwise they are
    replicated inside the map.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    import flax.linen as nn

    from llada_jax.parallel.sharding import DEFAULT_RULES, logical_to_spec

    rules = nn.get_logical_axis_rules() or DEFAULT_RULES
    shape = dict(mesh.shape)
    qs = logical_to_spec(("act_batch", "act_length", "act_heads", None), q_shape, shape, rules)
    ks = logical_to_spec(("act_batch", "act_length", "act_kv_heads", None), k_shape, shape, rules)
    batch, heads = qs[0], qs[2]
    if ks[0] != batch or ks[2] != heads:
        heads = None
    P = jax.sharding.PartitionSpec
    return mesh, P(batch, None, heads, None), P(batch, None, heads, None), P(batch, None)


def splash_attention(q, k, v, mask: AttentionMask, *, tiles: TileSizes = DEFAULT_TILES, interpret: bool = False):
    """Pallas splash attention; under a mesh (`jax.set_mesh`) inside `jax.shard_map` over the batch
    and head axes, as MaxText's attention op does (a Pallas kernel cannot be partitioned by XLA).

    T >= 128 (shorter sequences run `xla`, see `attention`); a T that is not a multiple of 128 is
    padded to whole tiles, the padding invisible to real rows (exact).
    """
    b, t, n, h = q.shape
    if t < SPLASH_MIN_LENGTH:
        raise ValueError(f"splash attention: expected a sequence length >= {SPLASH_MIN_LENGTH} (one tile), "
                         f"found {t}; attention() runs xla below that")
    q_seg = kv_seg = None
    if mask.segment_ids is not None or mask.key_valid is not None:
        q_seg = jnp.zeros((b, t), jnp.int32) if mask.segment_ids is None else \
            jnp.broadcast_to(mask.segment_ids, (b, t)).astype(jnp.int32)
        kv_seg = q_seg
        if mask.key_valid is not None:
            # A padding key gets an id no query has, so no query attends it.
            kv_seg = jnp.where(jnp.broadcast_to(mask.key_valid, (b, t)), q_seg, jnp.iinfo(jnp.int32).min)
    local = functools.partial(_splash_local, kind=mask.kind, block_size=mask.block_size, tiles=tiles,
                              interpret=interpret, links=(mask.window, mask.clean_sees_noisy))
    specs = _splash_specs(q.shape, k.shape)
    if specs is None:
        return local(q, k, v, q_seg, kv_seg)
    mesh, q_spec, kv_spec, seg_spec = specs
    if q_seg is None:
        return jax.shard_map(lambda q, k, v: local(q, k, v, None, None), mesh=mesh,
                             in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec, check_vma=False)(q, k, v)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v, q_seg, kv_seg)


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
