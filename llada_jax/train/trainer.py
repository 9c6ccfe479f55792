"""Block-diffusion CPT / SFT: optimizer, jitted update step on the mesh, and the training loop.

`train(config, workdir)` reads top to bottom like big_vision's `main`: mesh, model, data,
state (fresh or restored), update step, loop with metrics and checkpoints. Each piece is a
function of its own so that tests and the RL loop reuse them.

Continued pre-training (CPT): `data.packed` packs documents into rows (`data.cpt_dataset`; their
RoPE positions restart per document and attention stays inside each) and `block_schedule` makes
the block size a function of the step (the warm-up / stable / decay schedule of REFERENCE §4).
The block size is a static shape of the attention mask, so the loop keeps one compiled step per
size, compiled the first time the schedule reaches it and reused whenever it comes back.

Exact resume: the noise key of step s is `fold_in(seed_key, s)` and each example's noise is
folded with its row (objectives.noise), the data iterator state is checkpointed with the model,
and `metrics.jsonl` is cut back to the restored step, so a killed run that resumes logs the same
numbers as one that never stopped.

Preemption: SIGTERM (a TPU maintenance event, a scheduler's stop) saves a checkpoint at the step
every process agrees on (`parallel.preemption`, checked every `preemption_check_every` steps
with several processes) and returns; the rerun resumes from it exactly.

Many hosts (`hosts`): each process reads its rows of every global batch, which become one global
array; process 0 alone writes metrics, the tokenizer and prepared data; every process takes
part in checkpoints, each saving its own data-iterator state.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, NamedTuple, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from llada_jax import model
from llada_jax.model import lora
from llada_jax.parallel import hosts, preemption, sharding
from llada_jax.train import checkpoint, flops, objectives
from llada_jax.model.config import ModelConfig, get_config
from llada_jax.train.metrics import MetricsLog, read_metrics  # noqa: F401 - the one metrics writer, re-exported

Batch = dict[str, np.ndarray]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []
    params: Any
    opt_state: Any


# ------------------------------------------------------------------------------ optimizer
def _leaf_name(path) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def trainable_labels(params) -> Any:
    """'frozen' for `expert_bias` (a buffer steered outside the gradient, REFERENCE §1), else 'train'."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "frozen" if _leaf_name(p) == "expert_bias" else "train", params)


def decay_mask(params) -> Any:
    """Weight decay on matrices only: not on norm scales (stored [layers, D], so no ndim test)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: _leaf_name(p) not in ("scale", "expert_bias"), params)


def learning_rate_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio` at `total_steps`."""
    warmup = max(int(cfg.optim.warmup_frac * cfg.total_steps), 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.optim.lr, warmup_steps=warmup,
        decay_steps=max(cfg.total_steps, warmup + 1), end_value=cfg.optim.lr * cfg.optim.min_lr_ratio)


def make_optimizer(cfg: ml_collections.ConfigDict,
                   learning_rate: Optional[float | optax.Schedule] = None) -> optax.GradientTransformation:
    """AdamW with decay mask and global-norm clipping; `expert_bias` frozen. The learning rate is
    `learning_rate` (a constant or a schedule), by default warm-up + cosine over the run."""
    o = cfg.optim
    lr = learning_rate_schedule(cfg) if learning_rate is None else learning_rate
    adamw = optax.chain(
        optax.clip_by_global_norm(o.grad_clip),
        optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask))
    return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, trainable_labels)


# ------------------------------------------------------------------------------ state and shardings
def state_shardings(model_config: ModelConfig, tx: optax.GradientTransformation, mesh,
                    rules=sharding.DEFAULT_RULES, boxed: Optional[Any] = None) -> TrainState:
    """Shardings of the whole train state: params by the rule table, optimizer moments like
    their params, scalars replicated. `boxed`: the trained tree's boxed abstract params (default
    the model's; LoRA: `lora.abstract_adapters`)."""
    boxed = model.abstract_params(model_config) if boxed is None else boxed
    p_sh = sharding.param_shardings(boxed, mesh, rules)
    abstract = nn.meta.unbox(boxed)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_abstract = jax.eval_shape(tx.init, abstract)
    # Optimizer moments mirror their parameter: find it by the key path's tail (optax nests the
    # param tree inside its states) and take its sharding when the shapes agree.
    by_path = {_dict_keys(p): (v.shape, s) for (p, v), s in zip(
        jax.tree_util.tree_flatten_with_path(abstract)[0], jax.tree_util.tree_leaves(p_sh))}

    def moment_sharding(path, leaf):
        keys = _dict_keys(path)
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return replicated

    opt_sh = jax.tree_util.tree_map_with_path(moment_sharding, opt_abstract)
    return TrainState(step=replicated, params=p_sh, opt_state=opt_sh)


def init_state(model_config: ModelConfig, tx, mesh, rng, shardings: TrainState,
               params: Optional[Any] = None, init_fn: Optional[Callable] = None) -> TrainState:
    """A fresh state created directly in its shards (or around given params, e.g. from HF).
    `init_fn(rng) -> params` replaces the model's initialiser (LoRA: the adapters)."""
    init_fn = init_fn or (lambda r: model.init_params(model_config, r))

    def make(r, p):
        p = init_fn(r) if p is None else p
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        if params is None:
            return jax.jit(lambda r: make(r, None), out_shardings=shardings)(rng)
        return jax.jit(lambda p: make(None, p), out_shardings=shardings)(params)


def _dict_keys(path) -> tuple:
    return tuple(p.key for p in path if isinstance(p, jax.tree_util.DictKey))


def batch_sharding(mesh, batch: Batch) -> dict:
    """Rows over the mesh's batch axes; a batch they do not divide is an error (`hosts.batch_spec`)."""
    return {k: hosts.batch_sharding(mesh, v.shape[0], v.ndim) for k, v in batch.items()}


# ------------------------------------------------------------------------------ expert load
def expert_load_metrics(load) -> dict[str, Any]:
    """Per-MoE-layer load summaries from rows per expert `load` [layers, E]: `expert_load_max_over_mean`
    and `expert_load_busiest_share` (share of the layer's routed rows on its busiest expert), both
    [layers], and `expert_load_imbalance`, the largest max/mean over layers (1 = perfectly balanced)."""
    mean = jnp.mean(load, axis=-1)
    peak = jnp.max(load, axis=-1)
    ratio = peak / jnp.maximum(mean, 1e-9)
    return {"expert_load_max_over_mean": ratio, "expert_load_busiest_share": peak / jnp.maximum(jnp.sum(load, -1), 1e-9),
            "expert_load_imbalance": jnp.max(ratio, initial=0.0)}


def update_expert_bias(params, load, rate: float):
    """Aux-loss-free balancing (LLaDA2 / DeepSeek-V3): `b_i += rate * sign(mean_load - load_i)` per
    MoE layer, from the rows each expert received this step. `expert_bias` is a buffer: the
    optimizer leaves it alone (`trainable_labels`) and only this update moves it."""
    delta = rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)  # [layers, E]
    return jax.tree_util.tree_map_with_path(
        lambda p, x: (x + delta.astype(x.dtype)) if _leaf_name(p) == "expert_bias" else x, params)


# ------------------------------------------------------------------------------ update step
def make_train_step(model_config: ModelConfig, obj_config: objectives.ObjectiveConfig,
                    tx: optax.GradientTransformation, schedule: optax.Schedule, accum_steps: int = 1,
                    loss_fn: Callable = objectives.loss_fn,
                    denominators_fn: Callable = objectives.loss_denominators,
                    expert_bias_rate: float = 0.0, lora_config: Optional[lora.LoraConfig] = None) -> Callable:
    """`step(state, batch, rng) -> (state, metrics)`, not yet jitted.

    With an enabled `lora_config` the state's params are the adapters only and the step is
    `step(state, batch, rng, base)`: the loss sees `lora.combine(base, lora.prepare(adapters))`
    (rank dropout keyed by the step), gradients and optimizer state exist for the adapters alone,
    and `base` is an argument (never a compiled-in constant), returned untouched.

    With `accum_steps > 1` the batch is split into micro-batches on its leading axis (activation
    memory of one micro-batch) and the objective is left unchanged: a first `lax.scan` sums the
    step's normalising counts (`denominators_fn`, e.g. the number of response tokens), a second
    sums each micro-batch's loss, metrics and gradient computed against those totals, so the
    loss, the metrics and the gradient are the unaccumulated step's (a per-micro-batch mean
    would weight tokens of sparse micro-batches more). Every micro-batch uses the same step key
    and its examples keep their batch-row ids, so the noise is exactly that of the unaccumulated
    step. A custom `loss_fn` must accept `denominators=` and be additive over micro-batches then.

    A `metrics["expert_load"]` from the loss ([MoE layers, E]) becomes the load summaries of
    `expert_load_metrics`; with `expert_bias_rate > 0` (CPT) it also drives `update_expert_bias`.
    """

    use_lora = lora_config is not None and lora_config.enabled
    if use_lora and expert_bias_rate > 0:
        raise ValueError(f"optim.expert_bias_rate: expected 0 with lora.rank={lora_config.rank} (the bias belongs to "
                         f"the frozen base), found {expert_bias_rate}")

    def train_step(state: TrainState, batch: Batch, rng: jax.Array, base: Any = None):
        key = jax.random.fold_in(rng, state.step)
        batch = dict(batch)
        real = batch.pop("real", None)  # bool [B, L]: real tokens (not padding), counted, not trained on
        b = next(iter(batch.values())).shape[0]
        batch = dict(batch, example_ids=jnp.arange(b, dtype=jnp.int32))
        if use_lora:  # the trained tree is the adapters; the model sees them beside the frozen base
            drop_key = jax.random.fold_in(key, 0x10AA)
            full = lambda p: lora.combine(base, lora.prepare(p, lora_config, drop_key))
        else:
            full = lambda p: p
        if accum_steps == 1:
            grad_fn = jax.value_and_grad(lambda p, mb: loss_fn(full(p), model_config, obj_config, mb, key), has_aux=True)
            (_, metrics), grads = grad_fn(state.params, batch)
        else:
            if b % accum_steps:
                raise ValueError(f"batch_size: expected a multiple of accum_steps={accum_steps}, found {b}")
            micro = jax.tree_util.tree_map(lambda x: x.reshape(accum_steps, b // accum_steps, *x.shape[1:]), batch)
            count = lambda mb: denominators_fn(full(state.params), model_config, obj_config, mb, key)
            first = jax.tree_util.tree_map(lambda x: x[0], micro)
            den, _ = jax.lax.scan(lambda acc, mb: (jax.tree_util.tree_map(jnp.add, acc, count(mb)), None),
                                  jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(count, first)), micro)
            grad_fn = jax.value_and_grad(
                lambda p, mb: loss_fn(full(p), model_config, obj_config, mb, key, denominators=den), has_aux=True)

            def body(acc, mb):
                (_, m), g = grad_fn(state.params, mb)
                return jax.tree_util.tree_map(jnp.add, acc, (g, m)), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(state.params, first)))
            (grads, metrics), _ = jax.lax.scan(body, (zeros[1], zeros[0][1]), micro)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        load = metrics.pop("expert_load", None)
        if load is not None and load.size:
            metrics.update(expert_load_metrics(load))
            if expert_bias_rate > 0:
                params = update_expert_bias(params, load, expert_bias_rate)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads), lr=schedule(state.step))
        if real is not None:  # the global batch's share of real tokens: the same on any process count
            metrics["real_token_fraction"] = jnp.mean(real.astype(jnp.float32))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def jit_train_step(step_fn, shardings: TrainState, mesh, example_batch: Batch, base_shardings: Any = None):
    """The update step jitted on the mesh with explicit shardings and the state donated. With
    `base_shardings` (LoRA) the step takes the frozen base as a fourth, undonated argument."""
    b_sh = batch_sharding(mesh, dict(example_batch))
    replicated = NamedSharding(mesh, PartitionSpec())
    if base_shardings is not None:
        return jax.jit(step_fn, in_shardings=(shardings, b_sh, replicated, base_shardings),
                       out_shardings=(shardings, replicated), donate_argnums=(0,))
    return jax.jit(step_fn, in_shardings=(shardings, b_sh, replicated),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))


def make_eval_step(model_config: ModelConfig, obj_config: objectives.ObjectiveConfig,
                   loss_fn: Callable = objectives.loss_fn) -> Callable:
    """`eval_step(params, batch, key) -> {"loss", "m2t_loss", "masked_acc"}`: the training
    objective on a held-out batch, no gradient, not yet jitted. The loop passes the same key per
    validation batch at every evaluation, so the validation loss of two steps differs only
    through the params."""

    def eval_step(params, batch: Batch, key: jax.Array):
        b = next(iter(batch.values())).shape[0]
        loss, metrics = loss_fn(params, model_config, obj_config, dict(batch, example_ids=jnp.arange(b, dtype=jnp.int32)),
                                key)
        return {"loss": loss, "m2t_loss": metrics["m2t_loss"], "masked_acc": metrics["masked_acc"]}

    return eval_step


def real_mask(batch: Batch) -> np.ndarray:
    """bool [B, L], True on real tokens of a host batch: `real` where the pipeline marks it (SFT
    rows), else the positions with `doc_ids > 0` (packed rows: 0 is padding), else every position."""
    tokens = np.asarray(batch["tokens"])
    if "real" in batch:
        return np.asarray(batch["real"], bool)
    if "doc_ids" in batch:
        return np.asarray(batch["doc_ids"]) > 0
    return np.ones(tokens.shape, bool)


def real_tokens(batch: Batch) -> tuple[int, int]:
    """(real tokens, all positions) of a host batch (`real_mask`)."""
    mask = real_mask(batch)
    return int(np.sum(mask)), mask.size


# ------------------------------------------------------------------------------ run
def _check_fields(where: str, given: dict, cls) -> None:
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"config.{where}: unknown field {unknown[0]!r}; expected fields of {cls.__name__}: "
                         f"{sorted(known)}")


def build_model_config(cfg: ml_collections.ConfigDict) -> ModelConfig:
    """The model named by the run config: an HF directory's config.json or a preset, plus overrides."""
    overrides = {k: v for k, v in dict(cfg.model.get("overrides", {}) or {}).items() if v is not None}
    _check_fields("model.overrides", overrides, ModelConfig)
    if cfg.model.get("hf_dir"):
        return ModelConfig.from_hf_config(cfg.model.hf_dir, **overrides)
    return get_config(cfg.model.preset, **overrides)


def build_objective(cfg: ml_collections.ConfigDict, model_config: ModelConfig,
                    extra_special_ids=()) -> objectives.ObjectiveConfig:
    fields = dict(cfg.objective)
    _check_fields("objective", fields, objectives.ObjectiveConfig)
    fields.setdefault("extra_special_ids", tuple(extra_special_ids))
    return objectives.ObjectiveConfig.for_model(model_config, **fields)


def block_schedule(cfg: ml_collections.ConfigDict) -> Optional[objectives.BlockSizeSchedule]:
    """The run's block-size schedule (CPT, REFERENCE §4), or None: `objective.block_size` throughout.

    `cfg.block_schedule.stages`, explicit `((num_steps, block_size), ...)`, or else its
    `warmup_steps` / `stable_steps` / `decay_steps` (and optionally `warmup_sizes`, `final_size`)
    for `objectives.wsd_block_schedule` over `data.seq_len`. Every size must divide `data.seq_len`.
    """
    section = cfg.get("block_schedule")
    fields = {k: v for k, v in (section.to_dict() if section is not None else {}).items() if v is not None}
    if not fields:
        return None
    seq_len = cfg.data.seq_len
    if fields.get("stages"):
        unknown = sorted(set(fields) - {"stages"})
        if unknown:
            raise ValueError(f"config.block_schedule: expected either stages or the wsd fields, found stages and {unknown}")
        schedule = objectives.BlockSizeSchedule(tuple(tuple(st) for st in fields["stages"]))
    else:
        fields.pop("stages", None)
        wsd = ("warmup_steps", "stable_steps", "decay_steps", "warmup_sizes", "final_size")
        unknown = sorted(set(fields) - set(wsd))
        if unknown:
            raise ValueError(f"config.block_schedule: unknown field {unknown[0]!r}; expected stages or {list(wsd)}")
        missing = [k for k in wsd[:3] if k not in fields]
        if missing:
            raise ValueError(f"config.block_schedule.{missing[0]}: expected a number of steps, found none")
        if "warmup_sizes" in fields:
            fields["warmup_sizes"] = tuple(fields["warmup_sizes"])
        schedule = objectives.wsd_block_schedule(seq_len, **fields)
    bad = [b for b in schedule.sizes if seq_len % b]
    if bad:
        raise ValueError(f"config.block_schedule: expected block sizes that divide data.seq_len={seq_len}, "
                         f"found {bad[0]} in {schedule.sizes}")
    return schedule


def mesh_from_config(cfg: ml_collections.ConfigDict, devices=None):
    """The run's mesh: `cfg.mesh` over `devices` (default: every device; `aot.plan` passes a TPU
    topology's)."""
    m = cfg.mesh
    return sharding.make_mesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor, expert=m.expert, devices=devices)


def enable_compilation_cache(path: Optional[str] = None) -> str:
    """Persists compiled programs across processes (a resumed or repeated run skips compilation).

    `$JAX_COMPILATION_CACHE_DIR` wins; else `path`; else `~/.cache/llada_jax/xla`."""
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or path or os.path.expanduser("~/.cache/llada_jax/xla")
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path


class NonFiniteLossError(FloatingPointError):
    pass


# ------------------------------------------------------------------------------ data
def load_tokenizer(cfg: ml_collections.ConfigDict, workdir: str):
    """The run's tokenizer: `cfg.data.tokenizer`, or the offline-task tokenizer built locally once
    and kept in `<workdir>/tokenizer.json` (so a resumed run and later evaluation use the same)."""
    from llada_jax.data.tokenizer import Tokenizer, build_task_tokenizer

    if cfg.data.tokenizer:
        return Tokenizer.from_file(cfg.data.tokenizer)
    path = checkpoint.as_path(workdir) / "tokenizer.json"  # a local path or a URL

    def build_or_read():
        if path.exists():
            return Tokenizer.from_file(path)
        if not hosts.is_primary():
            raise FileNotFoundError(f"{path}: process 0 should have written it before the barrier")
        tok = build_task_tokenizer()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / (path.name + ".tmp")
        tok.save(tmp)
        tmp.replace(path)
        return tok

    # Process 0 builds and writes it; the others read that file after the barrier.
    return hosts.on_primary_then_all("tokenizer", build_or_read)


def check_tokenizer(model_config: ModelConfig, tokenizer) -> None:
    """The model must embed every token id and agree on the mask and EOS ids."""
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(f"tokenizer: has {tokenizer.vocab_size} ids, more than the model's "
                         f"vocab_size={model_config.vocab_size}")
    for name, tok_id in (("mask_token_id", tokenizer.mask_id), ("eos_token_id", tokenizer.eos_id)):
        if getattr(model_config, name) != tok_id:
            raise ValueError(f"ModelConfig.{name}: expected the tokenizer's {tok_id}, found {getattr(model_config, name)}")


def open_examples(cfg: ml_collections.ConfigDict, workdir: str, split: str):
    """The examples of `split`: the offline task (generated under data_dir once) or a prepared dataset."""
    from llada_jax import data

    data_dir = cfg.data.data_dir or os.path.join(workdir, "data")
    if cfg.data.task:
        task = data.get_task(cfg.data.task)
        settings = dict(cfg.data.get("task_config", {}) or {})
        _check_fields("data.task_config", settings, task.config_cls)
        # Each distinct setting is its own prepared dataset, so changing one never reuses stale data.
        name = "_".join(f"{k}{v}" for k, v in sorted(settings.items())) or "default"
        if hosts.is_primary():  # one writer; the others open what it prepared
            data.prepare_task(cfg.data.task, data_dir, name=name, num_train=cfg.data.num_train,
                              num_test=cfg.data.num_test, num_validation=cfg.data.get("num_validation", 200),
                              task_config=task.config_cls(**settings) if settings else None)
        hosts.barrier("prepare_task")
        return data.open_split(data_dir, f"{cfg.data.task}/{name}", split)
    mixture = cfg.data.get("mixture", "")
    if mixture:
        if cfg.data.dataset:
            raise ValueError(f"data: expected data.dataset or data.mixture, found both ({cfg.data.dataset!r} and "
                             f"{mixture!r})")
        parts = data.parse_mixture(mixture)
        return data.Mixture(tuple(data.open_split(data_dir, name, split) for name, _ in parts),
                            tuple(w for _, w in parts), tuple(name for name, _ in parts))
    if not cfg.data.dataset:
        raise ValueError("data: expected data.task (an offline task), data.dataset (a prepared dataset) or "
                         "data.mixture (several, by weight), found none")
    return data.open_split(data_dir, cfg.data.dataset, split)


def train_iterator(cfg: ml_collections.ConfigDict, workdir: str, tokenizer):
    """Checkpointable iterator of this process's rows of each global batch (the rows its devices
    hold on the run's mesh, `hosts.batch_rows`), shuffled by the run seed."""
    return iter(_dataset(cfg, workdir, tokenizer, "train", shuffle=True, num_epochs=None))


def _dataset(cfg: ml_collections.ConfigDict, workdir: str, tokenizer, split: str, *, shuffle: bool,
             num_epochs: Optional[int]):
    from llada_jax import data

    index, count = hosts.batch_rows(mesh_from_config(cfg), cfg.data.batch_size)
    examples = open_examples(cfg, workdir, split)
    common = dict(batch_size=cfg.data.batch_size // count, shard_index=index, shard_count=count,
                  seq_len=cfg.data.seq_len, block_size=cfg.objective.block_size, seed=cfg.seed, shuffle=shuffle,
                  num_epochs=num_epochs)
    if cfg.data.get("packed", False):  # CPT: documents packed back to back into rows of seq_len
        return data.cpt_dataset(examples, tokenizer, **common)
    if cfg.data.get("pack_conversations", False):  # chat SFT: whole conversations packed into rows
        return data.packed_sft_dataset(examples, tokenizer, template=cfg.data.template, too_long=cfg.data.too_long,
                                       packing_bins=cfg.data.get("packing_bins", data.packing.DEFAULT_PACKING_BINS),
                                       **common)
    return data.sft_dataset(examples, tokenizer, template=cfg.data.template, too_long=cfg.data.too_long, **common)


def eval_batches(cfg: ml_collections.ConfigDict, workdir: str, tokenizer) -> Optional[list[Batch]]:
    """The fixed validation batches whose loss the loop logs every `cfg.eval_every` steps (None
    when `eval_every` is 0): the first `cfg.eval_batches` batches of split `cfg.data.eval_split`
    of the run's dataset(s), unshuffled, prepared like the training batches."""
    every = int(cfg.get("eval_every", 0) or 0)
    if every <= 0:
        return None
    num = int(cfg.get("eval_batches", 4))
    if num < 1:
        raise ValueError(f"config.eval_batches: expected a positive number of batches, found {num}")
    split = cfg.data.get("eval_split", "validation")
    # The held-out split once (epochs repeat only if it holds fewer than `num` batches).
    ds = _dataset(cfg, workdir, tokenizer, split, shuffle=False, num_epochs=None)
    it = iter(ds)
    return [next(it) for _ in range(num)]


def run_training(cfg: ml_collections.ConfigDict, workdir: str, model_config: ModelConfig,
                 obj_config: objectives.ObjectiveConfig, train_iter, *, init_params: Optional[Any] = None,
                 on_log: Optional[Callable[[int, dict], None]] = None,
                 progress: bool = True, loss_fn: Callable = objectives.loss_fn,
                 eval_data: Optional[list[Batch]] = None, base_from: Optional[str] = None) -> TrainState:
    """The loop: restore or init, step, log, checkpoint, until `cfg.total_steps`.

    With `cfg.lora.rank > 0`, `init_params` is the frozen base (`base_from` says where it was read,
    recorded in every checkpoint) and the state trains only the adapters (`lora_setup`):
    checkpoints hold the adapters, their optimizer state and the base's path, never the base.

    `train_iter` is an iterator of numpy batches with `get_state()` / `set_state()` (grain);
    its state is saved with every checkpoint. Returns the final state. With a `block_schedule`
    the step's block size comes from it (logged as `block_size`), with one compiled step per size;
    likewise the Multi-Block Editing window from `objective.mbe_window_schedule` (logged as
    `mbe_window`), one compiled step per (block size, window).

    `tokens_per_s` and the MFU count real tokens only (`real_mask`: padding excluded), and
    `real_token_fraction` is their share of the logged step's global batch. With `eval_data` (the
    fixed batches of `eval_batches`) the mean loss over them is logged as `val_loss` (with
    `val_m2t_loss`, `val_masked_acc`) every `cfg.eval_every` steps and at the last step.
    """
    checkpoint.as_path(workdir).mkdir(parents=True, exist_ok=True)
    mesh = mesh_from_config(cfg)
    tx = make_optimizer(cfg)
    schedule = learning_rate_schedule(cfg)
    adapters = lora_setup(cfg, model_config, mesh, init_params, base_from)
    boxed = adapters.boxed if adapters else None
    shardings = state_shardings(model_config, tx, mesh, boxed=boxed)
    ckpt = make_checkpointer(cfg, workdir, init_state_abstract(model_config, tx, boxed))
    rng = jax.random.key(cfg.seed)
    local_rows = hosts.local_batch_size(mesh, cfg.data.batch_size)
    sizes = block_schedule(cfg)

    # The newest step that restores (an unreadable one is logged, set aside, and the one before tried).
    restored = None
    if ckpt.latest_step() is not None:
        abstract = checkpoint.abstract_with_shardings(init_state_abstract(model_config, tx, boxed), shardings)
        restored = ckpt.restore_latest_good(abstract, config=model_config)
    if restored is not None:
        start, state, extra = restored
        check_lora_resume(extra, adapters, ckpt.directory)
        data_state = checkpoint.data_state_for_process(extra, start, local_rows)
        if data_state is not None and hasattr(train_iter, "set_state"):
            train_iter.set_state(data_state)
    else:
        start = 0
        if adapters:
            state = init_state(model_config, tx, mesh, jax.random.fold_in(rng, 1 << 30), shardings,
                               init_fn=adapters.init_fn)
        else:
            state = init_state(model_config, tx, mesh, jax.random.fold_in(rng, 1 << 30), shardings, init_params)
    log = MetricsLog(workdir, resume_step=start)
    extra_json = {"model_config": checkpoint.config_to_json(model_config), "run_config": cfg.to_dict()}
    if adapters:
        extra_json["lora"] = adapters.to_json()
    base_args = (adapters.base,) if adapters else ()

    def save(done, state, metrics):
        loss_now = float(jax.device_get(metrics["loss"]))
        if not np.isfinite(loss_now):
            raise NonFiniteLossError(f"step {done}: loss is {loss_now}; not saving. The last good "
                                     f"checkpoint is step {ckpt.latest_step()} in {ckpt.directory}")
        data_state = train_iter.get_state() if hasattr(train_iter, "get_state") else None
        ckpt.save(done, state, extra=extra_json, data_state=data_state, force=True)

    programs = {}  # (block size, MBE window) -> (compiled step, its model FLOPs)
    evals = {}  # (block size, MBE window) -> compiled eval step
    eval_every = int(cfg.get("eval_every", 0) or 0)
    eval_key = jax.random.fold_in(rng, (1 << 30) + 1)
    keep = ("tokens", "loss_mask", "doc_ids")
    if eval_data is not None:
        eval_data = [hosts.global_batch(mesh, {k: v for k, v in b.items() if k in keep}, cfg.data.batch_size)
                     for b in eval_data]

    def validate(state, block_size, window):
        if (block_size, window) not in evals:
            obj = dataclasses.replace(obj_config, block_size=block_size, mbe_window=window)
            replicated = NamedSharding(mesh, PartitionSpec())
            eval_step = make_eval_step(model_config, obj, loss_fn)
            in_shardings = (shardings.params, batch_sharding(mesh, dict(eval_data[0])), replicated)
            if adapters:  # the adapters (no dropout) beside the frozen base, as the merged model decodes
                eval_step = (lambda step, c: lambda p, b, k, base: step(lora.combine(base, lora.prepare(p, c)), b, k))(
                    eval_step, adapters.config)
                in_shardings += (adapters.base_shardings,)
            evals[block_size, window] = jax.jit(eval_step, in_shardings=in_shardings, out_shardings=replicated)
        outs = jax.device_get([evals[block_size, window](state.params, b, jax.random.fold_in(eval_key, i), *base_args)
                               for i, b in enumerate(eval_data)])
        return {f"val_{k}": float(np.mean([o[k] for o in outs])) for k in outs[0]}

    bar = _progress(start, cfg.total_steps, progress)
    t_last, tokens_since, flops_since = time.perf_counter(), 0, 0.0
    profile = _profile_window(cfg, workdir)
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES), \
                preemption.PreemptionGuard(check_every=cfg.get("preemption_check_every", 1)) as guard:
            for step in range(start, cfg.total_steps):
                batch = next(train_iter)
                real = real_mask(batch)
                # tokens/s and MFU from this process's rows (the others' are alike); the logged
                # real_token_fraction is the global batch's, computed in the step
                tokens_since += int(real.sum()) * (cfg.data.batch_size // local_rows)
                batch = {k: v for k, v in batch.items() if k in keep} | {"real": real}
                batch = hosts.global_batch(mesh, batch, cfg.data.batch_size)
                block_size = obj_config.block_size if sizes is None else objectives.block_size_at(step, sizes)
                window = obj_config.mbe_window_at(step)  # the MBE curriculum's K (REFERENCE §5)
                key = (block_size, window)
                if key not in programs:
                    obj = dataclasses.replace(obj_config, block_size=block_size, mbe_window=window)
                    b_global, length = np.shape(batch["tokens"])
                    programs[key] = (hosts.compile_together(jit_train_step(make_train_step(
                        model_config, obj, tx, schedule, cfg.optim.accum_steps, loss_fn,
                        expert_bias_rate=cfg.optim.get("expert_bias_rate", 0.0),
                        lora_config=adapters.config if adapters else None), shardings, mesh, batch,
                        adapters.base_shardings if adapters else None),
                        state, batch, rng, *base_args, name=f"train_step/block_size={block_size},mbe_window={window}"),
                        flops.training_flops_per_step(
                            model_config, b_global, length, block_size, mdlm=obj.is_mdlm(length),
                            complementary=obj.complementary, mtf=obj.mtf, **obj.mask_links))
                step_fn, step_flops = programs[key]
                profile(step)
                state, metrics = step_fn(state, batch, rng, *base_args)
                flops_since += step_flops * float(real.mean())  # the useful FLOPs: real tokens only
                done = step + 1
                profile(done, state)
                val = {}
                if eval_data and eval_every > 0 and (done % eval_every == 0 or done == cfg.total_steps):
                    val = validate(state, block_size, window)
                if done % cfg.log_every == 0 or done == cfg.total_steps:
                    metrics = jax.device_get(metrics)
                    if not np.isfinite(metrics["loss"]):
                        raise NonFiniteLossError(
                            f"step {done}: loss is {metrics['loss']}; stopping. The last good checkpoint is "
                            f"step {ckpt.latest_step()} in {ckpt.directory}")
                    now = time.perf_counter()
                    metrics["tokens_per_s"] = tokens_since / max(now - t_last, 1e-9)
                    # the global batch's FLOPs over every device of the run
                    metrics.update(model_flops_per_step=step_flops, **flops.mfu(
                        flops_since, now - t_last, jax.device_count(), jax.devices()[0].device_kind))
                    metrics.update(val)
                    if sizes is not None:
                        metrics["block_size"] = block_size
                    if obj_config.mbe_window_schedule:
                        metrics["mbe_window"] = window
                    t_last, tokens_since, flops_since = now, 0, 0.0
                    log.write(done, {k: v for k, v in metrics.items() if k != "tokens_per_s"} |
                              {"tokens_per_s": round(float(metrics["tokens_per_s"]), 1)})
                    if on_log:
                        on_log(done, metrics)
                    bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", acc=f"{float(metrics.get('masked_acc', 0)):.3f}")
                elif val:
                    log.write(done, val)
                saved = done % cfg.checkpoint_every == 0 or done == cfg.total_steps
                if saved:
                    save(done, state, metrics)
                bar.update(1)
                if guard.should_stop(done) and done < cfg.total_steps:
                    if not saved:
                        save(done, state, metrics)
                    logging.warning("preempted (%s): saved step %d of %d in %s; rerun the same command to "
                                    "resume", guard.reason, done, cfg.total_steps, ckpt.directory)
                    break
    finally:
        profile(None)
        bar.close()
        ckpt.close()
    return state


# ------------------------------------------------------------------------------ LoRA
class LoraRun(NamedTuple):
    """A LoRA run's frozen side: the settings, the base in its shards, where it came from, the
    adapters' boxed abstract tree and their initialiser."""

    config: lora.LoraConfig
    base: Any
    base_shardings: Any
    base_from: Optional[str]
    boxed: Any
    init_fn: Callable

    def to_json(self) -> dict:
        return dict(self.config.to_json(), base=self.base_from)


def lora_setup(cfg: ml_collections.ConfigDict, model_config: ModelConfig, mesh, base_params: Any,
               base_from: Optional[str] = None) -> Optional[LoraRun]:
    """None when `cfg.lora.rank` is 0 (or there is no `lora` section); else the frozen base placed
    in its shards and the adapters' abstract tree. A LoRA run without a base is an error."""
    config = lora.LoraConfig.from_mapping(cfg.get("lora"))
    if not config.enabled:
        return None
    if base_params is None:
        raise ValueError(f"lora.rank: {config.rank} adapts a base model, expected one (--init_from or "
                         f"config.model.hf_dir), found none")
    base_boxed = model.abstract_params(lora_base_config(model_config, config))
    base_sh = sharding.param_shardings(base_boxed, mesh)
    abstract_base = nn.meta.unbox(base_boxed)
    base = lora.cast_base(base_params, abstract_base, base_sh)  # lora.base_dtype, once
    if base_from is not None and not checkpoint.is_url(base_from):
        base_from = os.path.abspath(base_from)
    return LoraRun(config, base, base_sh, base_from, lora.abstract_adapters(base_boxed, config),
                   lambda r: lora.init_adapters(abstract_base, config, r))


def lora_base_config(model_config: ModelConfig, config: lora.LoraConfig) -> ModelConfig:
    """The model config the frozen base is stored under: `param_dtype` = `lora.base_dtype` when set
    (leaves the model keeps in fp32, `expert_bias`, stay fp32)."""
    return model_config.replace(param_dtype=config.base_dtype) if config.base_dtype else model_config


def check_lora_resume(extra: dict, adapters: Optional[LoraRun], where: str) -> None:
    """A restored checkpoint must have been trained the way this run trains: the same LoRA settings
    on the same base (a different base under the same adapters is another model)."""
    stored = extra.get("lora")
    now = adapters.to_json() if adapters else None
    if (stored is None) != (now is None):
        raise ValueError(f"config.lora: {where} holds {'adapters' if stored else 'full parameters'}, this run "
                         f"expects {'adapters' if now else 'full parameters'} (lora.rank={now and now['rank'] or 0})")
    if stored is not None and stored.get("base") != now.get("base") and now.get("base") is not None:
        raise ValueError(f"lora base: {where} was trained on {stored.get('base')!r}, this run starts from "
                         f"{now.get('base')!r}")
    if stored is not None:
        for k in ("rank", "alpha", "targets", "dropout", "base_dtype"):
            if stored.get(k, "" if k == "base_dtype" else None) != now.get(k):
                raise ValueError(f"lora.{k}: {where} was trained with {stored.get(k)!r}, found {now.get(k)!r}")


def _profile_window(cfg: ml_collections.ConfigDict, workdir: str) -> Callable:
    """`jax.profiler` trace of steps [profile_start_step, + profile_num_steps) into <workdir>/profile
    (TensorBoard / Perfetto). Call with the step about to run, with the steps done (and the state,
    to wait for it) after it, and with None on exit."""
    start, num = int(cfg.get("profile_start_step", 0)), int(cfg.get("profile_num_steps", 0))
    active = [False]

    def call(step, state=None):
        if num <= 0:
            return
        if step is None or (active[0] and state is not None and step >= start + num):
            if active[0]:
                if state is not None:
                    jax.block_until_ready(state)
                jax.profiler.stop_trace()
                active[0] = False
        elif not active[0] and state is None and step == start:
            jax.profiler.start_trace(os.path.join(workdir, "profile"))
            active[0] = True

    return call


def make_checkpointer(cfg: ml_collections.ConfigDict, workdir: str, abstract_state: Any) -> checkpoint.Checkpointer:
    """The run's checkpointer: asynchronous when `cfg.checkpoint_async` says so, or by default
    when the train state is above `checkpoint.ASYNC_ABOVE_BYTES`."""
    enable_async = cfg.get("checkpoint_async", None)
    if enable_async is None:
        enable_async = checkpoint.tree_bytes(abstract_state) > checkpoint.ASYNC_ABOVE_BYTES
    return checkpoint.Checkpointer(os.fspath(checkpoint.as_path(workdir) / "checkpoints"), max_to_keep=cfg.keep_checkpoints,
                                   enable_async=enable_async)


def init_state_abstract(model_config: ModelConfig, tx, boxed: Optional[Any] = None) -> TrainState:
    params = nn.meta.unbox(model.abstract_params(model_config) if boxed is None else boxed)
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                      opt_state=jax.eval_shape(tx.init, params))


def _progress(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)
