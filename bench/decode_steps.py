r"""Where a decoding mode's forwards go, block by block, printed as JSON (REFERENCE §5).

  python launch/quickstart.py --workdir=/tmp/qs                   # a trained model
  python bench/decode_steps.py --config=configs/quickstart.py --workdir=/tmp/qs \
      --checkpoint=/tmp/qs/rl_ebpo/checkpoints

TPF says how fast a mode is; this says why. For each mode (`--modes`, and each again with editing
switched off, `tau_edit` > 1, with `--without_editing`) it decodes the held-out split with the
trajectory recorded and reports, per generation block and averaged over blocks:

  draft_steps        steps in which the block's masked positions were filled (M2T): 1 when
                     everything passes `tau_mask` at once, up to B when one position a step does
  steps_with_writes  steps from the block's first fill to its last write (fills and T2T edits)
  denoising_steps    every denoising forward of the block: those plus the forward that confirms
                     it (the LLaDA2.1 loop ends a block with a step that changes nothing)
  writes_per_token   writes per generated position (1 = never edited)
  first_step_fills   how many of the B positions the block's first step filled (a histogram)

and the mode's accuracy (the task's reward == 1), mean reward and TPF (every forward counted).
With blocks of B tokens a block takes at least two forwards (fill, confirm), so TPF is at most
about B / 2 in any mode: a mode's speed comes from its draft steps and its edits.

One process on this machine's devices (a single-host measurement: no distributed runtime).
"""

import json
import os

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from llada_jax import launcher, train
from llada_jax.evaluation import heldout

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Run config (configs/*.py[:args]): the task and its split.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The run's workdir (tokenizer, data).", required=True)
flags.DEFINE_string("checkpoint", None, "Checkpoint directory (default: <workdir>/checkpoints).")
flags.DEFINE_integer("block_length", None, "Decoding block length (default: the config's objective.block_size).")
flags.DEFINE_integer("eval_examples", 256, "Held-out examples.")
flags.DEFINE_list("modes", ["S", "Q"], "Presets.")
flags.DEFINE_bool("without_editing", True, "Also decode each mode with editing off (tau_edit = 1.1).")


def block_steps(write_step: np.ndarray, prompt_lens: np.ndarray, gen_length: int, block: int) -> dict:
    """Per-block step counts from a trajectory's `write_step` [N, L, W] (-1 = no write), over the
    blocks of each row's `gen_length` generated positions (a whole number of blocks)."""
    n = write_step.shape[0]
    nb = gen_length // block
    draft, span, writes, first_fill = [], [], [], []
    for i in range(n):
        ws = write_step[i, prompt_lens[i]:prompt_lens[i] + nb * block]  # [nb * B, W]
        for b in range(nb):
            w = ws[b * block:(b + 1) * block]
            first = w[:, 0]
            if (first < 0).any():  # a block decoding never reached (a stop before it)
                continue
            start = first.min()
            draft.append(len(set(first.tolist())))
            span.append(int(w.max()) - int(start) + 1)
            writes.append(float((w >= 0).sum()) / block)
            first_fill.append(int((first == start).sum()))
    return {"blocks": len(draft), "draft_steps": float(np.mean(draft)), "steps_with_writes": float(np.mean(span)),
            "writes_per_token": float(np.mean(writes)),
            "first_step_fills": np.bincount(first_fill, minlength=block + 1).tolist()}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    cfg, workdir = FLAGS.config, FLAGS.workdir
    train.enable_compilation_cache()
    run = launcher.load(FLAGS.checkpoint or os.path.join(workdir, "checkpoints"))
    block = FLAGS.block_length or cfg.objective.block_size
    examples = list(train.open_examples(cfg, workdir, "test"))[:FLAGS.eval_examples]
    prompts = heldout.prompts_and_metas(examples, run.tokenizer, cfg.data.template)[0]
    gen_length = max(cfg.data.seq_len - max(len(p) for p in prompts), 1)
    gen_length = -(-gen_length // block) * block
    report = {"checkpoint": FLAGS.checkpoint, "examples": len(examples), "block_length": block,
              "gen_length": gen_length, "runs": []}
    variants = [(m, None) for m in FLAGS.modes] + ([(m, 1.1) for m in FLAGS.modes] if FLAGS.without_editing else [])
    for mode, editing in variants:
        kw = {} if editing is None else {"editing_threshold": editing}
        r = heldout.evaluate(run.params, run.config, run.tokenizer, examples, mode=mode, gen_length=gen_length,
                             block_length=block, batch_size=len(examples), template=cfg.data.template,
                             return_outputs=True, record_trajectory=True, eos_id=run.tokenizer.eos_id,
                             mask_id=run.tokenizer.mask_id, **kw)
        out = r["outputs"][0]  # one batch
        row = {"mode": mode, "editing": editing is None, "accuracy": round(r["accuracy"], 4),
               "reward": round(r["reward"], 4), "tpf": round(r["tpf"], 3),
               "forwards_per_sample": round(r["forwards_per_sample"], 2),
               "denoising_steps_per_block": round(float(np.mean(out.steps)) / (gen_length // block), 2)}
        row.update({k: (round(v, 2) if isinstance(v, float) else v) for k, v in block_steps(
            np.asarray(out.trajectory.write_step), np.asarray(out.trajectory.prompt_lengths), gen_length,
            block).items()})
        report["runs"].append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    app.run(main)
