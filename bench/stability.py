r"""Stability of EBPO's sequence ratio on long completions: the paper's form, dual-clip and
per-token normalisation side by side (REFERENCE §6).

  python launch/quickstart.py --rl_steps=0 --workdir=/tmp/llada_quickstart     # the SFT model
  python bench/stability.py --init_from=/tmp/llada_quickstart/sft/checkpoints --workdir=/tmp/stability

EBPO's `log rho = sum_n w_n sum_k (elbo_θ - elbo_old)` sums every block's difference with weights
up to 1/(N t_floor), so it grows with the completion's length; for a negative advantage PPO's clip
keeps `rho * A`, whose gradient grows with rho. The same short EBPO run is repeated once per
variant from the same SFT model with the same seeds (the first step's rollouts are identical):

  paper      `rl.normalize="none"`, no dual clip (the paper's form)
  dual_clip  `rl.dual_clip=--dual_clip`: for A < 0 the objective is floored at c * A
  token      `rl.normalize="token"`: log rho divided by the completion's token count
  both       dual clip and per-token normalisation

under a setting that moves the policy within a rollout batch: completions of `--gen_length`
tokens (the quickstart's 20-token answer and EOS blocks after it: 8 blocks of 5 by default),
`--inner_updates` updates per batch and a learning rate `--lr` (by default 4 updates at 1e-3,
against the quickstart's 2 at 1e-4; `--inner_updates=2 --lr=1e-4` is the quickstart's own
setting on the longer completions). It prints one JSON object: per variant the largest and
smallest log rho over the run, the gradient norm (median, max; before clipping), the clip
fraction, the rollout reward at the first step and over the last five, and the held-out
accuracy (S mode, greedy) before the first and after the last step; a run whose loss turns
non-finite reports the step. Runs are resumable (each in `<workdir>/<variant>`).

One process on this machine's devices (a single-host measurement: no distributed runtime).
"""

import json
import math
import os

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from llada_jax import launcher, train
from llada_jax.rl import loop as rl_loop
from llada_jax.train import checkpoint

FLAGS = flags.FLAGS
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "rl.py")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "The RL run config (configs/rl.py).", lock_config=True)
flags.DEFINE_string("init_from", "/tmp/llada_quickstart/sft/checkpoints", "The SFT model's checkpoints directory.")
flags.DEFINE_string("workdir", "/tmp/llada_stability", "One RL run per variant under this directory.")
VARIANTS = {"paper": {}, "dual_clip": {"dual_clip": True}, "token": {"normalize": "token"},
            "both": {"dual_clip": True, "normalize": "token"}}
flags.DEFINE_list("variants", ["paper", "dual_clip", "token"], f"Any of {sorted(VARIANTS)}.")
flags.DEFINE_float("dual_clip", 3.0, "c of the dual-clip variants.")
flags.DEFINE_integer("steps", 20, "RL steps per variant.")
flags.DEFINE_integer("gen_length", 40, "Completion tokens (the prompt + this must fit data.seq_len, raised to fit).")
flags.DEFINE_integer("inner_updates", 4, "Updates per rollout batch (μ).")
flags.DEFINE_float("lr", 1e-3, "Constant learning rate.")
flags.DEFINE_integer("eval_examples", 256, "Held-out examples decoded (S mode) before the first and after the last step.")


def variant_config(base, name: str):
    """`base` with the stress settings and variant `name`'s EBPO options."""
    if name not in VARIANTS:
        raise app.UsageError(f"--variants: expected names in {sorted(VARIANTS)}, found {name!r}")
    cfg = base.copy_and_resolve_references()
    with cfg.unlocked():
        prompt_len = cfg.data.seq_len - cfg.rl.gen_length
        cfg.rl.algorithm = "ebpo"
        cfg.rl.gen_length = FLAGS.gen_length
        cfg.data.seq_len = max(cfg.data.seq_len, prompt_len + FLAGS.gen_length)
        cfg.rl.inner_updates = FLAGS.inner_updates
        cfg.optim.lr = FLAGS.lr
        cfg.total_steps = FLAGS.steps
        cfg.checkpoint_every = max(1, FLAGS.steps // 3)
        cfg.rl.eval_every = FLAGS.steps
        cfg.rl.eval_examples = FLAGS.eval_examples
        cfg.rl.eval_modes = ("S",)
        v = VARIANTS[name]
        cfg.rl.normalize = v.get("normalize", "none")
        cfg.rl.dual_clip = FLAGS.dual_clip if v.get("dual_clip") else None
    return cfg


def summarize(rows: list, error: str = "") -> dict:
    """One variant's figures from its metrics rows (step 0: the evaluation before the first step)."""
    steps = [r for r in rows if r["step"] > 0 and r.get("updated", 0)]
    evals = [r for r in rows if "eval_S_accuracy" in r]
    log_max = [math.log(r["ratio_max"]) for r in steps if r["ratio_max"] > 0]
    log_min = [math.log(r["ratio_min"]) for r in steps if r["ratio_min"] > 0]
    grad = np.array([r["grad_norm"] for r in steps])
    reward = [r["reward_mean"] for r in rows if r["step"] > 0]
    k = min(5, len(reward))
    out = {
        "steps": max((r["step"] for r in rows), default=0),
        "updated_steps": len(steps),
        "log_rho_max": round(max(log_max), 3) if log_max else None,
        "log_rho_min": round(min(log_min), 3) if log_min else None,
        "grad_norm_median": round(float(np.median(grad)), 3) if grad.size else None,
        "grad_norm_max": round(float(grad.max()), 3) if grad.size else None,
        "clip_frac_mean": round(float(np.mean([r["clip_frac"] for r in steps])), 4) if steps else None,
        "reward_step_1": round(reward[0], 4) if reward else None,
        "reward_last_5": round(float(np.mean(reward[-k:])), 4) if reward else None,
        "heldout_S_before": evals[0]["eval_S_accuracy"] if evals else None,
        "heldout_S_after": evals[-1]["eval_S_accuracy"] if len(evals) > 1 else None,
    }
    if error:
        out["stopped"] = error
    return out


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    base = FLAGS.config
    train.enable_compilation_cache()
    model_config = train.build_model_config(base)
    source = os.path.abspath(FLAGS.init_from)
    launcher.adopt_run_files(base, source)  # the SFT run's tokenizer and data, beside its checkpoints
    model_config, init_params = checkpoint.load_params(source, config=model_config)
    result = {"init_from": source, "steps": FLAGS.steps, "gen_length": FLAGS.gen_length,
              "block": base.objective.block_size, "inner_updates": FLAGS.inner_updates, "lr": FLAGS.lr,
              "dual_clip": FLAGS.dual_clip, "variants": {}}
    for name in FLAGS.variants:
        cfg = variant_config(base, name)
        workdir = os.path.join(FLAGS.workdir, name)
        tokenizer = train.load_tokenizer(cfg, workdir)
        error = ""
        try:
            rl_loop.run_rl(cfg, workdir, model_config, tokenizer, init_params=init_params)
        except train.NonFiniteLossError as e:
            error = str(e)
        result["variants"][name] = summarize(train.read_metrics(workdir), error)
        print(f"{name}: {json.dumps(result['variants'][name])}", flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    app.run(main)
