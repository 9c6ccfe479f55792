"""Which attention kernel and MoE back end a run uses, chosen from the mesh it runs on.

`ModelConfig.attention_impl` and `ModelConfig.moe_impl` take "auto" (the run configs' default,
configs/common.py). `resolve(config, mesh)` replaces every "auto" by the choice for the mesh's
platform, read from its devices the way the ahead-of-time path reads a TPU topology's
(`llada_jax.aot`: a compile for a TPU slice on a CPU host resolves for the TPU). An explicit
value always wins. The rule (`choose`):

  platform  attention  MoE
  tpu       splash     expert_parallel with an `expert` mesh axis > 1, else ragged
  gpu       cudnn      tiled  (sorted rows in whole tiles of one expert each; never densifies)
  cpu       blocked    dense  (what the CPU configs use: XLA:CPU lowers ragged_dot to a masked
                               dense dot anyway, and the dense path is faster there)

Why `tiled` on GPU: XLA:GPU's default lowering of `jax.lax.ragged_dot` pads every group to the
whole row count and runs a dense batched matmul (openxla/xla#46000: 256 experts, top-8 is ~32x
the work), so `ragged` and `expert_parallel` (a `ragged_dot` over the local experts) densify
there, and `dense` runs every expert on every token by construction. `tiled` is plain XLA
(a gather and one batched matmul per projection), so it lowers the same on every backend.

`launcher.setup` resolves once at start-up and logs the choice; the resolved config is what the
trainer stores beside every checkpoint (`model_config` in the checkpoint's JSON). A config that
still says "auto" when it is traced (a library call without `resolve`) resolves the same way from
the abstract mesh in context (`jax.set_mesh`), else the default backend.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax

from llada_jax.model.config import ModelConfig

AUTO = "auto"
PLATFORMS = ("cpu", "gpu", "tpu")


class Backends(NamedTuple):
    attention: str
    moe: str


def normalize_platform(name: str) -> str:
    """'cuda' / 'rocm' -> 'gpu'; 'cpu', 'gpu', 'tpu' as they are."""
    plat = {"cuda": "gpu", "rocm": "gpu"}.get(name, name)
    if plat not in PLATFORMS:
        raise ValueError(f"platform: expected one of {PLATFORMS} (or cuda / rocm), found {name!r}")
    return plat


def choose(platform: str, expert_axis: int = 1) -> Backends:
    """The attention kernel and MoE back end for a `platform` and the size of the `expert` mesh axis."""
    plat = normalize_platform(platform)
    if not isinstance(expert_axis, int) or expert_axis < 1:
        raise ValueError(f"expert_axis: expected a positive integer, found {expert_axis!r}")
    if plat == "tpu":
        return Backends("splash", "expert_parallel" if expert_axis > 1 else "ragged")
    if plat == "gpu":
        return Backends("cudnn", "tiled")
    return Backends("blocked", "dense")


def mesh_platform(mesh=None) -> str:
    """The platform of `mesh`'s devices (a concrete or abstract mesh); without one, the abstract
    mesh in context, else the default backend."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return normalize_platform(jax.default_backend())
    if isinstance(mesh, jax.sharding.Mesh) and mesh.devices.size:  # concrete: its devices
        return normalize_platform(mesh.devices.flat[0].platform)
    dev = getattr(mesh, "abstract_device", None)  # abstract (under a trace): its device kind
    if dev is not None and getattr(dev, "platform", None):
        return normalize_platform(dev.platform)
    return normalize_platform(jax.default_backend())


def expert_axis_size(mesh=None) -> int:
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return 1
    return int(dict(mesh.shape).get("expert", 1))


def resolve(config: ModelConfig, mesh=None, *, platform: Optional[str] = None) -> ModelConfig:
    """`config` with every "auto" back end replaced by `choose(platform of mesh, its expert axis)`;
    explicit values are kept."""
    if config.attention_impl != AUTO and config.moe_impl != AUTO:
        return config
    pick = choose(platform or mesh_platform(mesh), expert_axis_size(mesh))
    return config.replace(attention_impl=pick.attention if config.attention_impl == AUTO else config.attention_impl,
                          moe_impl=pick.moe if config.moe_impl == AUTO else config.moe_impl)


def describe(config: ModelConfig, mesh=None) -> str:
    """One line for the start-up log."""
    plat = mesh_platform(mesh)
    return (f"backends: attention_impl={config.attention_impl}, moe_impl={config.moe_impl} "
            f"(platform {plat}, expert axis {expert_axis_size(mesh)})")
