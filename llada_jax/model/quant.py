"""Weight-only quantization for decoding: int8 and FP8 (float8_e4m3fn) weights with per-block scales.

LLaDA2.1 serves its peak throughput with per-block FP8 weights. Here the attention projections
(`q_proj`, `k_proj`, `v_proj`, `o_proj`), the routed experts (`wi_gate`, `wi_up`, `wo`) and the
SwiGLU MLPs (the dense layers' and the shared experts') of every layer are stored quantized;
the embedding, `lm_head`, the router and the norms stay as they are. Each weight is cut into
blocks of `block_size` (default 128) along its contraction dimension (`embed` for the input
projections, the expert / MLP width for the output ones, `head_dim` for `o_proj`), and each block
gets one fp32 scale, amax / qmax (127 for int8, 448 for e4m3fn): a weight `w` is stored as
`q = round(w / scale)` (int8) or `cast(w / scale)` (FP8).

A quantized weight is a `QArray` (a pytree of the stored values and the scales) in place of the
array in the parameter tree. Its `astype(dtype)` dequantizes, so every matmul of the model (the
linen modules' `w.astype(dt)` and the decoder's own forward in `decode.kvcache`) reads it
unchanged: weights live in HBM at 1 byte per value (plus 4 / block_size for the scales) and are
widened to the compute dtype next to their matmul, one layer at a time inside the layer scan.
The MoE dequantizes its three expert stacks before routing (`dequantize`), which also covers
the expert-parallel back end's `shard_map`.

Why hand-written, not qwix or AQT: qwix (0.1.8, checked) quantizes by intercepting the
`dot_general` / `einsum` / `ragged_dot` calls made inside the methods of a linen module it
wraps; the decoder's cached forward (`decode.kvcache.forward_chunk`) contracts the raw parameter
arrays outside any module, and the expert-parallel MoE contracts inside `shard_map`, so neither
would see quantized weights and both would need a second code path. A weight type that
dequantizes itself covers every path with one definition and leaves the parameter tree's
structure (and so its shardings) as it was. This is weight-only quantization: activations and
the KV cache stay in the compute dtype, and the matmuls run in it.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

QUANT_KINDS = ("int8", "fp8")
_STORAGE = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
_QMAX = {"int8": 127.0, "fp8": 448.0}

# Leaf name -> (rank of one layer's weight, its contraction axis). Stacked leaves carry a leading
# `layers` axis; the contraction axis is kept counted from the end, which both layouts share.
TARGETS = {
    "q_proj": (3, 0), "k_proj": (3, 0), "v_proj": (3, 0),  # [D, N|K, H]
    "o_proj": (3, 1),  # [N, H, D]: blocks along head_dim
    "gate_proj": (2, 0), "up_proj": (2, 0), "down_proj": (2, 0),  # [D, F], [F, D]
    "wi_gate": (3, 1), "wi_up": (3, 1), "wo": (3, 1),  # [E, D, F], [E, F, D]
}
_LAYER_GROUPS = ("dense_layers", "moe_layers")


@flax.struct.dataclass
class QArray:
    """A quantized weight: `value` (int8 / float8_e4m3fn, the weight's shape) and `scale` (fp32, the
    weight's shape with the contraction axis `axis` (negative) divided by the block size)."""

    value: jax.Array
    scale: jax.Array
    axis: int = flax.struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.value.shape

    @property
    def ndim(self) -> int:
        return self.value.ndim

    @property
    def block_size(self) -> int:
        return self.value.shape[self.axis] // self.scale.shape[self.axis]

    def astype(self, dtype) -> jax.Array:
        return dequantize(self, dtype)


def dequantize(w, dtype) -> jax.Array:
    """`w` in `dtype`: a `QArray` widened and scaled block by block, an array cast."""
    if not isinstance(w, QArray):
        return w.astype(dtype)
    a = w.value.ndim + w.axis
    shape = w.value.shape
    n = w.scale.shape[a]
    blocked = w.value.astype(dtype).reshape(shape[:a] + (n, shape[a] // n) + shape[a + 1:])
    return (blocked * jnp.expand_dims(w.scale.astype(dtype), a + 1)).reshape(shape)


def _block(size: int, block_size: int, where: str) -> int:
    blk = min(block_size, size)
    if size % blk:
        raise ValueError(f"quantize block_size: expected a divisor of {where}'s contraction dimension {size} "
                         f"(or a size >= it), found {block_size}")
    return blk


def quantize_array(w: jax.Array, kind: str, axis: int, block_size: int = 128, where: str = "weight") -> QArray:
    """`w` quantized to `kind` with one scale per `block_size` values along `axis`."""
    if kind not in QUANT_KINDS:
        raise ValueError(f"quantize: expected one of {QUANT_KINDS}, found {kind!r}")
    a = axis % w.ndim
    size = w.shape[a]
    blk = _block(size, block_size, where)
    wb = w.astype(jnp.float32).reshape(w.shape[:a] + (size // blk, blk) + w.shape[a + 1:])
    amax = jnp.max(jnp.abs(wb), axis=a + 1)
    scale = jnp.where(amax > 0, amax / _QMAX[kind], 1.0)
    q = wb / jnp.expand_dims(scale, a + 1)
    if kind == "int8":
        q = jnp.clip(jnp.round(q), -127, 127)
    q = q.astype(_STORAGE[kind]).reshape(w.shape)
    return QArray(value=q, scale=scale, axis=a - w.ndim)


def _path_names(path) -> list[str]:
    return [str(getattr(p, "key", getattr(p, "name", p))) for p in path]


def _target(path, leaf) -> Optional[int]:
    """The contraction axis (negative) of a leaf to quantize, or None."""
    names = _path_names(path)
    if not names or names[0] not in _LAYER_GROUPS or names[-1] not in TARGETS:
        return None
    rank, axis = TARGETS[names[-1]]
    return axis - rank


def quantized_shardings(qparams, shardings):
    """Shardings of `quantize_params`'s output from the input's: a value as its weight, a scale as
    its weight except along the contraction axis where the mesh axes do not divide the blocks."""

    def one(q, s):
        if not isinstance(q, QArray):
            return s
        if not isinstance(s, NamedSharding):
            return QArray(value=s, scale=s, axis=q.axis)
        spec = list(s.spec) + [None] * (q.value.ndim - len(s.spec))
        a = q.value.ndim + q.axis
        entry = spec[a]
        if entry is not None:
            names = entry if isinstance(entry, tuple) else (entry,)
            if q.scale.shape[a] % int(np.prod([s.mesh.shape[n] for n in names])):
                spec[a] = None
        return QArray(value=s, scale=NamedSharding(s.mesh, PartitionSpec(*spec)), axis=q.axis)

    return jax.tree_util.tree_map(one, qparams, shardings, is_leaf=lambda x: isinstance(x, QArray))


def quantize_params(params, kind: str, block_size: int = 128, *, shardings=None):
    """The parameter tree with the layers' projections as `QArray`s (see the module docstring).

    With `shardings` (the input's, a pytree of `NamedSharding`), leaf by leaf, each computed in
    its shards (the peak is one weight in fp32 beyond the inputs); without, one program."""
    if kind not in QUANT_KINDS:
        raise ValueError(f"quantize: expected one of {QUANT_KINDS}, found {kind!r}")
    def one(path, leaf):
        axis = _target(path, leaf)
        return leaf if axis is None else quantize_array(leaf, kind, axis, block_size, "/".join(_path_names(path)))

    if shardings is None:  # one program for the whole tree
        return jax.jit(lambda p: jax.tree_util.tree_map_with_path(one, p))(params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for (path, leaf), sh in zip(flat, jax.tree_util.tree_leaves(shardings)):
        if _target(path, leaf) is None:
            out.append(leaf)
            continue
        fn = lambda w, path=path: one(path, w)  # noqa: E731
        out.append(jax.jit(fn, out_shardings=quantized_shardings(jax.eval_shape(fn, leaf), sh))(leaf))
    return jax.tree_util.tree_unflatten(treedef, out)


def abstract_quantized(abstract_params, kind: str, block_size: int = 128):
    """`quantize_params` on `jax.ShapeDtypeStruct`s with shardings (ahead-of-time plans): the
    quantized tree's shapes, dtypes and shardings, nothing computed."""
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, abstract_params)
    q = jax.eval_shape(lambda p: quantize_params(p, kind, block_size), abstract_params)
    sh = quantized_shardings(q, shardings)
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), q, sh)


def stored_bytes(params) -> int:
    """Bytes of every array in a (possibly quantized) parameter tree."""
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(params)))


def is_quantized(params) -> bool:
    return any(isinstance(x, QArray) for x in jax.tree_util.tree_leaves(
        params, is_leaf=lambda x: isinstance(x, QArray)))


__all__ = ["QArray", "QUANT_KINDS", "TARGETS", "abstract_quantized", "dequantize", "is_quantized",
           "quantize_array", "quantize_params", "quantized_shardings", "stored_bytes"]
