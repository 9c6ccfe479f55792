r"""Block-diffusion CPT / SFT (REFERENCE §2-4).

  python launch/train.py --config=configs/quickstart.py --workdir=/tmp/llada_sft
  python launch/train.py --config=configs/quickstart.py:task=sudoku --workdir=/tmp/sudoku \
      --config.total_steps=2000 --config.checkpoint_every=500
  python launch/train.py --config=configs/sft.py:size=mini --workdir=/runs/mini --init_from=/ckpt/mini ...

--init_from: a trainer's checkpoints directory, a params-only Orbax checkpoint (launch/convert.py's)
or an HF directory; the tokenizer.json it carries (or its run's) is used unless
--config.data.tokenizer says otherwise. It only sets the starting params: a rerun resumes from
--workdir's own checkpoints.

Rerunning the same command resumes from the latest checkpoint in --workdir. SIGTERM (a TPU
maintenance event, a scheduler's stop) saves a checkpoint at the current step and exits 0.
Metrics: <workdir>/metrics.jsonl (one JSON object per logged step; `val_loss` every
--config.eval_every steps when that is > 0).
"""

from absl import app, flags
from ml_collections import config_flags

from llada_jax import launcher, train
from llada_jax.parallel import hosts

FLAGS = flags.FLAGS
hosts.define_flags()  # --coordinator_address, --num_processes, --process_id
config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py[:args]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the task tokenizer go here.", required=True)
flags.DEFINE_string("init_from", None, "Initial params: a trainer's checkpoints directory, a params-only Orbax "
                    "checkpoint (launch/convert.py's) or an HF directory. Default: --config.model.hf_dir, else random.")
flags.mark_flag_as_required("config")


def main(argv):
    del argv
    cfg = FLAGS.config
    run = launcher.setup(cfg, FLAGS.workdir, init_from=FLAGS.init_from)  # else --config.model.hf_dir, else random
    obj_config = train.build_objective(cfg, run.config, extra_special_ids=run.tokenizer.special_ids)
    it = train.train_iterator(cfg, FLAGS.workdir, run.tokenizer)
    held_out = train.eval_batches(cfg, FLAGS.workdir, run.tokenizer)  # None unless --config.eval_every > 0
    state = train.run_training(cfg, FLAGS.workdir, run.config, obj_config, it, init_params=run.params,
                               eval_data=held_out, base_from=FLAGS.init_from or cfg.model.hf_dir or None)  # recorded with LoRA adapters
    if not hosts.is_primary():  # the others have nothing of their own to report
        return
    if int(state.step) < cfg.total_steps:  # SIGTERM: saved at this step, exit 0 so a scheduler requeues
        print(f"preempted at step {int(state.step)} of {cfg.total_steps}; checkpoint in {FLAGS.workdir}/checkpoints, "
              f"rerun the same command to resume")
    else:
        print(f"finished at step {int(state.step)}; metrics in {FLAGS.workdir}/metrics.jsonl, "
              f"checkpoints in {FLAGS.workdir}/checkpoints")


if __name__ == "__main__":
    app.run(main)
