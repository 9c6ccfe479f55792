"""Logical axis names -> device mesh, in one table (the MaxText pattern).

Model code names axes logically (`embed`, `heads`, `exp`, `act_batch`, ...); this module is
the only place that names mesh axes. The mesh has four axes, `data, fsdp, tensor, expert`:

  data    pure data parallelism: the batch is split, parameters are replicated
  fsdp    the batch is split and parameters are sharded on their `embed` dimension (ZeRO-3)
  tensor  heads, MLP widths and the vocabulary are split (Megatron-style)
  expert  routed experts are split; other weights shard `embed` over it too, so nothing large
          is replicated on an expert-parallel mesh

A rule maps a logical name to a tuple of mesh axes tried in order. A mesh axis is used for a
dimension only if it divides that dimension and is not already used by an earlier dimension of
the same array, so one table serves every preset (e.g. 2 kv heads on a 4-way tensor axis stay
replicated instead of failing).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

Rules = Sequence[tuple[str, Optional[tuple[str, ...]]]]

DEFAULT_RULES: Rules = (
    # parameters
    ("vocab", ("tensor",)),
    ("embed", ("fsdp", "expert")),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", None),
    ("mlp", ("tensor",)),
    ("exp", ("expert",)),
    ("expert_mlp", ("tensor",)),
    ("router_exp", None),
    ("norm", None),
    ("layers", None),
    ("lora_rank", None),  # the rank axis of LoRA adapters (model.lora): small, replicated
    # activations
    ("act_batch", ("data", "fsdp", "expert")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", ("tensor",)),
    ("act_kv_heads", ("tensor",)),
    ("act_mlp", ("tensor",)),
    ("act_vocab", ("tensor",)),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, expert: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A `data x fsdp x tensor x expert` mesh; one axis may be -1 (all remaining devices)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, found {free}")
    for k, v in sizes.items():
        if v != -1 and (not isinstance(v, int) or v < 1):
            raise ValueError(f"mesh.{k}: expected a positive integer or -1, found {v!r}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by the fixed axes' product {fixed}")
        sizes[free[0]] = len(devices) // fixed
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ValueError(f"mesh: axes {sizes} need {total} devices, found {len(devices)}")
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(names: Iterable[Optional[str]], shape: Sequence[int], mesh_shape: dict,
                    rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    """The PartitionSpec for an array with these logical axis names and this shape."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        chosen = []
        if name is not None:
            if name not in table:
                raise KeyError(f"sharding rules: no rule for logical axis {name!r}")
            prod = 1
            for axis in table[name] or ():
                n = mesh_shape.get(axis, 1)
                if axis in used or n == 1 or size % (prod * n):
                    continue
                chosen.append(axis)
                prod *= n
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return PartitionSpec(*spec)


def _is_boxed(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def param_shardings(abstract_boxed_params, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings (an unboxed pytree) for boxed abstract params from `model.abstract_params`."""
    mesh_shape = dict(mesh.shape)

    def one(x):
        if _is_boxed(x):
            value = x.value
            return NamedSharding(mesh, logical_to_spec(x.names, value.shape, mesh_shape, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map(one, abstract_boxed_params, is_leaf=_is_boxed)


def logical_sharding(names: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                     rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """A NamedSharding for one array (batches, caches) named with logical axes."""
    return NamedSharding(mesh, logical_to_spec(names, shape, dict(mesh.shape), rules))


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
    """`with_sharding_constraint` by logical names, under the rules of `nn.logical_axis_rules`
    and the mesh of `jax.set_mesh`. A no-op outside a mesh, so single-device code is unchanged."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    rules = nn.get_logical_axis_rules() or DEFAULT_RULES
    spec = logical_to_spec(names, x.shape, dict(mesh.shape), rules)
    return jax.lax.with_sharding_constraint(x, spec)


def replicated_bytes(params, min_bytes: int = 0) -> dict[str, int]:
    """Bytes per parameter leaf that is fully replicated on a multi-device mesh (for audits/tests)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        nbytes = leaf.size * leaf.dtype.itemsize
        if nbytes >= min_bytes and len(leaf.sharding.device_set) > 1 and leaf.sharding.is_fully_replicated:
            out["/".join(str(getattr(p, "key", p)) for p in path)] = nbytes
    return out
