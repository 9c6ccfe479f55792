"""The RL loop: rollouts, rewards, advantages and μ inner updates on the mesh (REFERENCE §6).

`run_rl(cfg, workdir, model_config, tokenizer, init_params=...)` reads top to bottom like
`train.run_training`. Per RL step s:

  1. P prompts from a grain pipeline over the task's train split (`prompt_iterator`), each
     repeated G times;
  2. rollouts with `decode.generate` on the CURRENT params, in place (the state the last update
     returned: no host copy, no checkpoint round trip, as DiRL argues), sampled at
     `rl.temperature` with key `fold_in(rollout_key, s)`;
  3. rewards (`rewards.score` in `rl.reward_workers` threads, which turns a verifier that raises or
     runs past `rl.reward_timeout_s` into reward 0 and a report, never a failed step) and the
     algorithm's advantages (EBPO group-normalised, ESPO leave-one-out, DiPO z-score with
     zero-variance groups dropped);
  4. `rl.pack_rollouts` (DiPO: `rl.pack_trajectory`, the decoder's every write) and, when
     beta > 0, the reference's terms from a frozen on-device copy of the initial params, with the
     update key `fold_in(noise_key, s)` (common random numbers);
  5. μ epochs of `rl.mini_batches` jitted `rl.make_rl_step` updates (`rl.run_updates`; each
     accumulated over `optim.accum_steps` micro-batches) with that same key, the state donated.
     θ_old is the policy that drew the rollouts in every update: the first update runs at
     θ == θ_old and takes the first mini-batch's terms from its own program (exact ratio 1 in any
     precision), the other mini-batches' are taken from the same params before it, and all stay
     for the μ epochs. With `rl.skip_no_signal`, a step whose advantages are all zero (every
     group's rewards equal) skips 4-5: its gradient is zero (KL aside), but Adam would still move
     the params along its momentum, and the likelihood and updates are most of a step's time;
  6. one metrics row per step to the progress bar and `<workdir>/metrics.jsonl`;
  7. an Orbax checkpoint every `checkpoint_every` steps, and at the step in progress when SIGTERM
     arrives (`parallel.preemption`; the loop then returns): the state and the prompt iterator.

With `rl.pipeline` (one step off-policy), step s+1's rollouts are decoded from the params before
update s, with θ_old's terms from those params (staleness 1; the first step after a start is
on-policy); update s is then dispatched and step s+1's rewards are scored on the host while the
device runs it. A checkpoint then also holds step s+1's packed rollouts, rewards and θ_old's
terms (they come from params no checkpoint keeps), in the per-process data state.

Exact resume: every key is a function of (seed, s), the prompt iterator state is checkpointed,
the optimizer state is restored and `metrics.jsonl` is cut back to the restored step, so a run
killed and resumed logs the same rows as an uninterrupted one (apart from the `time_*` fields).
The reference model is the run's initial params: on resume the caller passes them again (the
launcher re-reads `--init_from`; a random init is re-drawn from the seed).

DiPO's `num_steps` is static under `jit`: it is rounded up to a multiple of `rl.dipo_step_bucket`
so that a handful of programs serve every batch.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
from absl import logging
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from llada_jax import decode, model, rewards, rl, train
from llada_jax.decode import rollouts as group_rollouts
from llada_jax.evaluation import benchmarks, heldout
from llada_jax.parallel import hosts, preemption, sharding
from llada_jax.train import checkpoint
from llada_jax.model import lora
from llada_jax.model.config import DTYPES, ConfigError, ModelConfig

ALGORITHMS = ("ebpo", "espo", "dipo")
# μ, the inner updates per rollout batch, when `rl.inner_updates` is None (ESPO's paper uses 8).
INNER_UPDATES = {"ebpo": 2, "espo": 8, "dipo": 2}
_CONFIG_CLASSES = {"ebpo": rl.EBPOConfig, "espo": rl.ESPOConfig, "dipo": rl.DiPOConfig}
# Keys of the metrics row that measure wall time; everything else is reproducible on resume.
TIME_PREFIX = "time_"
# Stream ids folded into the run key: rollout sampling and likelihood noise never share keys.
_ROLLOUT_STREAM, _NOISE_STREAM, _INIT_STREAM = 1, 2, 1 << 30


# ------------------------------------------------------------------------------ configs
def build_rl_config(cfg: ml_collections.ConfigDict, num_steps: Optional[int] = None) -> rl.RLConfig:
    """The `rl.RLConfig` of `cfg.rl.algorithm`; fields left None in `cfg.rl` keep the algorithm's
    defaults (REFERENCE §6). DiPO takes `num_steps` (the bucketed trajectory length)."""
    r = cfg.rl
    if r.algorithm not in ALGORITHMS:
        raise ConfigError(f"rl.algorithm: expected one of {ALGORITHMS}, found {r.algorithm!r}")
    if r.get("rollout_dtype") and r.rollout_dtype not in DTYPES:
        raise ConfigError(f"rl.rollout_dtype: expected None or one of {DTYPES}, found {r.rollout_dtype!r}")
    if r.get("rollout_engine", "groups") not in ROLLOUT_ENGINES:
        raise ConfigError(f"rl.rollout_engine: expected one of {ROLLOUT_ENGINES}, found {r.rollout_engine!r}")
    if not isinstance(r.get("eos_early_stop", True), bool):
        raise ConfigError(f"rl.eos_early_stop: expected true or false, found {r.eos_early_stop!r}")
    block = cfg.objective.block_size
    common = {k: r[k] for k in ("eps_low", "eps_high", "beta") if r[k] is not None}
    # Log-probs of the distribution the rollouts were sampled from (greedy rollouts: temperature 1).
    temperature = float(r.temperature) if r.temperature > 0 else 1.0
    if r.algorithm == "dipo":
        extra = {"vectorize": r.vectorize} if r.vectorize is not None else {}
        return rl.DiPOConfig(block_size=block, num_steps=num_steps or 1, temperature=temperature, **common, **extra)
    cls = _CONFIG_CLASSES[r.algorithm]
    lik = cls().likelihood
    lik_fields = {"num_timesteps": r.num_timesteps, "vectorize": r.vectorize, "t_floor": r.t_floor,
                  "weighting": r.weighting}
    lik = dataclasses.replace(lik, block_size=block, temperature=temperature,
                              **{k: v for k, v in lik_fields.items() if v is not None})
    fields = dict(common, likelihood=lik)
    if r.grad_mode is not None:
        fields["grad_mode"] = r.grad_mode
    if r.algorithm == "ebpo":
        fields.update({k: r[k] for k in ("kl_estimator", "normalize", "dual_clip") if r[k] is not None})
    elif any(r[k] is not None for k in ("normalize", "dual_clip")):
        raise ConfigError(f"rl.normalize / rl.dual_clip: expected None for {r.algorithm} (EBPO options), found "
                          f"{r.normalize!r} / {r.dual_clip!r}")
    return cls(**fields)


def inner_updates(cfg: ml_collections.ConfigDict) -> int:
    """μ: `rl.inner_updates`, or the algorithm's default (`INNER_UPDATES`)."""
    mu = cfg.rl.inner_updates
    return INNER_UPDATES[cfg.rl.algorithm] if mu is None else int(mu)


def check_update_config(cfg: ml_collections.ConfigDict, mesh=None) -> int:
    """The rollouts of one update (a mini-batch, over every process), after checking the update
    settings the RL step must honour: `rl.mini_batches` (updates per inner epoch) divides the
    step's `rl.prompts_per_step x rl.group_size` rollouts into equal mini-batches that split over
    the mesh's batch axes, `optim.accum_steps` divides a mini-batch, and nothing the RL step
    does not do is asked for (`optim.expert_bias_rate`: CPT's balancing only)."""
    r = cfg.rl
    rollouts = r.prompts_per_step * r.group_size
    m = r.get("mini_batches", 1)
    if not (isinstance(m, int) and m >= 1 and rollouts % m == 0):
        raise ConfigError(f"rl.mini_batches: expected a divisor >= 1 of the step's rl.prompts_per_step x "
                          f"rl.group_size = {rollouts} rollouts, found {m!r}")
    per_update = rollouts // m
    if mesh is not None:
        hosts.batch_rows(mesh, per_update, f"rl.mini_batches (a mini-batch of {per_update} rollouts)")
    a = cfg.optim.accum_steps
    if not (isinstance(a, int) and a >= 1 and per_update % a == 0):
        raise ConfigError(f"optim.accum_steps: expected a divisor >= 1 of the {per_update} rollouts of an update "
                          f"(rl.prompts_per_step x rl.group_size / rl.mini_batches), found {a!r}")
    if cfg.optim.get("expert_bias_rate", 0.0):
        raise ConfigError(f"optim.expert_bias_rate: expected 0 for RL (the RL step does not update the expert "
                          f"bias), found {cfg.optim.expert_bias_rate}")
    if not isinstance(r.get("pipeline", False), bool):
        raise ConfigError(f"rl.pipeline: expected True or False, found {r.pipeline!r}")
    return per_update


def stage_config(cfg: ml_collections.ConfigDict, total_steps: Optional[int] = None) -> ml_collections.ConfigDict:
    """The RL run config of a config with an `rl_stage` section (configs/quickstart.py): a copy
    with that section's step budget (or `total_steps`), checkpoint interval, constant learning
    rate and weight decay in place of the SFT ones, and the section itself dropped. The SFT
    stage's expert-bias balancing (`optim.expert_bias_rate`) is the section's
    `expert_bias_rate` (default 0; the RL step does not update the bias, and a non-zero value
    is refused by `check_update_config`)."""
    stage = cfg.rl_stage
    # A deep copy keeps typed placeholders (None-valued fields with a type), so the RL config's
    # `--config.rl.num_timesteps=...` overrides still parse; resolving them would leave NoneType.
    out = copy.deepcopy(cfg)
    with out.unlocked():
        out.total_steps = stage.steps if total_steps is None else total_steps
        out.checkpoint_every = stage.checkpoint_every
        out.optim.lr = stage.lr
        out.optim.weight_decay = stage.weight_decay
        out.optim.expert_bias_rate = stage.get("expert_bias_rate", 0.0)
        del out["rl_stage"]
    return out


def make_rl_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The trainer's optimizer at the constant `optim.lr` of the public RL recipes: the trainer's
    warm-up starts at lr 0, which would make the first inner update a no-op."""
    return train.make_optimizer(cfg, learning_rate=cfg.optim.lr)


# ------------------------------------------------------------------------------ prompts
def _prompt_row(example: Mapping[str, Any], tokenizer, template: str) -> dict:
    ids, metas = heldout.prompts_and_metas([example], tokenizer, template)
    return {"prompt": ids[0], "meta": metas[0]}


def prompt_split(cfg: ml_collections.ConfigDict, mesh) -> tuple[int, int]:
    """`(index, count)`: this process decodes prompts `[index * P/count, (index + 1) * P/count)` of
    each step's P, with all their G rollouts (a group is never split across processes). The
    P x G rollout rows must divide the mesh's batch axes, and P the processes holding them."""
    r = cfg.rl
    index, count = hosts.batch_rows(mesh, r.prompts_per_step * r.group_size, "rl.prompts_per_step x rl.group_size")
    if r.prompts_per_step % count:
        raise ConfigError(f"rl.prompts_per_step: expected a multiple of the {count} processes that decode "
                          f"separate rows (a group of G rollouts stays on one process), found {r.prompts_per_step}")
    return index, count


def _file_examples(path: str, fmt: str, field: str) -> list[dict]:
    """The examples of a benchmark-format file as chat examples (`messages` ending with the gold
    answer, or an empty one, as the dataset's are) for `prompts_and_metas` / `heldout.evaluate`."""
    try:
        examples = benchmarks.read_benchmark(path, fmt)
    except (OSError, benchmarks.BenchmarkError) as e:
        raise ConfigError(f"{field}: {e}") from None
    return [{"messages": list(e.messages) + [{"role": "assistant", "content": e.reference}], "meta": dict(e.meta)}
            for e in examples]


def prompt_rows(cfg: ml_collections.ConfigDict, workdir: str, tokenizer) -> tuple[list[dict], int]:
    """Every RL prompt as a `{"prompt": ids, "meta": ...}` row, in source order, and the number
    dropped because the prompt leaves fewer than `rl.gen_length` positions of the canvas
    (`data.seq_len`). The source is `rl.prompts_file` (any format `launch/eval.py` reads, or chat
    JSONL without assistant turns) or else the data section's train split."""
    r = cfg.rl
    examples = (_file_examples(r.prompts_file, r.prompts_format, "rl.prompts_file") if r.prompts_file
                else train.open_examples(cfg, workdir, "train"))
    limit = cfg.data.seq_len - r.gen_length
    rows = [_prompt_row(ex, tokenizer, cfg.data.template) for ex in examples]
    kept = [row for row in rows if len(row["prompt"]) <= limit]
    if not kept:
        raise ConfigError(f"data.seq_len: expected room for a prompt and rl.gen_length ({r.gen_length}) tokens, "
                          f"found every one of the {len(rows)} prompts longer than {limit} tokens "
                          f"(data.seq_len {cfg.data.seq_len} - rl.gen_length)")
    return kept, len(rows) - len(kept)


def prompt_iterator(cfg: ml_collections.ConfigDict, rows: Sequence[Mapping[str, Any]],
                    mesh=None) -> grain.DatasetIterator:
    """Checkpointable iterator of lists of `prompt_rows`, reshuffled each epoch with the run seed:
    `rl.prompts_per_step` of them, or with `mesh` this process's share of them (`prompt_split`;
    the same global list on any number of processes)."""
    from llada_jax import data

    index, count = prompt_split(cfg, mesh) if mesh is not None else (0, 1)
    per_step = cfg.rl.prompts_per_step // count
    ds = data.rows_for_process(grain.MapDataset.source(list(rows)).shuffle(cfg.seed).repeat(None),
                               per_step, index, count)
    return iter(ds.to_iter_dataset().batch(per_step, batch_fn=list))


# ------------------------------------------------------------------------------ pieces of a step
def advantages(algorithm: str, scores: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`(advantages [B], sample_mask [B])` of the algorithm; only DiPO drops samples."""
    r = jnp.asarray(scores)
    if algorithm == "ebpo":
        adv, keep = rl.group_normalized_advantages(r, group_size), jnp.ones(r.shape, bool)
    elif algorithm == "espo":
        adv, keep = rl.leave_one_out_advantages(r, group_size), jnp.ones(r.shape, bool)
    else:
        adv, keep = rl.zscore_advantages(r, group_size)
    return np.asarray(adv, np.float32), np.asarray(keep)


def bucket(n: int, size: int) -> int:
    """`n` rounded up to a multiple of `size` (static shapes: few compiled programs)."""
    return -(-n // size) * size


ROLLOUT_ENGINES = ("groups", "generate")


def rollout(params, model_config: ModelConfig, prompts: Sequence[Sequence[int]], cfg: ml_collections.ConfigDict,
            key: jax.Array, mesh=None,
            on_finish: Optional[Callable[[int, list[int]], None]] = None) -> decode.GenerateOutput:
    """G samples per prompt from the policy `params` as they are (rows grouped by prompt, row r
    sampling with `fold_in(key, r)`); DiPO's also record every write of the decoder (its exact
    trajectory). With `mesh`, `prompts` are this process's and the rows are decoded as part of
    the global batch.

    `rl.rollout_engine` "groups" (default) decodes with `decode.rollouts.generate_groups`: each
    prompt prefilled once for its G rows, rows stopped at their EOS (`rl.eos_early_stop`) and
    the batch shrunk as they finish; `on_finish(row, tokens)` hears of each row as it finishes.
    "generate" is the static batch of `decode.generate` (every row decoded until the slowest is
    done; `on_finish` called for every row at the end). Both give the same rollouts, token for
    token. On several processes "groups" has each process decode its own prompts on its own
    devices (`hosts.process_blocks(mesh).local`, rows numbered as in the global batch so the
    draws are one process's), from a whole copy of the params on them (`params` as the loop
    passes them, `hosts.process_local_copy`, or made here from the global ones); where a
    process's devices are not a block of the mesh it falls back to `generate` (same rollouts).
    """
    r = cfg.rl
    dtype = r.get("rollout_dtype")
    if dtype:
        if dtype not in DTYPES:
            raise ConfigError(f"rl.rollout_dtype: expected None or one of {DTYPES}, found {dtype!r}")
        model_config = model_config.replace(dtype=dtype)
    engine = r.get("rollout_engine", "groups")
    if engine not in ROLLOUT_ENGINES:
        raise ConfigError(f"rl.rollout_engine: expected one of {ROLLOUT_ENGINES}, found {engine!r}")
    kw = dict(gen_length=r.gen_length, block_length=cfg.objective.block_size, preset=r.preset,
              temperature=r.temperature, rng=key, record_trajectory=r.algorithm == "dipo",
              eos_early_stop=bool(r.get("eos_early_stop", True)))
    if engine == "groups" and jax.process_count() == 1:
        return group_rollouts.generate_groups(params, model_config, list(prompts), group_size=r.group_size,
                                              on_finish=on_finish, mesh=mesh, **kw)
    blocks = hosts.process_blocks(mesh) if engine == "groups" and mesh is not None else None
    if blocks is not None:
        if not all(x.is_fully_addressable for x in jax.tree_util.tree_leaves(params)):
            params = hosts.process_local_copy(params, blocks)
        # This process's slice of the global rows (its index does not depend on the batch size).
        index, _ = hosts.batch_rows(mesh, hosts.batch_ways(mesh), "rl.prompts_per_step x rl.group_size")
        return group_rollouts.generate_groups(params, model_config, list(prompts), group_size=r.group_size,
                                              on_finish=on_finish, mesh=blocks.local,
                                              row_offset=index * len(prompts) * r.group_size, **kw)
    if engine == "groups":
        logging.log_first_n(logging.WARNING, "rl.rollout_engine=groups: the processes' devices are not one block "
                            "of the mesh each; rollouts decode as one static batch (decode.generate, the same "
                            "rollouts)", 1)
    rows = [p for p in prompts for _ in range(r.group_size)]
    out = decode.generate(params, model_config, rows, mesh=mesh, **kw)
    if on_finish is not None:
        for row, tokens in enumerate(out.tokens):
            on_finish(row, tokens)
    return out


def _reduce_inner(metrics: Sequence[Mapping[str, Any]]) -> dict:
    """One row from the μ inner updates: means, except the ratio extremes (min / max over all)."""
    out = {}
    for k in metrics[0]:
        v = np.stack([np.asarray(m[k], np.float64) for m in metrics])
        out[k] = float(v.min() if k == "ratio_min" else v.max() if k == "ratio_max" else v.mean())
    return out


def resolve_reward(cfg: ml_collections.ConfigDict) -> rewards.RewardFn:
    """`rl.reward` (a name in `rewards.REWARDS` or `package.module:function`), with the code reward
    under `rl.sandbox`'s limits; resolved at start-up so that a bad name fails before any step."""
    from llada_jax.rewards import sandbox

    r = cfg.rl
    if not (isinstance(r.reward_workers, int) and r.reward_workers >= 0):
        raise ConfigError(f"rl.reward_workers: expected an integer >= 0, found {r.reward_workers!r}")
    if r.reward_timeout_s is not None and not r.reward_timeout_s > 0:
        raise ConfigError(f"rl.reward_timeout_s: expected None or a value > 0, found {r.reward_timeout_s!r}")
    limits = {k: v for k, v in dict(r.get("sandbox", {}) or {}).items() if v is not None}
    try:
        return rewards.reward_fn(r.reward, sandbox.SandboxConfig(**limits) if limits else None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"rl.{'reward' if 'reward' in str(e) else 'sandbox'}: {e}") from None


def held_out_eval(params, model_config: ModelConfig, tokenizer, examples, cfg: ml_collections.ConfigDict,
                  mesh=None) -> dict:
    """`heldout.evaluate` in each of `rl.eval_modes` (greedy), flattened as `eval_<mode>_<field>`.
    With `mesh`, every process decodes its share of the examples and gets every metric back."""
    out = {}
    for mode in cfg.rl.eval_modes:
        res = heldout.evaluate(params, model_config, tokenizer, examples, mode=mode, gen_length=cfg.rl.gen_length,
                                block_length=cfg.objective.block_size, template=cfg.data.template, mesh=mesh)
        out.update({f"eval_{mode}_{k}": res[k] for k in ("accuracy", "reward", "tpf")})
        out[f"{TIME_PREFIX}eval_{mode}_s"] = res["seconds"]
    return out


# ------------------------------------------------------------------------------ the loop
def run_rl(cfg: ml_collections.ConfigDict, workdir: str, model_config: ModelConfig, tokenizer, *,
           init_params: Optional[Any] = None, reward_fn: Optional[rewards.RewardFn] = None,
           progress: bool = True, base_from: Optional[str] = None) -> train.TrainState:
    """RL from `init_params` (or a random init from the seed) until `cfg.total_steps` RL steps.

    Resumes from the latest checkpoint in `<workdir>/checkpoints`. `init_params` is also the
    frozen reference of the KL term, so pass the same params on resume. `reward_fn` overrides
    `cfg.rl.reward` (a name in `rewards.REWARDS`). Returns the final state.

    With `cfg.lora.rank > 0` only adapters train (`train.lora_setup`): `init_params` is the frozen
    base and also the KL reference (no second copy), the rollouts and evaluations decode the base
    with the adapters merged (one merged copy per RL step), and checkpoints hold the adapters and
    `base_from`, the base's path. `lora.dropout` must be 0 (the scored policy is the sampling one).
    """
    r = cfg.rl
    if r.algorithm == "espo" and r.group_size < 2:
        raise ConfigError(f"rl.group_size: expected >= 2 for ESPO's leave-one-out advantages, found {r.group_size}")
    os.makedirs(workdir, exist_ok=True)
    mesh = train.mesh_from_config(cfg)
    per_update = check_update_config(cfg, mesh)  # global rollouts of one update (a mini-batch); before any work
    tx = make_rl_optimizer(cfg)
    adapters = train.lora_setup(cfg, model_config, mesh, init_params, base_from)
    if adapters and adapters.config.dropout > 0:
        raise ConfigError(f"lora.dropout: expected 0 for RL (the likelihood ratio scores the policy that sampled), "
                          f"found {adapters.config.dropout}")
    boxed = adapters.boxed if adapters else None
    shardings = train.state_shardings(model_config, tx, mesh, boxed=boxed)
    ckpt = train.make_checkpointer(cfg, workdir, train.init_state_abstract(model_config, tx, boxed))
    rng = jax.random.key(cfg.seed)
    rollout_key, noise_key = jax.random.fold_in(rng, _ROLLOUT_STREAM), jax.random.fold_in(rng, _NOISE_STREAM)
    reward = reward_fn or resolve_reward(cfg)
    rows, dropped = prompt_rows(cfg, workdir, tokenizer)
    if dropped:
        logging.warning("RL prompts: dropped %d of %d longer than data.seq_len - rl.gen_length = %d tokens",
                        dropped, len(rows) + dropped, cfg.data.seq_len - r.gen_length)
    prompts_it = prompt_iterator(cfg, rows, mesh)
    del rows
    proc_index, proc_count = prompt_split(cfg, mesh)
    local_rows = r.prompts_per_step // proc_count * r.group_size  # this process's rollouts per step

    rl_config = build_rl_config(cfg)
    # The initial params: the reference when beta > 0 (a buffer of its own: the state's are donated).
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        if adapters:
            init_params = adapters.base  # the frozen base, already in its shards
        elif init_params is None:
            init_params = jax.jit(lambda k: model.init_params(model_config, k), out_shardings=shardings.params)(
                jax.random.fold_in(rng, _INIT_STREAM))
        else:
            init_params = jax.device_put(init_params, shardings.params)
    start, resumed_pending = ckpt.latest_step(), None
    if start is not None:
        abstract = checkpoint.abstract_with_shardings(train.init_state_abstract(model_config, tx, boxed), shardings)
        state, extra = ckpt.restore(abstract, step=start, config=model_config)
        train.check_lora_resume(extra, adapters, ckpt.directory)
        data_state = checkpoint.data_state_for_process(extra, start, r.prompts_per_step // proc_count)
        if isinstance(data_state, dict) and "iterator" in data_state:  # saved with the next step's rollouts
            resumed_pending, data_state = data_state.get("pending"), data_state["iterator"]
        prompts_it.set_state(data_state)
    else:
        start = 0
        if adapters:
            state = train.init_state(model_config, tx, mesh, rng, shardings, init_fn=adapters.init_fn)
        else:
            state = train.init_state(model_config, tx, mesh, rng, shardings, init_params)
    ref_params = init_params if rl_config.beta > 0 else None
    del init_params  # without a KL term, no second copy of the model stays on device
    log = train.MetricsLog(workdir, resume_step=start)
    extra_json = {"model_config": checkpoint.config_to_json(model_config), "run_config": cfg.to_dict()}
    base_args = ()
    if adapters:
        extra_json["lora"] = adapters.to_json()
        base_args = (adapters.base,)
        # Merged weights in the run's param_dtype: with a bf16 base (lora.base_dtype) the rollouts decode
        # the weights the update's forward forms in fp32, not their bf16 rounding.
        merge = jax.jit(lambda b, a: lora.merge(b, a, adapters.config, dtype=model_config.param_dtype),
                        out_shardings=adapters.base_shardings)

    def policy(state):
        """The params that decode: the state's, or the base with the adapters merged."""
        return merge(adapters.base, state.params) if adapters else state.params

    # The rollouts' copy of θ in their compute dtype (rl.rollout_dtype, else the model's `dtype`),
    # made once per step where the params are held in another (bf16 compute of fp32 params): the
    # same tokens as decoding the params as they are (every weight but the router's is cast where it
    # is used), at half the bytes held and read. One process: in place on the run's mesh (an
    # elementwise cast of each shard), the decode layout is the training one. Several with group
    # rollouts: each process decodes its own prompts on its own devices, so the copy is gathered
    # whole onto every process's block of the mesh, laid out there as the params are on the mesh.
    rollout_dtype = r.get("rollout_dtype") or model_config.dtype
    cast = None
    if jnp.dtype(rollout_dtype) != jnp.dtype(model_config.param_dtype):
        cast = functools.partial(model.compute_params, dtype=rollout_dtype)
    blocks = hosts.process_blocks(mesh) if jax.process_count() > 1 and r.get("rollout_engine", "groups") == "groups" \
        else None
    rollout_copy = jax.jit(cast) if cast is not None else None
    if blocks is not None:
        rollout_copy = functools.partial(hosts.process_local_copy, blocks=blocks, fn=cast)

    eval_examples = [] if r.eval_every <= 0 else (
        _file_examples(r.eval_file, "auto", "rl.eval_file")
        if r.eval_file else list(train.open_examples(cfg, workdir, r.eval_split)))[:r.eval_examples]

    terms_fns: dict = {}  # jitted programs per RLConfig (DiPO: one per num_steps bucket)
    step_fns: dict = {}
    n_mini = r.get("mini_batches", 1)
    local_per_update = local_rows // n_mini

    def global_mini_batches(batch: Mapping[str, np.ndarray]) -> list[dict]:
        """This process's rows in `rl.mini_batches` consecutive slices, each a global batch."""
        n = local_per_update
        return [hosts.global_batch(mesh, {k: np.asarray(v)[j * n:(j + 1) * n] for k, v in batch.items()},
                                   per_update, "rl.mini_batches") for j in range(n_mini)]

    def terms_of(params, config, mb, key):
        """`rl.policy_terms` of one mini-batch (θ_old's or the reference's), one program per config."""
        mb = {k: v for k, v in mb.items() if k in ("tokens", "completion_mask", "example_ids", "write_step",
                                                    "write_token")}  # what the terms read: one program
        if config not in terms_fns:
            fn = functools.partial(rl.policy_terms, model_config=model_config, config=config)
            terms_fns[config] = hosts.compile_together(jax.jit(fn), params, mb, key, name=f"rl_terms/{len(terms_fns)}")
        return terms_fns[config](params, mb, key)

    def decode_step(s, params, with_old: bool) -> dict:
        """Steps 1 and 4's packing: step s's prompts, rollouts from `params`, this process's rows
        packed (global row ids), and with `with_old` θ_old's terms of every mini-batch from
        `params`, the policy that drew them (pipelining: taken before the update in flight)."""
        rows = next(prompts_it)
        prompts = [row["prompt"] for row in rows]
        metas = [row["meta"] for row in rows for _ in range(r.group_size)]
        # Rows are scored as they finish decoding, in the reward threads beside the decode.
        scorer = rewards.Scorer(metas, reward, workers=r.reward_workers, timeout_s=r.reward_timeout_s)
        t = time.perf_counter()
        out = rollout(rollout_copy(params) if rollout_copy else params, model_config, prompts, cfg,
                      jax.random.fold_in(rollout_key, s), mesh,
                      on_finish=lambda row, tokens: scorer.add(row, heldout.completion_text(tokens, tokenizer)))
        decode_s = time.perf_counter() - t
        block = cfg.objective.block_size
        if r.algorithm == "dipo":
            batch = rl.pack_trajectory(out, bucket(max(cfg.data.seq_len, int(out.canvas_lengths.max())), block),
                                       pad_id=tokenizer.pad_id)
        else:
            batch = rl.pack_rollouts([p for p in prompts for _ in range(r.group_size)], out.tokens,
                                     bucket(cfg.data.seq_len, block), pad_id=tokenizer.pad_id, gen_length=r.gen_length)
        # Global row ids: each example's noise is that of its row in the one-process batch.
        batch["example_ids"] = np.arange(len(out.tokens), dtype=np.int32) + proc_index * local_rows
        extra = {}
        if r.algorithm == "dipo":  # a static length: the longest trajectory of any process
            longest = int(hosts.allgather(np.int64(rl.dipo_num_steps(batch["write_step"], block))).max())
            extra["dipo_num_steps"] = bucket(longest, r.dipo_step_bucket)
        rec = dict(s=s, scorer=scorer, out=out, batch=batch, extra=extra, old=None, staleness=int(with_old),
                   decode_s=decode_s)
        if with_old:
            config, key = step_config(extra), jax.random.fold_in(noise_key, s)
            rec["old"] = [terms_of(params, config, mb, key) for mb in global_mini_batches(batch)]
        return rec

    def score_step(rec) -> dict:
        """Step 3: rewards, advantages and the step's reward metrics (every process's rows)."""
        out = rec.pop("out")
        t = time.perf_counter()
        scores, errors = rec.pop("scorer").result()  # what is still running when the last row finished
        rec["reward_wait_s"] = time.perf_counter() - t
        adv, keep = advantages(r.algorithm, scores, r.group_size)  # groups are whole on each process
        # Every process's rows, in global order: the metrics and the skip decision are global.
        every = {k: v.reshape(-1) for k, v in hosts.allgather(dict(
            scores=np.asarray(scores, np.float32), adv=adv, keep=keep.astype(np.int32), generated=out.num_generated,
            forwards=np.asarray(out.forwards), length=np.array([len(t) for t in out.tokens]),
            errors=np.array([len(errors)]),
            timeouts=np.array([sum(e.error_type == "TimeoutError" for e in errors)]))).items()}
        all_scores = every["scores"].astype(np.asarray(scores).dtype)
        rec.update(adv=adv, keep=keep, signal=bool(np.any((every["adv"] != 0) & (every["keep"] > 0))), metrics=dict(
            reward_mean=float(all_scores.mean()), reward_std=float(all_scores.std()),
            accuracy=float(np.mean(all_scores >= 1.0)), reward_errors=int(every["errors"].sum()),
            reward_timeouts=int(every["timeouts"].sum()), samples_kept=float(every["keep"].mean()),
            rollout_tpf=float(every["generated"].sum() / max(every["forwards"].sum(), 1)),
            completion_tokens=float(np.mean(every["length"])), prompts_dropped=dropped))
        return rec

    def step_config(extra):
        return build_rl_config(cfg, extra["dipo_num_steps"]) if r.algorithm == "dipo" else rl_config

    def update(state, rec):
        """Steps 4-5: the reference's terms and μ epochs of `rl.mini_batches` updates with one key.
        θ_old is the policy that drew the rollouts in every update: its terms are `rec["old"]` when
        `decode_step` took them (pipelining), else the first update's own (`rl.make_rl_step`'s
        on-policy program) and, for the other mini-batches, taken from the current params before
        the first update. Returns the new state, the updates' metrics (on device, not waited for),
        the step's fixed metrics and the time the terms were ready."""
        s, config, extra = rec["s"], step_config(rec["extra"]), rec["extra"]
        key = jax.random.fold_in(noise_key, s)
        batch = dict(rec["batch"], advantages=rec["adv"], sample_mask=rec["keep"])
        mbs = global_mini_batches(batch)
        if ref_params is not None:
            for mb in mbs:
                mb["ref_terms"] = terms_of(ref_params, config, mb, key)
        old = rec["old"]
        if old is None:
            params = policy(state)
            old = [None] + [terms_of(params, config, mb, key) for mb in mbs[1:]]
        # The first update's placeholder (on-policy: ignored, replaced by its own terms).
        zeros = np.zeros(rl.terms_shape(mbs[0], config), np.float32)
        for mb, o in zip(mbs, old):
            mb["old_terms"] = o if o is not None else \
                hosts.global_batch(mesh, {"t": zeros[:local_per_update]}, per_update)["t"]
        jax.block_until_ready(mbs)
        t_terms = time.perf_counter()
        if config not in step_fns:
            compiled = hosts.compile_together(
                _jit_rl_step(rl.make_rl_step(model_config, config, tx, adapters.config if adapters else None,
                                             accum_steps=cfg.optim.accum_steps),
                             shardings, mesh, mbs[0], adapters.base_shardings if adapters else None),
                state, mbs[0], key, np.bool_(True), *base_args, name=f"rl_step/{len(step_fns)}")
            step_fns[config] = (lambda c: lambda st, b, k, op: c(st, b, k, op, *base_args))(compiled)
        state, inner = rl.run_updates(step_fns[config], state, mbs, key, inner_updates(cfg),
                                      on_policy_first=old[0] is None)
        return state, inner, extra, t_terms

    pending = None  # the next step's decoded and scored rollouts (pipelining), or None
    if resumed_pending is not None:
        pending = _pending_from_json(resumed_pending, mesh, per_update)
        if pending["s"] != start:
            raise checkpoint.IncompatibleCheckpointError(
                f"{ckpt.directory} step {start}: the saved next-step rollouts are step {pending['s']}'s")

    bar = _progress(start, cfg.total_steps, progress)
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES), \
                preemption.PreemptionGuard(check_every=cfg.get("preemption_check_every", 1)) as guard:
            if start == 0 and r.eval_every > 0:
                log.write(0, held_out_eval(policy(state), model_config, tokenizer, eval_examples, cfg, mesh))
            for s in range(start, cfg.total_steps):
                t0 = time.perf_counter()
                rec, pending = pending, None
                if rec is None:  # on-policy: drawn from the current params
                    rec = score_step(decode_step(s, policy(state), with_old=False))
                done = s + 1
                metrics = {"updated": int(rec["signal"] or not r.skip_no_signal), "rollout_staleness": rec["staleness"]}
                if r.get("pipeline", False) and done < cfg.total_steps:
                    # One step off-policy: step s+1's rollouts from the params before update s,
                    # decoded (and θ_old's terms taken) before the update is dispatched.
                    pending = decode_step(done, policy(state), with_old=True)
                t1 = t2 = time.perf_counter()
                inner = None
                if metrics["updated"]:
                    state, inner, extra, t2 = update(state, rec)
                    metrics.update(extra)
                if pending is not None:
                    pending = score_step(pending)  # on the host, while the device runs update s
                if inner is not None:
                    metrics.update(_reduce_inner(jax.device_get(inner)))
                t3 = time.perf_counter()

                if not np.isfinite(metrics.get("loss", 0.0)):
                    raise train.NonFiniteLossError(
                        f"RL step {done}: loss is {metrics['loss']}; stopping. The last good checkpoint is "
                        f"step {ckpt.latest_step()} in {ckpt.directory}")
                metrics.update(rec["metrics"])
                metrics.update({f"{TIME_PREFIX}rollout_s": t1 - t0, f"{TIME_PREFIX}decode_s": rec["decode_s"],
                                f"{TIME_PREFIX}reward_wait_s": rec["reward_wait_s"], f"{TIME_PREFIX}likelihood_s": t2 - t1,
                                f"{TIME_PREFIX}update_s": t3 - t2, f"{TIME_PREFIX}step_s": t3 - t0})
                if r.eval_every > 0 and (done % r.eval_every == 0 or done == cfg.total_steps):
                    metrics.update(held_out_eval(policy(state), model_config, tokenizer, eval_examples, cfg, mesh))
                log.write(done, metrics)

                def save():
                    data_state = prompts_it.get_state()
                    if pending is not None:  # the next step's rollouts: drawn from params no checkpoint holds
                        data_state = {"iterator": data_state, "pending": _pending_to_json(pending, mesh)}
                    ckpt.save(done, state, extra=extra_json, data_state=data_state, force=True)

                saved = done % cfg.checkpoint_every == 0 or done == cfg.total_steps
                if saved:
                    save()
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                                clip=f"{metrics.get('clip_frac', 0.0):.3f}")
                bar.update(1)
                if guard.should_stop(done) and done < cfg.total_steps:
                    if not saved:
                        save()
                    logging.warning("preempted (%s): saved RL step %d of %d in %s; rerun the same command to "
                                    "resume", guard.reason, done, cfg.total_steps, ckpt.directory)
                    break
    finally:
        bar.close()
        ckpt.close()
    return state


def _array_to_json(x: np.ndarray) -> dict:
    x = np.asarray(x)
    return {"dtype": str(x.dtype), "shape": list(x.shape), "data": x.reshape(-1).tolist()}


def _array_from_json(d: Mapping[str, Any]) -> np.ndarray:
    return np.asarray(d["data"], dtype=np.dtype(d["dtype"])).reshape(d["shape"])


def _pending_to_json(rec: Mapping[str, Any], mesh) -> dict:
    """A decoded and scored step (pipelining) as JSON for the checkpoint's per-process data state:
    this process's packed rows, advantages and θ_old's terms, and the step's reward metrics.
    Exact: float32 values go through Python floats, which hold them."""
    out = {k: rec[k] for k in ("s", "extra", "staleness", "signal", "metrics", "decode_s", "reward_wait_s")}
    out["batch"] = {k: _array_to_json(v) for k, v in rec["batch"].items()}
    out["adv"], out["keep"] = _array_to_json(rec["adv"]), _array_to_json(rec["keep"])
    out["old"] = None if rec["old"] is None else [_array_to_json(hosts.host_local(o, mesh)) for o in rec["old"]]
    return out


def _pending_from_json(d: Mapping[str, Any], mesh, per_update: int) -> dict:
    """`_pending_to_json`'s inverse: θ_old's terms back on the mesh as the mini-batches' rows."""
    rec = {k: d[k] for k in ("s", "extra", "staleness", "signal", "metrics", "decode_s", "reward_wait_s")}
    rec["batch"] = {k: _array_from_json(v) for k, v in d["batch"].items()}
    rec["adv"], rec["keep"] = _array_from_json(d["adv"]), _array_from_json(d["keep"])
    rec["old"] = None if d["old"] is None else [
        hosts.global_batch(mesh, {"t": _array_from_json(o)}, per_update, "rl.mini_batches")["t"] for o in d["old"]]
    return rec


def _jit_rl_step(step_fn, shardings: train.TrainState, mesh, example_batch: Mapping[str, Any],
                 base_shardings: Any = None):
    """`rl.make_rl_step`'s step jitted on the mesh: the state donated, the returned terms sharded
    like the batch (they are the next inner update's `old_terms`); LoRA: the frozen base last."""
    b_sh = train.batch_sharding(mesh, dict(example_batch))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    base = (base_shardings,) if base_shardings is not None else ()
    return jax.jit(step_fn, in_shardings=(shardings, b_sh, replicated, replicated, *base),
                   out_shardings=(shardings, replicated, b_sh["old_terms"]), donate_argnums=(0,))


def _progress(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="rl", unit="step", disable=not enabled, dynamic_ncols=True)
