r"""What Multi-Block Editing does on a trained model: held-out accuracy and TPF, printed as JSON.

  python launch/quickstart.py --workdir=/tmp/qs --rl_steps=0          # SFT: four sums per prompt, blocks of 4
  python bench/mbe.py --config=configs/quickstart.py --workdir=/tmp/qs \
      --checkpoint=/tmp/qs/sft/checkpoints --block_length=4

For each mode (S, Q) it decodes the config's held-out split without MBE and with an
`--mbe_window` window in both attentions ("bidirectional", the default, and REFERENCE §5's
"block_causal"), and reports accuracy, mean reward, TPF (every forward counted, MBE ones too) and
how many answers MBE changed. MBE needs several finished blocks per answer: the quickstart's
four sums per prompt in blocks of 4 give four.

The study (`--study`, README "Multi-Block Editing on Sudoku rows"): for each training seed it
trains, or resumes, a plain SFT run and an MBE-SFT run of the config (configs/mbe.py: 4x4 Sudoku,
one grid row per block), then decodes the held-out split in each mode for the variants of
`llada_jax.evaluation.mbe_study` (no MBE, training-free MBE, MBE-SFT + MBE, and the control
MBE-SFT without MBE) and prints every seed's metrics and their mean ± std over the seeds as JSON
and as a markdown table:

  python bench/mbe.py --study --config=configs/mbe.py --workdir=/tmp/mbe_study --seeds=0,1,2

The MBE-SFT run is the plain run with MBE SFT's curriculum (K = 2, 3, 4) over its last
`--mbe_steps` steps: it starts from the plain run's checkpoint at `total_steps - mbe_steps` (copied
into its own directory) and trains to `total_steps` under the same learning-rate schedule and data
order (*Project choice*: the same step budget as the plain model, and a second stage, as MBE SFT
is an SFT stage on a trained model in the paper). Runs live in `<workdir>/seed_<s>/{sft,mbe_sft}`;
a rerun resumes them, and the seeds' results accumulate in `<workdir>/mbe_study.json`.

One process on this machine's devices (a single-host measurement: no distributed runtime;
launch/eval.py evaluates across hosts).
"""

import copy
import json
import os
import shutil
import time
from typing import Optional

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from llada_jax import decode, launcher, rewards, train
from llada_jax.evaluation import heldout, mbe_study
from llada_jax.train import checkpoint

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Run config (configs/*.py[:args]).", lock_config=True)
flags.DEFINE_string("workdir", None, "The training run's workdir (tokenizer, data).", required=True)
flags.DEFINE_string("checkpoint", None, "Checkpoint directory (default: <workdir>/checkpoints).")
flags.DEFINE_integer("block_length", 4, "Decoding block length.")
flags.DEFINE_integer("mbe_window", 2, "MBE window in blocks.")
flags.DEFINE_enum("mbe_select", "surprisal", ["surprisal", "last"], "How an MBE window picks its history blocks.")
flags.DEFINE_integer("eval_examples", 256, "Held-out examples.")
flags.DEFINE_list("modes", ["S", "Q"], "Presets.")
flags.DEFINE_string("moe_impl", "dense", "MoE back end (dense is faster on CPU).")
flags.DEFINE_bool("study", False, "Train (or resume) plain and MBE-SFT runs per seed and decode the study's variants.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "--study: training seeds.")
flags.DEFINE_integer("mbe_steps", 150, "--study: MBE SFT steps at the end of the run's total_steps (a multiple of 3).")


def branch_run(source: str, target: str, step: int) -> None:
    """Starts the run in `target` from the checkpoint of step `step` of the run in `source` (both
    trainer workdirs), unless `target` already has checkpoints of its own (a resumed study)."""
    dst = checkpoint.Checkpointer(os.path.join(target, "checkpoints"))
    have = dst.latest_step()
    dst.close()
    if have is not None:
        return
    src = os.path.join(source, "checkpoints", str(step))
    if not os.path.isdir(src):
        raise FileNotFoundError(f"branch: expected the checkpoint of step {step} in {source}/checkpoints, found "
                                f"{sorted(os.listdir(os.path.join(source, 'checkpoints')))}")
    shutil.copytree(src, os.path.join(target, "checkpoints", str(step)))


def study(cfg, workdir: str) -> dict:
    """The study's runs and decodes (module docstring); returns the report it writes."""
    run = launcher.setup(cfg, workdir)
    model_config, tok = run.config, run.tokenizer
    steps, mbe_steps = cfg.total_steps, FLAGS.mbe_steps
    schedule = mbe_study.mbe_schedule(steps, mbe_steps)
    if (steps - mbe_steps) % cfg.checkpoint_every or cfg.keep_checkpoints * cfg.checkpoint_every <= mbe_steps:
        raise ValueError(f"checkpoint_every / keep_checkpoints: expected the plain run to keep its checkpoint of step "
                         f"{steps - mbe_steps}, found checkpoint_every={cfg.checkpoint_every}, "
                         f"keep_checkpoints={cfg.keep_checkpoints}")
    examples = list(train.open_examples(cfg, workdir, "test"))[:FLAGS.eval_examples]
    prompts = heldout.prompts_and_metas(examples, tok, cfg.data.template)[0]
    gen_length = cfg.data.seq_len - max(len(p) for p in prompts)
    settings = {"task": cfg.data.task, "block_length": cfg.objective.block_size, "gen_length": gen_length,
                "total_steps": steps, "mbe_steps": mbe_steps, "mbe_window_schedule": schedule,
                "batch_size": cfg.data.batch_size, "eval_examples": len(examples), "mbe_window": FLAGS.mbe_window,
                "mbe_select": FLAGS.mbe_select, "modes": list(FLAGS.modes)}
    path = os.path.join(workdir, "mbe_study.json")
    report = same_study(path, settings) or {"settings": settings, "by_seed": {}, "seconds": {}}  # keep its seeds
    for seed in (int(s) for s in FLAGS.seeds):
        if str(seed) in report["by_seed"]:  # done by an earlier command of this study
            continue
        base = os.path.join(workdir, f"seed_{seed}")
        plain = copy.deepcopy(cfg)
        with plain.unlocked():
            plain.seed = seed
        with_mbe = copy.deepcopy(plain)
        with with_mbe.unlocked():
            with_mbe.objective.mbe_window_schedule = schedule
        t0 = time.perf_counter()
        models = {}
        for name, run_cfg in (("sft", plain), ("mbe_sft", with_mbe)):
            run_dir = os.path.join(base, name)
            if name == "mbe_sft":
                branch_run(os.path.join(base, "sft"), run_dir, steps - mbe_steps)
            obj = train.build_objective(run_cfg, model_config, extra_special_ids=tok.special_ids)
            print(f"seed {seed}: {name} in {run_dir}", flush=True)
            state = train.run_training(run_cfg, run_dir, model_config, obj, train.train_iterator(run_cfg, workdir, tok))
            models[name] = jax.device_get(state.params)
            del state
        t1 = time.perf_counter()
        result = mbe_study.run_variants(
            models, model_config.replace(moe_impl=FLAGS.moe_impl), tok, examples, modes=FLAGS.modes,
            mbe_window=FLAGS.mbe_window, block_length=cfg.objective.block_size, gen_length=gen_length,
            template=cfg.data.template, mbe_select=FLAGS.mbe_select)
        report["by_seed"][str(seed)] = result
        report["seconds"][str(seed)] = {"train": round(t1 - t0, 1), "decode": round(time.perf_counter() - t1, 1)}
        print(json.dumps({"seed": seed, **result}), flush=True)
        report = write_report(path, report)
    report["summary"] = mbe_study.summarize(report["by_seed"])
    return report


def same_study(path: str, settings: dict) -> Optional[dict]:
    """The report in `path` if it is one of a study with these `settings` (compared as JSON), else None."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        previous = json.load(f)
    return previous if previous["settings"] == json.loads(json.dumps(settings)) else None


def write_report(path: str, report: dict) -> dict:
    """Writes `report` with the seeds of the same study found in `path` merged in (commands for
    different seeds may run side by side in one workdir) and returns what it wrote."""
    previous = same_study(path, report["settings"])
    if previous is not None:
        for key in ("by_seed", "seconds"):
            report[key] = {**previous[key], **report[key]}
    report["summary"] = mbe_study.summarize(report["by_seed"])
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)
    return report


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    cfg, workdir = FLAGS.config, FLAGS.workdir
    if FLAGS.study:
        report = study(cfg, workdir)
        print(json.dumps(report, indent=1))
        print(f"\nheld-out {cfg.data.task}, {report['settings']['eval_examples']} puzzles, blocks of "
              f"{report['settings']['block_length']}, MBE window {FLAGS.mbe_window}; mean ± std over seeds "
              f"{sorted(int(s) for s in report['by_seed'])}")
        print(mbe_study.markdown_table(report["summary"], ("accuracy", "tpf", "edits_per_sample",
                                                           "answers_changed_by_mbe")))
        return
    train.enable_compilation_cache()
    config, params = checkpoint.load_params(FLAGS.checkpoint or os.path.join(workdir, "checkpoints"))
    config = config.replace(moe_impl=FLAGS.moe_impl)
    tok = train.load_tokenizer(cfg, workdir)
    examples = list(train.open_examples(cfg, workdir, "test"))[:FLAGS.eval_examples]
    prompts, metas = heldout.prompts_and_metas(examples, tok, cfg.data.template)
    gen_length = max(cfg.data.seq_len - max(len(p) for p in prompts), 1)
    report = {"workdir": workdir, "examples": len(examples), "block_length": FLAGS.block_length,
              "gen_length": gen_length, "mbe_window": FLAGS.mbe_window, "mbe_select": FLAGS.mbe_select, "runs": []}
    for mode in FLAGS.modes:
        base = None
        for mbe, attention in ((0, "bidirectional"), (FLAGS.mbe_window, "bidirectional"),
                               (FLAGS.mbe_window, "block_causal")):
            out = decode.generate(params, config, prompts, gen_length=gen_length, block_length=FLAGS.block_length,
                                    preset=mode, mbe_window=mbe, mbe_attention=attention, eos_early_stop=True,
                                    mbe_select=FLAGS.mbe_select,
                                    eos_id=tok.eos_id, mask_id=tok.mask_id)
            texts = [heldout.completion_text(t, tok) for t in out.tokens]
            scores, _ = rewards.score(texts, metas, "by_task")
            scores = np.asarray(scores)
            run = {"mode": mode, "mbe_window": mbe, "mbe_attention": attention if mbe else None,
                   "accuracy": round(float(np.mean(scores >= 1.0)), 4), "reward": round(float(np.mean(scores)), 4),
                   "tpf": round(float(out.num_generated.sum() / max(out.forwards.sum(), 1)), 3),
                   "mbe_forwards_per_sample": round(float(out.mbe_forwards.mean()), 2)}
            if base is None:
                base = out.tokens
            else:
                run["answers_changed_by_mbe"] = int(sum(a != b for a, b in zip(out.tokens, base)))
            report["runs"].append(run)
            print(json.dumps(run), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    app.run(main)
