r"""What Multi-Block Editing does on a trained model: held-out accuracy and TPF, printed as JSON.

  python launch/quickstart.py --workdir=/tmp/qs --rl_steps=0          # SFT: four sums per prompt, blocks of 4
  python bench/mbe.py --config=configs/quickstart.py --workdir=/tmp/qs \
      --checkpoint=/tmp/qs/sft/checkpoints --block_length=4

For each mode (S, Q) it decodes the config's held-out split without MBE and with an
`--mbe_window` window in both attentions ("bidirectional", the default, and REFERENCE §5's
"block_causal"), and reports accuracy, mean reward, TPF (every forward counted, MBE ones too) and
how many answers MBE changed. MBE needs several finished blocks per answer: the quickstart's
four sums per prompt in blocks of 4 give four.

One process on this machine's devices (a single-host measurement: no distributed runtime;
launch/eval.py evaluates across hosts).
"""

import json
import os

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from llada_jax import decode, rewards, train
from llada_jax.evaluation import heldout
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


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    cfg, workdir = FLAGS.config, FLAGS.workdir
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
