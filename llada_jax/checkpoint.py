"""All Orbax checkpoint I/O, in one module.

A run directory holds numbered steps written by an Orbax `CheckpointManager`; each step has
  state     the train state pytree (params, optimizer state, step, RNG key data)
  extra     JSON: the data-iterator state, the model config and anything else small
Orbax writes each step to a temporary directory and renames it when complete, so a killed run
never leaves a half-written step that a restore would pick up. Restores take the target
shardings, so a checkpoint written on one mesh restores on another.

Params-only checkpoints (what `launch/convert.py` writes) use the same layout with an empty
optimizer state, so one reader serves both.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from llada_jax.config import ModelConfig


class IncompatibleCheckpointError(ValueError):
    """The checkpoint was written for another model: the message names the differing field."""


_ARCH_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)
                if f.name not in ("dtype", "param_dtype", "moe_impl", "remat_policy", "remat_save",
                                  "attention_impl", "logits_chunk")]


def config_to_json(config: ModelConfig) -> dict:
    return dataclasses.asdict(config)


def check_compatible(saved: dict, config: ModelConfig, where: str) -> None:
    """Raises if the architecture stored with a checkpoint differs from `config`."""
    for name in _ARCH_FIELDS:
        if name in saved and saved[name] != getattr(config, name):
            raise IncompatibleCheckpointError(
                f"{where}: checkpoint has {name}={saved[name]!r}, the config expects {getattr(config, name)!r}")


class Checkpointer:
    """Numbered, atomic checkpoints of (state, extra JSON); keeps the last `max_to_keep`."""

    def __init__(self, directory: str, max_to_keep: int = 3, save_interval_steps: int = 1,
                 enable_async: bool = False):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True,
            enable_async_checkpointing=enable_async)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "extra"))

    def latest_step(self) -> Optional[int]:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, state: Any, extra: Optional[dict] = None, force: bool = False) -> bool:
        """Saves if `step` is on the save interval (or `force`). Returns whether it saved."""
        return self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra or {})), force=force)

    def restore(self, abstract_state: Any, step: Optional[int] = None,
                config: Optional[ModelConfig] = None) -> tuple[Any, dict]:
        """Restores `(state, extra)` at `step` (default: latest) into `abstract_state`'s structure,
        shapes, dtypes and shardings (a pytree of `jax.ShapeDtypeStruct` with `.sharding`)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        extra = self._mngr.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"]
        if config is not None and "model_config" in extra:
            check_compatible(extra["model_config"], config, f"{self.directory} step {step}")
        try:
            restored = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        except (ValueError, KeyError) as err:
            raise IncompatibleCheckpointError(
                f"{self.directory} step {step}: the stored state does not match the expected structure ({err})") from err
        return restored["state"], extra

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def abstract_with_shardings(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs (with shardings, if given) for a pytree of arrays or abstract values."""
    if shardings is None:
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                     sharding=getattr(x, "sharding", None)), tree)
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def save_params(directory: str, config: ModelConfig, params: Any, step: int = 0) -> None:
    """A params-only checkpoint (what the converter writes)."""
    ckpt = Checkpointer(directory, max_to_keep=1)
    ckpt.save(step, {"params": params}, extra={"model_config": config_to_json(config)}, force=True)
    ckpt.close()


def load_params(directory: str, config: Optional[ModelConfig] = None, shardings: Any = None,
                step: Optional[int] = None) -> tuple[ModelConfig, Any]:
    """Params from a params-only or a full training checkpoint. The config is read from the
    checkpoint when not given; given, it is checked against the stored one."""
    from llada_jax.model import abstract_params
    from flax import linen as nn

    ckpt = Checkpointer(directory)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {os.path.abspath(directory)}")
        extra = ckpt._mngr.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"]
        saved = extra.get("model_config")
        if config is None:
            if saved is None:
                raise IncompatibleCheckpointError(f"{directory}: no model_config stored; pass a config")
            config = ModelConfig(**saved)
        elif saved is not None:
            check_compatible(saved, config, f"{directory} step {step}")
        abstract = nn.meta.unbox(abstract_params(config))
        if shardings is None:  # one device, explicitly (Orbax would otherwise read the saved topology)
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree_util.tree_map(lambda _: one, abstract)
        target = {"params": abstract_with_shardings(abstract, shardings)}
        # A training checkpoint stores more than params; restore only the params subtree.
        restored = ckpt._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                         restore_args=ocp.checkpoint_utils.construct_restore_args(target))))
        return config, restored["state"]["params"]
    finally:
        ckpt.close()
