r"""RL (EBPO / ESPO / DiPO) of a block-diffusion model on a verifiable task (REFERENCE §6).

  python launch/train.py --config=configs/quickstart.py --workdir=/tmp/sft --config.total_steps=200
  python launch/rl.py --config=configs/rl.py --workdir=/tmp/rl --init_from=/tmp/sft/checkpoints
  python launch/rl.py --config=configs/rl.py:algorithm=espo --workdir=/tmp/rl_espo --init_from=...

--init_from is a trainer's checkpoints directory, a params-only Orbax checkpoint, or an HF
directory (config.json + safetensors); without it the model starts from a random init. When it
is `<sft workdir>/checkpoints`, that run's tokenizer.json and prepared data are used unless
--config.data.tokenizer / --config.data.data_dir say otherwise. Rerunning the same command
resumes from the latest checkpoint in --workdir; SIGTERM saves the current step and exits 0
(preemption). Metrics: <workdir>/metrics.jsonl.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from llada_jax import launcher, train
from llada_jax.parallel import hosts
from llada_jax.rl import loop as rl_loop

FLAGS = flags.FLAGS
hosts.define_flags()  # --coordinator_address, --num_processes, --process_id
config_flags.DEFINE_config_file("config", None, "Run config file (configs/rl.py[:args]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the tokenizer go here.", required=True)
flags.DEFINE_string("init_from", None, "Initial (and reference) params: a checkpoints directory or an HF directory.")
flags.mark_flag_as_required("config")


def main(argv):
    del argv
    cfg = FLAGS.config
    run = launcher.setup(cfg, FLAGS.workdir, init_from=FLAGS.init_from)
    if run.params is None:
        logging.warning("no --init_from: RL starts from a random init")
    state = rl_loop.run_rl(cfg, FLAGS.workdir, run.config, run.tokenizer, init_params=run.params,
                           base_from=FLAGS.init_from or cfg.model.hf_dir or None)  # recorded with LoRA adapters
    if not hosts.is_primary():  # process 0 wrote the metrics and reports them
        return
    rows = train.read_metrics(FLAGS.workdir)
    modes = cfg.rl.eval_modes if cfg.rl.eval_every > 0 else ()
    for row in (row for row in rows if modes and f"eval_{modes[0]}_accuracy" in row):
        print(f"step {row['step']:>4}: held-out " + ", ".join(
            f"{m} acc {row[f'eval_{m}_accuracy']:.3f} TPF {row[f'eval_{m}_tpf']:.2f}" for m in modes))
    if rows[-1]["step"] < cfg.total_steps:  # SIGTERM: saved at this step, exit 0 so a scheduler requeues
        print(f"preempted at RL step {rows[-1]['step']} of {cfg.total_steps}; checkpoint in "
              f"{FLAGS.workdir}/checkpoints, rerun the same command to resume")
        return
    print(f"finished at RL step {rows[-1]['step']} ({int(state.step)} updates); metrics in "
          f"{FLAGS.workdir}/metrics.jsonl, checkpoints in {FLAGS.workdir}/checkpoints")


if __name__ == "__main__":
    app.run(main)
