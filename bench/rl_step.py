r"""One RL step, before and after group rollouts, side by side in one run, printed as JSON (REFERENCE §6).

  python bench/rl_step.py                                   # tiny preset, 16 prompts x 8, gen 256, block 32
  python bench/rl_step.py --preset=small                    # the issue's full settings (slow on a CPU)
  python bench/rl_step.py --prompts=4 --group=4 --gen=128 --steps=2   # a quick look
  python bench/rl_step.py --decode_only                     # the two rollout decodes alone

Every arm runs `rl.loop.run_rl` (EBPO, its default μ = 2, N = `--timesteps`) for `--steps` steps from
the same params on the same prompts with the same reward; only the rollout and scoring settings differ:

  serial: the loop as issue #20 found it: `rl.rollout_engine=generate`, `rl.eos_early_stop=False`
          (the static batch: every row decodes all `gen` tokens, each of a group's G rows
          prefills the prompt), then `rl.reward_workers=0`: the completions scored one after
          another in the loop's thread (not in the default `--arms`: add it, `--arms=serial,before,after`);
  before: the same static batch, rewards scored in `rl.reward_workers` threads once the whole
          batch is decoded;
  after:  `rl.rollout_engine=groups`, `rl.eos_early_stop=True` (`decode.rollouts`: each prompt
          prefilled once, rows stop after their EOS, the batch shrinks as they finish), each row
          scored as it finishes, in the same threads, while the others decode.

Reported per arm, medians over the steps after the first (which compiles): seconds per step split
into rollout (decode, then the wait for rewards still running), likelihood + reference terms and
update, the completion lengths, and prefill rows per group (G before, 1 after). The update is
the same program on the same shapes in both arms (`pack_rollouts` pads every row to the canvas).

The policy: a random init cannot end a completion, so its `lm_head` is sharpened (times
`--sharpen`, so that drafts pass the S threshold as a trained model's do) and its EOS column is
replaced by a random direction of norm `--eos_scale` times the mean column norm, so completions
end at varied lengths (printed: their quantiles). The reward: a code-execution verifier, each
completion's program run in the sandbox (`rewards.sandbox`), `--slow_share` of them sleeping
`--slow_s` seconds (a slow test suite), chosen by a hash of the completion.

`--decode_only` times just the decodes of the first step's rollouts, `rl.loop.rollout` under each
arm's settings from the same policy, prompts and key (no rewards, no update; `--reps` runs of each
after one that compiles, the arms interleaved): the decode's own ratio, which on this 2-core CPU
the step blurs, as the reward programs scored during the after arm's decode take its cores.

On CPU only the ratios of this one run mean anything. Memory: the update at gen 256 (canvas 320,
128 rows) differentiates through N composite forwards; with `rl.grad_mode=direct` (configs/rl.py's)
even a scan keeps every timestep's activations for the backward pass, so XLA:CPU plans 20.2 GB of
temporaries for 32 rows and asked for 80.7 GB for 128 (tiny preset, N = 8, dense `xla`
attention). The defaults here, `replay` (one timestep's activations: REFERENCE §6, Memory), a
scan, and blocked attention, plan 9.1 GB for 128 rows.
"""

import copy
import json
import os
import platform
import tempfile
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from llada_jax import model, train
from llada_jax.rewards import sandbox
from llada_jax.rl import loop as rl_loop

FLAGS = flags.FLAGS
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "rl.py")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "The RL run config (configs/rl.py).", lock_config=True)
flags.DEFINE_string("preset", "tiny", "Model preset.")
flags.DEFINE_integer("prompts", 16, "Prompts per step (P).")
flags.DEFINE_integer("group", 8, "Rollouts per prompt (G).")
flags.DEFINE_integer("gen", 256, "Generated tokens per rollout.")
flags.DEFINE_integer("block", 32, "Block size.")
flags.DEFINE_integer("steps", 3, "RL steps per arm (the first compiles and is not counted).")
flags.DEFINE_integer("workers", 8, "Reward threads (rl.reward_workers).")
flags.DEFINE_float("slow_share", 0.2, "Share of completions whose program is slow.")
flags.DEFINE_float("slow_s", 0.5, "Seconds a slow program sleeps.")
flags.DEFINE_float("sharpen", 6.0, "lm_head scale of the synthetic policy.")
flags.DEFINE_float("eos_scale", 1.6, "EOS column norm / mean column norm of the synthetic policy.")
flags.DEFINE_integer("timesteps", 8, "EBPO likelihood timesteps N of the update (rl.num_timesteps).")
flags.DEFINE_string("vectorize", "scan", "rl.vectorize of the update: batch (N timesteps at once) or scan.")
flags.DEFINE_string("grad_mode", "replay", "rl.grad_mode of the update: replay (one timestep's activations) "
                    "or direct (every timestep's: see the docstring's memory figures).")
flags.DEFINE_string("attention_impl", "blocked", "model.overrides.attention_impl (configs/rl.py pins the "
                    "quickstart's dense `xla`; blocked is the CPU's choice).")
flags.DEFINE_list("arms", ["before", "after"], "Arms to run, in this order: serial, before, after "
                  "(module docstring).")
flags.DEFINE_bool("decode_only", False, "Time only the arms' rollout decodes (module docstring).")
flags.DEFINE_integer("reps", 3, "--decode_only: timed decodes per arm.")

ARMS = {"serial": {"rl.rollout_engine": "generate", "rl.eos_early_stop": False, "rl.reward_workers": 0},
        "before": {"rl.rollout_engine": "generate", "rl.eos_early_stop": False},
        "after": {"rl.rollout_engine": "groups", "rl.eos_early_stop": True}}


def code_execution_reward(completion: str, meta) -> float:
    """Runs a program in the sandbox: a slow one for `--slow_share` of the completions (by hash)."""
    del meta
    slow = zlib.crc32(completion.encode()) % 1000 < FLAGS.slow_share * 1000
    program = f"import time\ntime.sleep({FLAGS.slow_s})\n" if slow else "x = sum(range(1000))\n"
    result = sandbox.run_assert_tests(program, ["assert True"], sandbox.SandboxConfig(timeout_s=30.0))
    return float(result.passed) / max(result.total, 1) * (len(completion) % 7) / 6.0


def _config(data_dir: str, arm: str):
    """`--config` with this benchmark's sizes and the arm's rollout settings."""
    cfg = copy.deepcopy(FLAGS.config)
    seq = -(-(48 + FLAGS.gen) // FLAGS.block) * FLAGS.block
    overrides = {"model.preset": FLAGS.preset, "data.data_dir": data_dir, "data.seq_len": seq,
                 "objective.block_size": FLAGS.block, "total_steps": FLAGS.steps, "checkpoint_every": 10 ** 6,
                 "rl.prompts_per_step": FLAGS.prompts, "rl.group_size": FLAGS.group, "rl.gen_length": FLAGS.gen,
                 "rl.eval_every": 0, "rl.reward_workers": FLAGS.workers, "rl.skip_no_signal": False,
                 "rl.num_timesteps": FLAGS.timesteps, "rl.vectorize": FLAGS.vectorize, "rl.grad_mode": FLAGS.grad_mode,
                 "model.overrides.attention_impl": FLAGS.attention_impl, **ARMS[arm]}
    with cfg.unlocked():
        for key, value in overrides.items():
            node = cfg
            *path, last = key.split(".")
            for part in path:
                node = node[part]
            node[last] = value
    return cfg


def _policy(model_config, key):
    params = jax.jit(model.init_params, static_argnums=0)(model_config, key)
    head = params["lm_head"] * FLAGS.sharpen  # [D, V]
    norm = jnp.linalg.norm(head, axis=0).mean()
    direction = jax.random.normal(jax.random.fold_in(key, 1), (head.shape[0],))
    eos = direction / jnp.linalg.norm(direction) * norm * FLAGS.eos_scale
    params["lm_head"] = head.at[:, model_config.eos_token_id].set(eos)
    return params


def decode_only(root: str) -> dict:
    """Each arm's `rl.loop.rollout` of the first step's prompts, timed (module docstring)."""
    cfgs = {arm: _config(os.path.join(root, "data"), arm) for arm in FLAGS.arms}
    cfg = cfgs[FLAGS.arms[0]]
    workdir = os.path.join(root, "decode")
    model_config = train.build_model_config(cfg)
    tokenizer = train.load_tokenizer(cfg, workdir)
    params = _policy(model_config, jax.random.key(0))
    rows, _ = rl_loop.prompt_rows(cfg, workdir, tokenizer)
    prompts = [row["prompt"] for row in next(rl_loop.prompt_iterator(cfg, rows))]
    key = jax.random.key(1)
    outs, times = {}, {arm: [] for arm in FLAGS.arms}
    for arm in FLAGS.arms:  # compiles
        outs[arm] = rl_loop.rollout(params, model_config, prompts, cfgs[arm], key)
    for _ in range(FLAGS.reps):
        for arm in FLAGS.arms:
            t0 = time.perf_counter()
            rl_loop.rollout(params, model_config, prompts, cfgs[arm], key)
            times[arm].append(round(time.perf_counter() - t0, 3))
    out = {"arms": {}}
    for arm, o in outs.items():
        lengths = [len(t) for t in o.tokens]
        out["arms"][arm] = {
            "decode_s": float(np.median(times[arm])), "times_s": times[arm], "row_forwards": int(np.sum(o.forwards)),
            "slowest_row_forwards": int(np.max(o.forwards)),
            "completion_tokens_quantiles": [int(q) for q in np.quantile(lengths, [0.1, 0.5, 0.9])]}
    if {"before", "after"} <= set(out["arms"]):
        out["decode_speedup"] = round(out["arms"]["before"]["decode_s"] / out["arms"]["after"]["decode_s"], 2)
        out["same_tokens"] = outs["before"].tokens == outs["after"].tokens
    return out


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    root = tempfile.mkdtemp(prefix="rl_step_")
    out = {"device": jax.devices()[0].device_kind, "devices": jax.device_count(), "platform": platform.machine(),
           "preset": FLAGS.preset, "prompts": FLAGS.prompts, "group": FLAGS.group, "gen": FLAGS.gen,
           "block": FLAGS.block, "timesteps": FLAGS.timesteps, "vectorize": FLAGS.vectorize, "grad_mode": FLAGS.grad_mode,
           "attention_impl": FLAGS.attention_impl, "steps_counted": FLAGS.steps - 1, "reward_workers": FLAGS.workers,
           "slow_share": FLAGS.slow_share, "slow_s": FLAGS.slow_s, "arms": {}}
    if FLAGS.decode_only:
        del out["steps_counted"]
        out.update(decode_only=True, reps=FLAGS.reps, **decode_only(root))
        print(json.dumps(out, indent=2))
        return
    for arm in FLAGS.arms:
        cfg = _config(os.path.join(root, "data"), arm)
        workdir = os.path.join(root, arm)
        model_config = train.build_model_config(cfg)
        tokenizer = train.load_tokenizer(cfg, workdir)
        params = _policy(model_config, jax.random.key(0))
        lengths = []
        rl_loop.run_rl(cfg, workdir, model_config, tokenizer, init_params=params, progress=False,
                       reward_fn=lambda c, m: (lengths.append(len(c)), code_execution_reward(c, m))[1])
        rows = train.read_metrics(workdir)[1:]  # the first step compiles
        med = {k: float(np.median([r[k] for r in rows])) for k in rows[0] if k.startswith("time_")}
        step = med["time_step_s"]
        out["arms"][arm] = {
            "step_s": round(step, 3), "rollout_s": round(med["time_rollout_s"], 3),
            "decode_s": round(med["time_decode_s"], 3), "reward_wait_s": round(med["time_reward_wait_s"], 3),
            "likelihood_s": round(med["time_likelihood_s"], 3), "update_s": round(med["time_update_s"], 3),
            "prefill_rows_per_group": 1 if cfg.rl.rollout_engine == "groups" else FLAGS.group,
            "completion_tokens_mean": round(float(np.mean([r["completion_tokens"] for r in rows])), 1),
            "completion_chars_quantiles": [int(q) for q in np.quantile(lengths, [0.1, 0.5, 0.9])],
            "rollout_tpf": round(float(np.mean([r["rollout_tpf"] for r in rows])), 3),
            "reward_mean": [round(r["reward_mean"], 4) for r in rows]}
    if {"before", "after"} <= set(out["arms"]):
        b, a = out["arms"]["before"], out["arms"]["after"]
        out["step_speedup"] = round(b["step_s"] / a["step_s"], 2)
        out["rollout_speedup"] = round(b["rollout_s"] / a["rollout_s"], 2)
        # The arms draw the same rollouts: their rewards must agree step for step.
        out["same_rewards"] = b["reward_mean"] == a["reward_mean"]
    if {"serial", "after"} <= set(out["arms"]):
        s, a = out["arms"]["serial"], out["arms"]["after"]
        out["step_speedup_vs_serial"] = round(s["step_s"] / a["step_s"], 2)
        out["rollout_speedup_vs_serial"] = round(s["rollout_s"] / a["rollout_s"], 2)
        out["same_rewards_as_serial"] = s["reward_mean"] == a["reward_mean"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    app.run(main)
