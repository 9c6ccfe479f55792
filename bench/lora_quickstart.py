r"""LoRA vs full fine-tuning on the quickstart task, from the same SFT model; one JSON line per run.

  python launch/quickstart.py --rl_steps=0                    # the SFT model, /tmp/llada_quickstart/sft
  python bench/lora_quickstart.py --sft=/tmp/llada_quickstart/sft/checkpoints --workdir=/tmp/lora_qs

For each stage (`--stages`: `rl` = EBPO against the task's reward, `sft` = more SFT on the noisy
teacher's demonstrations) and each rank (`--ranks`, 0 = full fine-tuning) it runs the stage from the
`--sft` checkpoint with the quickstart's settings (configs/rl.py, configs/quickstart.py) and prints
`{"stage", "rank", "trainable_params", "steps", "step_s", "heldout": {"accuracy", "reward", "tpf"},
"heldout_before", "lr"}`: held-out = greedy S-mode decoding of the first `--eval_examples` problems of
the test split as launch/quickstart.py's table decodes them (all four sums right / share of right
sums), before and after; `step_s` the median wall time of the steps after the first (EBPO: `time_step_s`, rollouts
included; SFT: the run's wall time over its steps after the first call, compilation excluded).
LoRA runs use `--lora_lr` (adapters start at zero and take larger steps), full ones the stage's lr.
A rerun with the same --workdir resumes each run from its checkpoints.
"""

import json
import os
import statistics
import time

import jax
from absl import app, flags

from llada_jax import launcher, train
from llada_jax.evaluation import heldout
from llada_jax.model import lora
from llada_jax.rl import loop as rl_loop

FLAGS = flags.FLAGS
flags.DEFINE_string("sft", None, "The quickstart's SFT checkpoints directory (the common start).", required=True)
flags.DEFINE_string("workdir", "/tmp/lora_qs", "One subdirectory per stage and rank.")
flags.DEFINE_list("stages", ["rl"], "rl (EBPO) and / or sft.")
flags.DEFINE_list("ranks", ["0", "8", "32"], "0 = full fine-tuning.")
flags.DEFINE_integer("rl_steps", 10, "EBPO steps.")
flags.DEFINE_integer("sft_steps", 100, "SFT steps.")
flags.DEFINE_float("lora_lr", 1e-3, "Learning rate of the LoRA runs (both stages).")
flags.DEFINE_integer("eval_examples", 256, "Held-out problems decoded before and after.")


def _config(stage: str, rank: int):
    import importlib.util

    name = "rl.py" if stage == "rl" else "quickstart.py"
    spec = importlib.util.spec_from_file_location("_cfg", os.path.join(os.path.dirname(__file__), "..", "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(None)
    if stage == "rl":
        cfg.total_steps = FLAGS.rl_steps
        cfg.checkpoint_every = FLAGS.rl_steps
        cfg.rl.eval_every = 0  # evaluated here, before and after, the same way for every run
    else:
        cfg.total_steps = FLAGS.sft_steps
        cfg.checkpoint_every = FLAGS.sft_steps
        cfg.log_every = 1  # the step-1 log marks the end of the first call (compilation) for step_s
        cfg.optim.warmup_frac = 0.0
        # From a trained SFT model, full and LoRA alike: the from-scratch balancing of the
        # quickstart's SFT (optim.expert_bias_rate) moves the bias, which LoRA keeps frozen.
        cfg.optim.expert_bias_rate = 0.0
    cfg.lora.rank = rank
    if rank:
        cfg.optim.lr = FLAGS.lora_lr
    return cfg


def _evaluate(params, run, cfg, workdir):
    """As launch/quickstart.py's table: the test split, greedy, S mode, the canvas of data.seq_len."""
    examples = list(train.open_examples(cfg, workdir, "test"))[:FLAGS.eval_examples]
    prompts, _ = heldout.prompts_and_metas(examples, run.tokenizer, cfg.data.template)
    out = heldout.evaluate(params, run.config, run.tokenizer, examples, mode="S",
                           gen_length=max(cfg.data.seq_len - max(len(p) for p in prompts), 1),
                           block_length=cfg.objective.block_size, template=cfg.data.template, mesh=run.mesh)
    return {k: round(float(out[k]), 4) for k in ("accuracy", "reward", "tpf")}


def run_one(stage: str, rank: int) -> dict:
    cfg = _config(stage, rank)
    workdir = os.path.join(FLAGS.workdir, f"{stage}_r{rank}")
    run = launcher.setup(cfg, workdir, init_from=FLAGS.sft)
    before = _evaluate(run.params, run, cfg, workdir)
    t0 = time.perf_counter()
    if stage == "rl":
        state = rl_loop.run_rl(cfg, workdir, run.config, run.tokenizer, init_params=run.params, base_from=FLAGS.sft,
                               progress=False)
        rows = train.read_metrics(workdir)
        step_s = statistics.median(r["time_step_s"] for r in rows[1:]) if len(rows) > 1 else None
    else:
        obj = train.build_objective(cfg, run.config, extra_special_ids=run.tokenizer.special_ids)
        it = train.train_iterator(cfg, workdir, run.tokenizer)
        first = []
        state = train.run_training(cfg, workdir, run.config, obj, it, init_params=run.params, progress=False,
                                   base_from=FLAGS.sft,
                                   on_log=lambda step, m: first.append(time.perf_counter()) if step == 1 else None)
        end = time.perf_counter()
        step_s = (end - first[0]) / (FLAGS.sft_steps - 1) if first and FLAGS.sft_steps > 1 else None
    wall = time.perf_counter() - t0
    _, params = launcher.load_params(os.path.join(workdir, "checkpoints"), run.config)
    after = _evaluate(params, run, cfg, workdir)
    trainable = lora.count(state.params)
    return dict(stage=stage, rank=rank, lr=cfg.optim.lr, trainable_params=trainable, steps=int(cfg.total_steps),
                step_s=None if step_s is None else round(step_s, 3), wall_s=round(wall, 1), heldout_before=before,
                heldout=after, eval_examples=FLAGS.eval_examples, devices=jax.device_count())


def main(argv):
    del argv
    for stage in FLAGS.stages:
        for rank in (int(r) for r in FLAGS.ranks):
            print(json.dumps(run_one(stage, rank)), flush=True)


if __name__ == "__main__":
    app.run(main)
