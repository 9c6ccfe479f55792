"""Hugging Face checkpoint I/O: the official safetensors layout <-> this project's parameters.

All HF conversion lives here (REFERENCE §1, "Checkpoints"). Torch `nn.Linear` weights are
`[out, in]`; ours are `[in, ...out]`, experts stacked `[E, ...]` and layers stacked on a
leading `layers` axis per group (dense / MoE). The fused `query_key_value` rows are
Q heads | K heads | V heads; we keep three kernels so that heads shard cleanly.

Loading streams one parameter leaf at a time: a leaf's buffer is filled from the tensors
it needs, placed on device, and released before the next, so the host never holds a second
copy of the model. With `shardings` (the run's mesh), each process reads only the slices its
devices hold (`jax.make_array_from_callback` over safetensors `get_slice`): on a pod, no host
reads or holds the whole model.

Saving walks the HF tensors in checkpoint order and writes one safetensors shard at a time.
Parameters split over several processes are brought to the host tensor by tensor (a
replicated slice, one collective per tensor that every process runs in the same order) and
process 0 alone writes the files.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import tempfile
from typing import Callable, Iterable, Optional, Sequence

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from llada_jax.model.config import FP32_PARAMS, ModelConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # non-persistent buffers some exporters still write


class CheckpointError(ValueError):
    """A checkpoint does not match the config: the message names the key, expected and found."""


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One HF tensor (or a row slice of it) <-> one slice of one parameter leaf."""

    hf_key: str
    hf_shape: tuple
    leaf: tuple  # path in the params tree
    index: tuple  # index into the leaf (layer, expert) where this tensor goes
    rows: Optional[tuple] = None  # (start, stop) row slice of the HF tensor (fused QKV)
    kind: str = "t"  # how to turn HF [out, in] into ours: see _to_flax / _from_flax
    heads: int = 0  # for reshapes that split a head axis


def _to_flax(e: _Entry, w: np.ndarray, head_dim: int) -> np.ndarray:
    if e.rows is not None:
        w = w[e.rows[0]:e.rows[1]]
    if e.kind == "id":
        return w
    if e.kind == "t":  # [out, in] -> [in, out]
        return w.T
    if e.kind == "in_heads":  # [N*H, D] -> [D, N, H]
        return w.reshape(e.heads, head_dim, -1).transpose(2, 0, 1)
    if e.kind == "out_heads":  # [D, N*H] -> [N, H, D]
        return w.T.reshape(e.heads, head_dim, -1)
    raise AssertionError(e.kind)


def _from_flax(e: _Entry, w: np.ndarray) -> np.ndarray:
    if e.kind == "id":
        return w
    if e.kind == "t":
        return w.T
    if e.kind == "in_heads":  # [D, N, H] -> [N*H, D]
        return w.transpose(1, 2, 0).reshape(-1, w.shape[0])
    if e.kind == "out_heads":  # [N, H, D] -> [D, N*H]
        return w.reshape(-1, w.shape[-1]).T
    raise AssertionError(e.kind)


def _entries(c: ModelConfig) -> list[_Entry]:
    """The complete key map, in checkpoint order."""
    d, h, n, k = c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads
    out = [_Entry("model.word_embeddings.weight", (c.vocab_size, d), ("embed",), (), kind="id")]
    for i in range(c.num_layers):
        moe = i >= c.num_dense_layers
        grp = "moe_layers" if moe else "dense_layers"
        j = i - c.num_dense_layers if moe else i
        p = f"model.layers.{i}."
        qkv = (p + "attention.query_key_value.weight", ((n + 2 * k) * h, d))
        out += [
            _Entry(p + "input_layernorm.weight", (d,), (grp, "input_norm", "scale"), (j,), kind="id"),
            _Entry(*qkv, (grp, "attn", "q_proj"), (j,), rows=(0, n * h), kind="in_heads", heads=n),
            _Entry(*qkv, (grp, "attn", "k_proj"), (j,), rows=(n * h, (n + k) * h), kind="in_heads", heads=k),
            _Entry(*qkv, (grp, "attn", "v_proj"), (j,), rows=((n + k) * h, (n + 2 * k) * h), kind="in_heads", heads=k),
            _Entry(p + "attention.query_layernorm.weight", (h,), (grp, "attn", "q_norm", "scale"), (j,), kind="id"),
            _Entry(p + "attention.key_layernorm.weight", (h,), (grp, "attn", "k_norm", "scale"), (j,), kind="id"),
            _Entry(p + "attention.dense.weight", (d, n * h), (grp, "attn", "o_proj"), (j,), kind="out_heads", heads=n),
            _Entry(p + "post_attention_layernorm.weight", (d,), (grp, "post_attn_norm", "scale"), (j,), kind="id"),
        ]
        if not moe:
            f = c.intermediate_size
            for name, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
                out.append(_Entry(p + f"mlp.{name}.weight", shape, (grp, "mlp", name), (j,)))
            continue
        e_, f = c.num_experts, c.moe_intermediate_size
        out += [
            _Entry(p + "mlp.gate.weight", (e_, d), (grp, "moe", "router"), (j,)),
            _Entry(p + "mlp.gate.expert_bias", (e_,), (grp, "moe", "expert_bias"), (j,), kind="id"),
        ]
        for e in range(e_):
            q = p + f"mlp.experts.{e}."
            out += [
                _Entry(q + "gate_proj.weight", (f, d), (grp, "moe", "wi_gate"), (j, e)),
                _Entry(q + "up_proj.weight", (f, d), (grp, "moe", "wi_up"), (j, e)),
                _Entry(q + "down_proj.weight", (d, f), (grp, "moe", "wo"), (j, e)),
            ]
        if c.num_shared_experts:
            fs = c.shared_intermediate_size
            for name, shape in (("gate_proj", (fs, d)), ("up_proj", (fs, d)), ("down_proj", (d, fs))):
                out.append(_Entry(p + f"mlp.shared_experts.{name}.weight", shape, (grp, "moe", "shared", name), (j,)))
    out += [
        _Entry("model.norm.weight", (d,), ("final_norm", "scale"), (), kind="id"),
        _Entry("lm_head.weight", (c.vocab_size, d), ("lm_head",), ()),
    ]
    return out


def hf_keys(config: ModelConfig) -> dict[str, tuple]:
    """Every HF tensor name of this architecture, with its shape (the reference key set)."""
    return {e.hf_key: e.hf_shape for e in _entries(config)}


def _leaf_shapes(config: ModelConfig) -> dict[tuple, jax.ShapeDtypeStruct]:
    import flax.linen as nn

    from llada_jax.model.transformer import abstract_params

    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract_params(config)))[0]
    return {tuple(p.key for p in path): v for path, v in flat}


def _fp32_leaf(leaf: tuple) -> bool:
    return leaf[-1] in FP32_PARAMS  # router is fp32 throughout (REFERENCE §1)


# ---------------------------------------------------------------------------- reading
class _Reader:
    """Opens the single file or the shards of an index lazily; reads one tensor at a time."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX_NAME)
        single = os.path.join(path, SINGLE_NAME)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: expected a 'weight_map' object, found {type(weight_map).__name__}")
            self.files = dict(weight_map)
            for shard in sorted(set(self.files.values())):
                if not os.path.exists(os.path.join(path, shard)):
                    raise CheckpointError(f"{index}: shard {shard!r} is listed but missing from {path}")
        elif os.path.exists(single):
            self.files = {}
            with self._open(SINGLE_NAME) as f:
                for key in f.keys():
                    self.files[key] = SINGLE_NAME
        else:
            raise FileNotFoundError(f"no {SINGLE_NAME} or {INDEX_NAME} in {path}")
        self._handles = {}
        self._last = (None, None)

    def _open(self, name):
        try:
            return safe_open(os.path.join(self.path, name), framework="numpy")
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{os.path.join(self.path, name)}: cannot read safetensors file ({err})") from err

    def shape(self, key):
        h = self._handle(self.files[key])
        return tuple(h.get_slice(key).get_shape())

    def _handle(self, name):
        if name not in self._handles:
            self._handles[name] = self._open(name).__enter__()
        return self._handles[name]

    def slice(self, key, index: tuple) -> np.ndarray:
        """`tensor[index]` (a tuple of slices) read from the file without the rest of the tensor.

        The file is opened for this read only: safetensors maps it into memory, and the pages a
        strided slice touches would otherwise stay resident in this process until the end of the
        load (on a host loading its slices of every tensor, most of the checkpoint)."""
        try:
            with self._open(self.files[key]) as f:
                return np.array(f.get_slice(key)[index])
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"{key}: cannot read slice {index} from {self.files[key]} ({err})") from err

    def get(self, key) -> np.ndarray:
        if self._last[0] != key:  # the fused QKV tensor serves three leaves in a row
            try:
                self._last = (key, self._handle(self.files[key]).get_tensor(key))
            except CheckpointError:
                raise
            except Exception as err:
                raise CheckpointError(f"{key}: cannot read tensor from {self.files[key]} ({err})") from err
        return self._last[1]

    def close(self):
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()


def _slice_bounds(sl: slice, size: int) -> tuple[int, int]:
    start, stop, step = sl.indices(size)
    if step != 1:
        raise ValueError(f"strided shard index {sl}")
    return start, stop


def _read_entry_slice(reader: "_Reader", e: _Entry, sub: tuple, shape: tuple, head_dim: int) -> np.ndarray:
    """`_to_flax(e, tensor)[sub]` reading only the part of the HF tensor it needs. `sub` has one
    slice per dimension of the converted tensor, whose shape is `shape`."""
    bounds = [_slice_bounds(sl, n) for sl, n in zip(sub, shape)]
    r0 = e.rows[0] if e.rows is not None else 0
    if e.kind == "id":
        (a, b), *rest = bounds
        return reader.slice(e.hf_key, (slice(r0 + a, r0 + b),) + tuple(slice(*x) for x in rest))
    if e.kind == "t":  # ours [in, out] = HF [out, in].T
        (i0, i1), (o0, o1) = bounds
        return reader.slice(e.hf_key, (slice(r0 + o0, r0 + o1), slice(i0, i1))).T
    if e.kind == "in_heads":  # ours [D, N, H]; HF rows n * H + h, columns d
        (d0, d1), (n0, n1), (h0, h1) = bounds
        w = reader.slice(e.hf_key, (slice(r0 + n0 * head_dim, r0 + n1 * head_dim), slice(d0, d1)))
        return w.reshape(n1 - n0, head_dim, d1 - d0).transpose(2, 0, 1)[:, :, h0:h1]
    if e.kind == "out_heads":  # ours [N, H, D]; HF [D, N * H]
        (n0, n1), (h0, h1), (d0, d1) = bounds
        w = reader.slice(e.hf_key, (slice(d0, d1), slice(n0 * head_dim, n1 * head_dim)))
        return w.T.reshape(n1 - n0, head_dim, d1 - d0)[:, h0:h1, :]
    raise AssertionError(e.kind)


def _leaf_slice(reader: "_Reader", group: list[_Entry], shape: tuple, index: tuple, dt, head_dim: int) -> np.ndarray:
    """`leaf[index]` of a parameter leaf assembled from the HF tensors of `group`, reading only
    the slices that fall inside `index` (what one device of a sharded array holds)."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    bounds = [_slice_bounds(sl, n) for sl, n in zip(index, shape)]
    out = np.empty(tuple(b - a for a, b in bounds), dt)
    for e in group:
        lead = len(e.index)  # the leaf's leading (layer, expert) positions this tensor fills
        if any(not a <= i < b for i, (a, b) in zip(e.index, bounds)):
            continue
        dst = tuple(i - a for i, (a, _) in zip(e.index, bounds))
        out[dst] = _read_entry_slice(reader, e, index[lead:], shape[lead:], head_dim).astype(dt)
    return out


def hf_param_dtype(path: str | os.PathLike) -> Optional[str]:
    """The checkpoint's stored dtype (`torch_dtype` in config.json), or None if it does not say."""
    cfg_path = os.path.join(os.fspath(path), "config.json")
    if not os.path.exists(cfg_path):
        return None
    with open(cfg_path) as f:
        stored = json.load(f).get("torch_dtype")
    if stored is None:
        return None
    if stored not in ("float32", "bfloat16", "float16"):
        raise CheckpointError(f"{cfg_path}: torch_dtype: expected float32, bfloat16 or float16, found {stored!r}")
    return stored


def _suggest_pattern(names: list[str]) -> str:
    """A glob covering the first name with its numeric parts (layer, expert) as `*`."""
    return ".".join("*" if part.isdigit() else part for part in names[0].split("."))


def load_hf_checkpoint(path: str | os.PathLike, dtype=None, *, shardings=None,
                       config: Optional[ModelConfig] = None,
                       progress: Optional[Callable[[str], None]] = None,
                       ignore: Sequence[str] = ()):
    """Loads an HF directory (config.json + model.safetensors or a sharded index).

    Returns `(config, params)`. `dtype` sets the parameter dtype (default: the checkpoint's
    `torch_dtype`, else `config.param_dtype`); the router stays fp32. Without `config`, the
    returned config computes in that dtype too (activations and KV cache in the release's bf16);
    a given `config` keeps its compute dtype (training's mixed precision). `shardings`, a pytree of
    `jax.sharding.Sharding` matching the params (e.g. `sharding.param_shardings` on the run's
    mesh): each leaf becomes a global array of which every process reads only the slices its
    devices hold. Without it, each leaf is read whole onto the default device.
    `progress(name)` is called after each leaf. `ignore`: glob patterns (`fnmatch`) of tensors the
    file may hold beyond the architecture's, skipped (e.g. `("model.layers.*.mlp.gate.bias",)`
    for an exporter's extra router bias); any other tensor the config does not expect is an error
    that names it and suggests a pattern. Expected tensors are always loaded.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    from_file = config is None
    if from_file:
        config = ModelConfig.from_hf_config(path)
    dtype = dtype if dtype is not None else hf_param_dtype(path)
    if dtype is not None:
        config = config.replace(param_dtype=jax.numpy.dtype(dtype).name)
        if from_file:  # the release's dtype is its compute dtype too (a given `config` keeps its own)
            config = config.replace(dtype=config.param_dtype)
    entries = _entries(config)
    reader = _Reader(path)
    try:
        expected = {e.hf_key: e.hf_shape for e in entries}
        found = {k for k in reader.files if not k.endswith(_IGNORED_SUFFIXES)}
        missing = sorted(set(expected) - found)
        if missing:
            k = missing[0]
            raise CheckpointError(f"{path}: missing tensor {k!r} (expected shape {expected[k]}); "
                                  f"{len(missing)} missing in all")
        unexpected = sorted(k for k in found - set(expected)
                            if not any(fnmatch.fnmatchcase(k, pattern) for pattern in ignore))
        if unexpected:
            raise CheckpointError(
                f"{path}: unexpected tensor {unexpected[0]!r} (shape {reader.shape(unexpected[0])}); "
                f"{len(unexpected)} unexpected in all: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. "
                f"If config.json matches the weights and these are extras, skip them with "
                f"ignore=({_suggest_pattern(unexpected)!r},) (launch/convert.py "
                f"--ignore={_suggest_pattern(unexpected)})")
        for k, shape in expected.items():
            got = reader.shape(k)
            if got != tuple(shape):
                raise CheckpointError(f"{k}: expected shape {tuple(shape)}, found {got}")

        leaf_shapes = _leaf_shapes(config)
        by_leaf: dict[tuple, list[_Entry]] = {}
        for e in entries:
            by_leaf.setdefault(e.leaf, []).append(e)
        flat_shardings = _flatten_paths(shardings) if shardings is not None else {}
        leaves = {}
        # Visit leaves in checkpoint order so the reader's one-tensor cache serves fused QKV.
        for leaf, group in by_leaf.items():
            spec = leaf_shapes[leaf]
            dt = np.float32 if _fp32_leaf(leaf) else jax.numpy.dtype(config.param_dtype)
            if flat_shardings.get(leaf) is not None:
                leaves[leaf] = jax.make_array_from_callback(
                    spec.shape, flat_shardings[leaf],
                    lambda index, group=group, shape=spec.shape, dt=dt: _leaf_slice(
                        reader, group, shape, index, dt, config.head_dim))
                if progress:
                    progress("/".join(leaf))
                continue
            buf = np.empty(spec.shape, dt)
            for e in group:
                buf[e.index] = _to_flax(e, reader.get(e.hf_key), config.head_dim).astype(dt)
            leaves[leaf] = jax.device_put(buf, flat_shardings.get(leaf))
            del buf
            if progress:
                progress("/".join(leaf))
    finally:
        reader.close()
    return config, _unflatten_paths(leaves)


def _flatten_paths(tree) -> dict[tuple, object]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]
    return {tuple(p.key for p in path): v for path, v in flat}


def _unflatten_paths(leaves: dict[tuple, object]) -> dict:
    out: dict = {}
    for path, v in leaves.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


# ---------------------------------------------------------------------------- writing
_REPLICATED_SLICE: dict = {}  # one jitted slice-and-replicate per mesh


def _host_slice(leaf, index: tuple) -> np.ndarray:
    """`leaf[index]` (leading integer indices: layer, expert) as a numpy array on this process.

    A global array that this process does not hold whole (split over several processes) is
    sliced on device and the slice replicated, a collective: every process must ask for the
    same slices in the same order."""
    if getattr(leaf, "is_fully_addressable", True):
        return np.asarray(jax.device_get(leaf[index]))
    mesh = leaf.sharding.mesh
    if mesh not in _REPLICATED_SLICE:
        def take(x, idx):
            for k in range(idx.shape[0]):
                x = jax.lax.dynamic_index_in_dim(x, idx[k], 0, keepdims=False)
            return x

        _REPLICATED_SLICE[mesh] = jax.jit(take, out_shardings=jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec()))
    out = _REPLICATED_SLICE[mesh](leaf, np.asarray(index, np.int32).reshape(len(index)))
    return np.asarray(out.addressable_data(0))


def _hf_tensors(config: ModelConfig, params, dtype) -> Iterable[tuple[str, Callable[[], np.ndarray], int]]:
    """(key, thunk producing the tensor, nbytes) in checkpoint order; fused QKV re-assembled."""
    flat = _flatten_paths(params)
    entries = _entries(config)
    grouped: dict[str, list[_Entry]] = {}
    for e in entries:
        grouped.setdefault(e.hf_key, []).append(e)
    for key, group in grouped.items():
        out_dt = np.float32 if key.endswith("expert_bias") else dtype

        def make(group=group, out_dt=out_dt):
            parts = [_from_flax(e, _host_slice(flat[e.leaf], e.index)) for e in group]
            return np.ascontiguousarray(np.concatenate(parts, 0) if len(parts) > 1 else parts[0]).astype(out_dt)

        yield key, make, int(np.prod(group[0].hf_shape)) * np.dtype(out_dt).itemsize


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_hf_checkpoint(path: str | os.PathLike, config: ModelConfig, params, *, dtype=None,
                       max_shard_bytes: int = 5 * 2**30,
                       progress: Optional[Callable[[str], None]] = None) -> list[str]:
    """Writes `config.json` and safetensors in the official layout (the PyTorch code loads it).

    Shards above `max_shard_bytes` (`model-0000k-of-0000n.safetensors` + index). Each file
    is written to a temporary name and renamed, so a killed save leaves no partial file.
    `dtype` defaults to the parameter dtype; `expert_bias` is always written fp32.
    `params` may be global arrays split over several processes: every process calls this
    alike (the tensors are gathered), process 0 writes, and all return once the files are
    there. Returns the written file names.
    """
    from llada_jax.parallel import hosts

    primary = hosts.is_primary()
    path = os.fspath(path)
    if primary:
        os.makedirs(path, exist_ok=True)
    dtype = np.dtype(jax.numpy.dtype(dtype or config.param_dtype))
    tensors = list(_hf_tensors(config, params, dtype))
    shards: list[list] = [[]]
    size = 0
    for item in tensors:
        if shards[-1] and size + item[2] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[2]
    n = len(shards)
    names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for name, shard in zip(names, shards):
        data = {key: make() for key, make, _ in shard}
        if primary:
            _atomic_write(os.path.join(path, name),
                          lambda tmp, data=data: save_file(data, tmp, metadata={"format": "pt"}))
        weight_map.update({key: name for key in data})
        del data
        if progress:
            progress(name)
    hf_cfg = config.to_hf_config()
    hf_cfg["torch_dtype"] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[dtype.name]

    def dump(obj):
        return lambda tmp: open(tmp, "w").write(json.dumps(obj, indent=2) + "\n")

    if primary:
        if n > 1:
            total = sum(item[2] for item in tensors)
            _atomic_write(os.path.join(path, INDEX_NAME),
                          dump({"metadata": {"total_size": total}, "weight_map": weight_map}))
        _atomic_write(os.path.join(path, "config.json"), dump(hf_cfg))
    hosts.barrier("save_hf_checkpoint")
    return names + ([INDEX_NAME] if n > 1 else []) + ["config.json"]
