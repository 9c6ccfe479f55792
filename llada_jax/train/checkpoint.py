"""All Orbax checkpoint I/O, in one module.

A run directory holds numbered steps written by an Orbax `CheckpointManager`; each step has
  state     the train state pytree (params, optimizer state, step, RNG key data)
  extra     JSON: the model config, the run config and anything else small (written by process 0)
  data      one JSON file per process, `process_<i>-of-<n>.json`: that process's data-iterator
            state (each host reads its own rows, so each has its own position)
Every process takes part in a save and a restore (Orbax writes each array's shards from the
process that holds them). Orbax writes each step to a temporary directory and renames it when
complete, so a killed run never leaves a half-written step that a restore would pick up.
Restores take the target shardings, so a checkpoint written on one mesh, or by N processes,
restores on another mesh, or on M processes (`remap_data_states` carries the data position over).
Saving can be asynchronous (the arrays are copied to host memory, the step goes on while they
are written): on by default for states above `ASYNC_ABOVE_BYTES`.

Params-only checkpoints (what `launch/convert.py` writes) use the same layout with an empty
optimizer state, so one reader serves both.

Directories may be local paths or URLs (gs:// and whatever etils.epath and TensorStore read):
`as_path` makes local paths absolute and leaves URLs as written.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from llada_jax.model.config import ModelConfig


def is_url(path: Any) -> bool:
    """A path with a scheme (gs://, s3://, ...): kept as written, never made absolute."""
    return "://" in os.fspath(path)


def as_path(path: Any) -> epath.Path:
    """An `epath.Path` for a local path (made absolute) or a URL that etils.epath understands
    (gs:// and the rest, unchanged: `os.path.abspath("gs://b/x")` would make it a local path)."""
    return epath.Path(path) if is_url(path) else epath.Path(os.path.abspath(os.fspath(path)))


class IncompatibleCheckpointError(ValueError):
    """The checkpoint was written for another model: the message names the differing field."""


class UnreadableCheckpointError(RuntimeError):
    """A checkpoint whose files cannot be read back (a corrupt array file, truncated metadata): the
    message names the step and the first line of the underlying error."""


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ or err.__context__
    return err


def _one_line(err: BaseException, limit: int = 300) -> str:
    """The innermost error of a chain, on one line (TensorStore's outer errors print kilobytes of spec)."""
    root = _root_cause(err)
    text = " ".join(str(root).split()) or type(root).__name__
    return f"{type(root).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _unreadable(where: str, err: BaseException) -> UnreadableCheckpointError:
    return UnreadableCheckpointError(f"{where}: cannot be read ({_one_line(err)})")


_ARCH_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)
                if f.name not in ("dtype", "param_dtype", "moe_impl", "moe_tile", "remat_policy", "remat_save",
                                  "attention_impl", "logits_chunk")]


def config_to_json(config: ModelConfig) -> dict:
    return dataclasses.asdict(config)


def check_compatible(saved: dict, config: ModelConfig, where: str) -> None:
    """Raises if the architecture stored with a checkpoint differs from `config`."""
    for name in _ARCH_FIELDS:
        if name in saved and saved[name] != getattr(config, name):
            raise IncompatibleCheckpointError(
                f"{where}: checkpoint has {name}={saved[name]!r}, the config expects {getattr(config, name)!r}")


# States this big are saved asynchronously unless asked otherwise (a synchronous save of a
# 100B model's train state would stall every host for minutes at each checkpoint).
ASYNC_ABOVE_BYTES = 2 * 2**30
# Orbax's replica-parallel saving splits every replicated shard among its replicas, each writing
# its slice; cutting one is a `lax.slice` on the device, compiled once per distinct shape. For
# the small arrays of a model (norms, biases, the router, small embeddings) that is hundreds of
# compilations at a run's first save (measured: 10 s of a 26 s quickstart-sized run on 8 CPU
# devices) to split writes of a few KiB. Arrays whose per-replica slice is smaller than this are
# written whole by one replica; large ones are still split across replicas (and hosts).
MIN_REPLICA_SLICE_BYTES = 4 * 2**20


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """The train state's handler: Orbax's default type handlers, the jax.Array one with
    `min_slice_bytes_for_replica_parallel = MIN_REPLICA_SLICE_BYTES` (a copy of Orbax's own, so
    its metadata store, replica id and dispatcher stay Orbax's defaults)."""
    handlers = []
    for ty in ocp.type_handlers.supported_types():
        handler = ocp.type_handlers.get_type_handler(ty)
        if ty is jax.Array:
            handler = copy.copy(handler)
            if not hasattr(handler, "_min_slice_bytes_for_replica_parallel"):  # a newer Orbax renamed it
                logging.warning("orbax ArrayHandler has no _min_slice_bytes_for_replica_parallel: saves slice "
                                "every replicated array (slow first saves, same files)")
            handler._min_slice_bytes_for_replica_parallel = MIN_REPLICA_SLICE_BYTES
        handlers.append((ty, handler))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=ocp.type_handlers.create_type_handler_registry(*handlers))


def _restore_args(abstract_state: Any):
    """`PyTreeRestore` of a pytree of `jax.ShapeDtypeStruct`s with shardings (what `StandardRestore` does)."""
    return ocp.args.PyTreeRestore(item=abstract_state,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))


class ProcessStateHandler(ocp.CheckpointHandler):
    """A small JSON state per process (`process_<i>-of-<n>.json`): the data-iterator position.

    Restoring returns `{process_index: state}` of every file of the count that wrote the step,
    so a run on another number of processes can map the positions over (`remap_data_states`)."""

    _NAME = re.compile(r"process_(\d+)-of-(\d+)\.json$")

    def save(self, directory: epath.Path, args: "ProcessStateSave") -> None:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (epath.Path(directory) / name).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: "ProcessStateRestore" = None) -> dict[int, Any]:
        out, counts = {}, set()
        for path in epath.Path(directory).glob("process_*-of-*.json"):  # local or a URL
            m = self._NAME.search(path.name)
            if m:
                out[int(m.group(1))] = json.loads(path.read_text())
                counts.add(int(m.group(2)))
        if len(counts) > 1 or (counts and len(out) != counts.pop()):
            raise IncompatibleCheckpointError(f"{directory}: per-process states are incomplete or mixed ({sorted(out)})")
        return out

    def structure(self, directory):
        return None

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(ProcessStateHandler, for_save=True)
@dataclasses.dataclass
class ProcessStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(ProcessStateHandler, for_restore=True)
@dataclasses.dataclass
class ProcessStateRestore(ocp.args.CheckpointArgs):
    pass


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """uint32 sum of (bits of each element) x (2 * flat index + 1), modulo 2^32: integer sums, so
    the same on any mesh and in any reduction order; a changed element changes it."""
    import jax.numpy as jnp

    x = jnp.asarray(x)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    # 1- and 2-byte elements widen to uint32; 8-byte ones (x64) become two uint32 words each.
    width = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
    # The flat index from per-axis iotas of the leaf's own shape (no reshape, no [size] arange):
    # the weights are partitioned like the leaf, so a sharded 16B-parameter state is fingerprinted
    # shard by shard, and a leaf of more than 2^32 elements wraps like the rest of the sum.
    index, stride = jnp.zeros((), jnp.uint32), 1
    for axis in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride & 0xFFFFFFFF)
        stride *= bits.shape[axis]
    return jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


_fingerprints = jax.jit(lambda leaves: [_leaf_fingerprint(x) for x in leaves])


def state_fingerprint(state: Any) -> dict[str, int]:
    """{leaf path: fingerprint} of a pytree of arrays (every process calls it on global arrays).
    Stored with each checkpoint and compared on restore: zstd frames carry no checksum, so a
    damaged array file can decode without error into other numbers."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    values = jax.device_get(_fingerprints([x for _, x in flat]))
    return {jax.tree_util.keystr(path): int(v) for (path, _), v in zip(flat, values)}


def tree_bytes(tree: Any) -> int:
    """Bytes of a pytree of arrays or abstract values (for the asynchronous-saving threshold)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "dtype"))


class Checkpointer:
    """Numbered, atomic checkpoints of (state, extra JSON, per-process data state); keeps the
    last `max_to_keep`. Every process must construct it and call `save` / `restore` together."""

    def __init__(self, directory: str, max_to_keep: int = 3, save_interval_steps: int = 1,
                 enable_async: bool = False):
        self._path = as_path(directory)
        self.directory = os.fspath(self._path)
        self.enable_async = bool(enable_async)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True,
            enable_async_checkpointing=self.enable_async)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=dict(
            state=_state_handler(), extra=ocp.JsonCheckpointHandler(), data=ProcessStateHandler()))

    def latest_step(self) -> Optional[int]:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, state: Any, extra: Optional[dict] = None, force: bool = False,
             data_state: Any = None) -> bool:
        """Saves if `step` is on the save interval (or `force`). `data_state` is this process's
        data-iterator state (JSON-able). Returns whether it saved; with asynchronous saving
        the arrays are written in the background (`wait()` blocks until they are)."""
        if not force and not self._mngr.should_save(step):
            return False
        extra = dict(extra or {}, state_fingerprint=state_fingerprint(state))
        items = dict(state=ocp.args.PyTreeSave(state), extra=ocp.args.JsonSave(extra))
        if data_state is not None:
            items["data"] = ProcessStateSave(data_state)
        return self._mngr.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state: Any, step: Optional[int] = None,
                config: Optional[ModelConfig] = None) -> tuple[Any, dict]:
        """Restores `(state, extra)` at `step` (default: latest) into `abstract_state`'s structure,
        shapes, dtypes and shardings (a pytree of `jax.ShapeDtypeStruct` with `.sharding`).
        `extra["data_states"]` holds the per-process data states `{process: state}`, if saved."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        where = f"{self.directory} step {step}"
        try:
            extra = self._mngr.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"]
        except Exception as err:
            raise _unreadable(f"{where} extra", err) from err
        if not isinstance(extra, dict):
            raise UnreadableCheckpointError(f"{where} extra: expected a JSON object, found {type(extra).__name__}")
        if config is not None and "model_config" in extra:
            check_compatible(extra["model_config"], config, where)
        if (self._path / str(step) / "data").is_dir():
            try:
                extra["data_states"] = self._mngr.restore(
                    step, args=ocp.args.Composite(data=ProcessStateRestore()))["data"]
            except IncompatibleCheckpointError:
                raise
            except Exception as err:
                raise _unreadable(f"{where} data", err) from err
        try:
            restored = self._mngr.restore(step, args=ocp.args.Composite(state=_restore_args(abstract_state)))
        except (ValueError, KeyError) as err:
            # Orbax's own structure check raises a bare ValueError; a file that does not parse
            # (JSON metadata, a TensorStore read) is damage, not a different model.
            if isinstance(_root_cause(err), (json.JSONDecodeError, OSError)) or _root_cause(err) is not err:
                raise _unreadable(f"{where} state", err) from err
            raise IncompatibleCheckpointError(
                f"{where}: the stored state does not match the expected structure ({err})") from err
        except Exception as err:
            raise _unreadable(f"{where} state", err) from err
        stored = extra.pop("state_fingerprint", None)
        if stored is not None:
            found = state_fingerprint(restored["state"])
            bad = [k for k in stored if found.get(k) != stored[k]]
            if bad:
                raise UnreadableCheckpointError(
                    f"{where} state: cannot be read (fingerprint of {bad[0]} expected {stored[bad[0]]}, found "
                    f"{found.get(bad[0])}; {len(bad)} leaves differ: the files decode to other values than were written)")
        return restored["state"], extra

    def restore_latest_good(self, abstract_state: Any, config: Optional[ModelConfig] = None,
                            ) -> Optional[tuple[int, Any, dict]]:
        """`(step, state, extra)` of the newest step that restores, or None when there is no step.

        A step that cannot be read (`UnreadableCheckpointError`: a corrupt array file, truncated
        metadata) is logged in one line naming the step and why, set aside as
        `unrestorable_step_<n>` (so the resumed run can save that step again; nothing is deleted),
        and the step before it is tried. Every process must call it: they agree on each step (all
        restored it or it counts as unreadable). Where steps exist and none restores, raises
        rather than let the caller start from scratch over them. A checkpoint of another model
        (`IncompatibleCheckpointError`) is raised at once: an older step would not fit either."""
        from absl import logging

        from llada_jax.parallel import hosts

        steps = sorted(self.all_steps(), reverse=True)
        failures = []
        for i, step in enumerate(steps):
            try:
                state, extra = self.restore(abstract_state, step=step, config=config)
                why = None
            except UnreadableCheckpointError as err:
                state, extra, why = None, None, str(err)
            if np.asarray(hosts.allgather(np.int32(why is None))).min():
                self._set_aside([s for s, _ in failures])
                return step, state, extra
            why = why or "another process could not read it"
            then = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "no older step"
            logging.warning("checkpoint step %d cannot be restored, %s: %s", step, then, why)
            failures.append((step, why))
        if failures:
            raise UnreadableCheckpointError(
                f"{self.directory}: no checkpoint restores ({'; '.join(f'step {s}: {w}' for s, w in failures)}); "
                f"not starting from scratch over them. Move {self.directory} aside to start a new run")
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Renames unreadable steps out of Orbax's sight (process 0; the others wait)."""
        from llada_jax.parallel import hosts

        if not steps:
            return
        self.wait()
        if hosts.is_primary():
            for step in steps:
                target, n = self._path / f"unrestorable_step_{step}", 1
                while target.exists():
                    target, n = self._path / f"unrestorable_step_{step}.{n}", n + 1
                (self._path / str(step)).rename(target)
        hosts.barrier(f"checkpoint_set_aside/{max(steps)}")
        self._mngr.reload()

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def data_state_for_process(extra: dict, step: int, rows_per_process: int, *, written_rows: Optional[int] = None):
    """This process's data-iterator state from a restored `extra`, or None if none was saved.

    Written by the same number of processes: this process's own state. Written by N processes
    and restored on M (each reads `rows_per_process` rows of every global batch; the writers
    read `written_rows`): a grain position `{"next_index": k}` counts the rows a process has
    consumed, which is `step * rows` when no example was dropped, and is carried over as
    `step * rows_per_process`. Anything else cannot be mapped and is an error naming the counts.
    """
    states = extra.get("data_states")
    if states is None:  # checkpoints of one process from before the per-process item
        return extra.get("data")
    states = {int(k): v for k, v in states.items()}
    n, m = len(states), jax.process_count()
    if n == m:
        return states[jax.process_index()]
    written_rows = written_rows if written_rows is not None else rows_per_process * m // n
    positions = [s.get("next_index") if isinstance(s, dict) and set(s) == {"next_index"} else None
                 for s in states.values()]
    if all(p == step * written_rows for p in positions):
        return {"next_index": step * rows_per_process}
    raise IncompatibleCheckpointError(
        f"data state: written by {n} processes, restoring on {m}; their positions {positions} are not "
        f"step {step} x {written_rows} rows (examples were dropped for length, or the iterator is not a "
        f"plain grain pipeline), so they cannot be carried over. Resume on {n} processes.")


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


def _stored_extra(ckpt: "Checkpointer", directory: str, step: Optional[int]) -> tuple[int, dict]:
    """(step, the JSON `extra` saved with it): the latest step when `step` is None."""
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {as_path(directory)}")
    return step, ckpt._mngr.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"]


def read_config(directory: str, step: Optional[int] = None, *, config: Optional[ModelConfig] = None) -> ModelConfig:
    """The model config stored with a checkpoint (to build shardings before loading params). With
    `config`, that config is checked against the stored one (architecture fields) and returned."""
    ckpt = Checkpointer(directory)
    try:
        step, extra = _stored_extra(ckpt, directory, step)
    finally:
        ckpt.close()
    return _stored_config(extra, config, directory, step)


def _stored_config(extra: dict, config: Optional[ModelConfig], directory: str, step: int) -> ModelConfig:
    """`config` checked against the one stored in `extra`, or the stored one when `config` is None."""
    saved = extra.get("model_config")
    if config is not None:
        if saved is not None:
            check_compatible(saved, config, f"{directory} step {step}")
        return config
    if saved is None:
        raise IncompatibleCheckpointError(f"{directory}: no model_config stored; pass a config")
    return ModelConfig(**saved)


def run_file(checkpoints: str, name: str) -> Optional[str]:
    """A file or directory of the run that wrote `checkpoints` (its `tokenizer.json`, its prepared
    `data/`): inside the directory (a converted checkpoint's tokenizer files), beside it
    (launch/train.py's and launch/rl.py's workdir), else one level up (the quickstart's workdir,
    whose sft/ and rl_<algorithm>/ runs share them). None when none exists. Local paths or URLs."""
    for candidate in run_file_candidates(checkpoints, name):
        if as_path(candidate).exists():
            return candidate
    return None


def run_file_candidates(checkpoints: str, name: str) -> list[str]:
    """Where `run_file` looks, in order: inside the directory (a converted checkpoint carries its
    tokenizer files, `copy_tokenizer_files`), beside it, one level up."""
    here = as_path(os.fspath(checkpoints).rstrip("/"))
    return [os.fspath(here / name), os.fspath(here.parent / name), os.fspath(here.parent.parent / name)]


# What a Hugging Face directory holds besides weights and config.json that a run needs back.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def copy_tokenizer_files(source: str, target: str, *, beside: bool = False) -> list[str]:
    """Copies `TOKENIZER_FILES` from `source` into `target` (each written to a temporary name and
    renamed; process 0 only). With `beside`, `source` is a checkpoint and each file is looked up
    where `run_file` looks. Returns the names copied."""
    from llada_jax.parallel import hosts

    copied = []
    for name in TOKENIZER_FILES:
        src = run_file(source, name) if beside else os.fspath(as_path(source) / name)
        if not src or not as_path(src).exists():
            continue
        copied.append(name)
        if hosts.is_primary():
            dst = as_path(target)
            dst.mkdir(parents=True, exist_ok=True)
            tmp = dst / f"{name}.tmp"
            tmp.write_bytes(as_path(src).read_bytes())
            tmp.rename(dst / name)
    hosts.barrier(f"copy_tokenizer_files/{target}")
    return copied


def load_params(directory: str, config: Optional[ModelConfig] = None, shardings: Any = None,
                step: Optional[int] = None) -> tuple[ModelConfig, Any]:
    """Params from a params-only or a full training checkpoint. The config is read from the
    checkpoint when not given; given, it is checked against the stored one. A LoRA run's
    checkpoint (adapters and the path of their base) gives the base with the adapters merged
    (`model.lora.merge`), each weight in the base's dtype."""
    from flax import linen as nn

    from llada_jax.model import abstract_params

    ckpt = Checkpointer(directory)
    try:
        step, extra = _stored_extra(ckpt, directory, step)
        config = _stored_config(extra, config, directory, step)
        if extra.get("lora"):  # LoRA adapters: the recorded base with them merged in
            return config, _load_adapted(ckpt, directory, step, extra["lora"], config, shardings)
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


def _load_adapted(ckpt: "Checkpointer", directory: str, step: int, meta: dict, config: ModelConfig,
                  shardings: Any) -> Any:
    """The base recorded in a LoRA checkpoint (HF or Orbax, itself possibly adapted), read into
    `shardings`, with the step's adapters merged in on the same devices."""
    from flax import linen as nn

    from llada_jax.model import abstract_params, hf, lora
    from llada_jax.parallel import sharding as sharding_rules

    settings = lora.LoraConfig(rank=int(meta["rank"]), alpha=float(meta["alpha"]), targets=tuple(meta["targets"]),
                               dropout=float(meta.get("dropout", 0.0)), base_dtype=meta.get("base_dtype", ""))
    base_path = meta.get("base")
    if not base_path:
        raise FileNotFoundError(f"{directory} step {step}: LoRA adapters, expected the path of their base in "
                                f"extra['lora']['base'], found none (the run was given its base in memory)")
    if os.path.exists(os.path.join(os.fspath(base_path), "config.json")):
        _, base = hf.load_hf_checkpoint(base_path, dtype=config.param_dtype, config=config, shardings=shardings)
    else:
        _, base = load_params(base_path, config=config, shardings=shardings)
    boxed = lora.abstract_adapters(abstract_params(config), settings)
    abstract = nn.meta.unbox(boxed)
    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        ad_sh = jax.tree_util.tree_map(lambda _: one, abstract)
    else:
        mesh = jax.tree_util.tree_leaves(shardings)[0].mesh
        ad_sh = sharding_rules.param_shardings(boxed, mesh)
    target = {"params": abstract_with_shardings(abstract, ad_sh)}
    restored = ckpt._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                     restore_args=ocp.checkpoint_utils.construct_restore_args(target))))
    adapters = restored["state"]["params"]
    # The adapters were trained against the base as stored in `base_dtype`: round it the same way,
    # then merge; every weight comes back in the loaded dtype (a bf16-rounded base in fp32 is exact).
    trained_on = nn.meta.unbox(abstract_params(config.replace(param_dtype=settings.base_dtype)
                                               if settings.base_dtype else config))

    def merged(b, a):
        rounded = jax.tree_util.tree_map(lambda x, t: x.astype(t.dtype).astype(x.dtype), b, trained_on)
        return lora.merge(rounded, a, settings)

    return jax.jit(merged, out_shardings=shardings)(base, adapters)
