r"""What a model answers to the quickstart's four sums, greedy and sampled, printed as JSON.

  python launch/quickstart.py --workdir=/tmp/qs                   # a trained model
  python bench/sums.py --config=configs/quickstart.py --workdir=/tmp/qs \
      --checkpoints=/tmp/qs/sft/checkpoints,/tmp/qs/rl_ebpo/checkpoints

The quickstart's teacher drops every carry in 60% of its demonstrations, so an SFT model's
answer to a sum is the right one, the teacher's carry-less one, or something else. EBPO learns
from the rollouts it samples (temperature 1 by default): where few sampled answers to the sums that
need a carry are right, the rewards carry little of the signal it climbs on. For each checkpoint,
mode (`--modes`) and temperature (`--temperatures`; 0 = greedy, as the held-out table decodes) this
decodes the first `--eval_examples` held-out prompts and reports the share of sums of each kind
(`llada_jax.data.tasks.addition_answer_kinds`), the share of the sums needing a carry that came out
right, accuracy (all four right) and TPF. Sampling keys come from `--seed`.

One process on this machine's devices (a single-host measurement: no distributed runtime).
"""

import json

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from llada_jax import launcher, train
from llada_jax.data import tasks
from llada_jax.evaluation import heldout

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Run config (configs/*.py[:args]): the task and its split.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The run's workdir (tokenizer, data).", required=True)
flags.DEFINE_list("checkpoints", None, "Checkpoint directories to compare.", required=True)
flags.DEFINE_integer("eval_examples", 128, "Held-out examples.")
flags.DEFINE_list("modes", ["S"], "Presets.")
flags.DEFINE_list("temperatures", ["0", "1"], "Sampling temperatures (0 = greedy).")
flags.DEFINE_integer("seed", 0, "Sampling key.")


def answer_shares(completions, metas) -> dict:
    """Shares of the sums by kind, and of the sums needing a carry that are right."""
    kinds = [k for c, m in zip(completions, metas) for k in tasks.addition_answer_kinds(c, m)]
    carry = [kind for kind, needs in kinds if needs]
    shares = {kind: float(np.mean([k == kind for k, _ in kinds])) for kind in tasks.ADDITION_KINDS}
    return {"sums": len(kinds), **shares, "carry_sums": len(carry),
            "right_of_carry_sums": float(np.mean([k == "right" for k in carry])) if carry else 0.0}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    cfg, workdir = FLAGS.config, FLAGS.workdir
    pairs = cfg.data.task_config.get("num_pairs", 1)
    if cfg.data.task != "addition" or pairs < 2:
        raise app.UsageError(f"--config: expected the several-pair addition task (data.task 'addition', "
                             f"num_pairs >= 2), found task {cfg.data.task!r} with num_pairs {pairs}")
    train.enable_compilation_cache()
    examples = list(train.open_examples(cfg, workdir, "test"))[:FLAGS.eval_examples]
    report = {"examples": len(examples), "block_length": cfg.objective.block_size, "runs": []}
    for path in FLAGS.checkpoints:
        run = launcher.load(path)
        prompts, metas = heldout.prompts_and_metas(examples, run.tokenizer, cfg.data.template)
        gen_length = max(cfg.data.seq_len - max(len(p) for p in prompts), 1)
        for mode in FLAGS.modes:
            for temperature in map(float, FLAGS.temperatures):
                r = heldout.evaluate(run.params, run.config, run.tokenizer, examples, mode=mode,
                                     gen_length=gen_length, block_length=cfg.objective.block_size,
                                     template=cfg.data.template, return_outputs=True,
                                     temperature=temperature, rng=jax.random.key(FLAGS.seed))
                texts = [heldout.completion_text(t, run.tokenizer) for out in r["outputs"] for t in out.tokens]
                row = {"checkpoint": path, "mode": mode, "temperature": temperature,
                       "accuracy": round(r["accuracy"], 4), "tpf": round(r["tpf"], 3)}
                row.update({k: (round(v, 4) if isinstance(v, float) else v)
                            for k, v in answer_shares(texts, metas).items()})
                report["runs"].append(row)
                print(json.dumps(row), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    app.run(main)
