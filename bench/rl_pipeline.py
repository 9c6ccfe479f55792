r"""One-step off-policy pipelining of the RL loop (`rl.pipeline`), off and on side by side in one
process, printed as one JSON object.

  python bench/rl_pipeline.py                                    # configs/rl.py, 6 steps, random init
  python bench/rl_pipeline.py --steps=8 --reward_sleep_s=0.05    # a verifier that takes 50 ms per completion

Each mode runs `rl_loop.run_rl` from the same random init for --steps RL steps in a fresh workdir
(the task's prompts, `configs/rl.py`'s shapes unless overridden with --config.a.b=value). The
reward is the share of digits in the completion (a random init already varies on it, so every
step updates), after sleeping --reward_sleep_s per completion in `rl.reward_workers` threads: the
host-side scoring that pipelining overlaps with the device's update. Reported per mode: the
median `time_step_s` of the steps after the first two (compilation), their sum, and the reward
curve; and the ratio off / on of the medians. On CPU the "device" is the same cores as the host,
so only host work that waits (a sleeping or sandboxed verifier) can overlap.
"""

import json
import os
import platform
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(__file__), "..", "configs", "rl.py"),
                                "RL config (configs/rl.py[:args]).", lock_config=False)
flags.DEFINE_integer("steps", 6, "RL steps per mode (the first two are not timed: compilation).")
flags.DEFINE_float("reward_sleep_s", 0.0, "Seconds each completion's verifier sleeps before scoring.")


def main(argv):
    del argv
    import numpy as np

    from llada_jax import train
    from llada_jax.rl import loop as rl_loop

    if FLAGS.steps < 3:
        raise app.UsageError(f"--steps: expected >= 3 (two untimed), found {FLAGS.steps}")
    sleep = FLAGS.reward_sleep_s

    def slow_digits(completion, meta):
        del meta
        if sleep > 0:
            time.sleep(sleep)
        return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)

    root = tempfile.mkdtemp(prefix="bench_rl_pipeline_")
    cfg = FLAGS.config
    with cfg.unlocked():
        cfg.total_steps = FLAGS.steps
        cfg.checkpoint_every = FLAGS.steps
        cfg.rl.eval_every = 0
        cfg.data.data_dir = os.path.join(root, "data")
    model_config = train.build_model_config(cfg)
    tokenizer = train.load_tokenizer(cfg, root)
    report = {"platform": platform.machine(), "steps": FLAGS.steps, "reward_sleep_s": sleep,
              "rollouts_per_step": cfg.rl.prompts_per_step * cfg.rl.group_size,
              "reward_workers": cfg.rl.reward_workers, "modes": {}}
    for pipeline in (False, True):
        with cfg.unlocked():
            cfg.rl.pipeline = pipeline
        workdir = os.path.join(root, f"pipeline_{pipeline}")
        t = time.perf_counter()
        rl_loop.run_rl(cfg, workdir, model_config, tokenizer, reward_fn=slow_digits, progress=False)
        wall = time.perf_counter() - t
        rows = train.read_metrics(workdir)
        timed = [r["time_step_s"] for r in rows[2:]]
        report["modes"]["on" if pipeline else "off"] = {
            "step_s_median": round(float(np.median(timed)), 3), "timed_steps_s": round(float(np.sum(timed)), 3),
            "wall_s": round(wall, 1), "reward_mean": [round(r["reward_mean"], 4) for r in rows],
            "rollout_staleness": [r["rollout_staleness"] for r in rows]}
    off, on = report["modes"]["off"]["step_s_median"], report["modes"]["on"]["step_s_median"]
    report["speedup_median_step"] = round(off / on, 3)
    print(json.dumps(report))


if __name__ == "__main__":
    app.run(main)
