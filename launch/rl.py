r"""RL (EBPO / ESPO / DiPO) of a block-diffusion model on a verifiable task (REFERENCE §6).

  python launch/train.py --config=configs/quickstart.py --workdir=/tmp/sft --config.total_steps=200
  python launch/rl.py --config=configs/rl.py --workdir=/tmp/rl --init_from=/tmp/sft/checkpoints
  python launch/rl.py --config=configs/rl.py:algorithm=espo --workdir=/tmp/rl_espo --init_from=...

--init_from is a trainer's checkpoints directory, a params-only Orbax checkpoint, or an HF
directory (config.json + safetensors); without it the model starts from a random init. When it
is `<sft workdir>/checkpoints`, that run's tokenizer.json and prepared data are used unless
--config.data.tokenizer / --config.data.data_dir say otherwise. Rerunning the same command
resumes from the latest checkpoint in --workdir. Metrics: <workdir>/metrics.jsonl.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from llada_jax import checkpoint, hf, hosts, model, rl_loop, sharding, train

FLAGS = flags.FLAGS
hosts.define_flags()  # --coordinator_address, --num_processes, --process_id
config_flags.DEFINE_config_file("config", None, "Run config file (configs/rl.py[:args]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the tokenizer go here.", required=True)
flags.DEFINE_string("init_from", None, "Initial (and reference) params: a checkpoints directory or an HF directory.")
flags.mark_flag_as_required("config")


def main(argv):
    del argv
    hosts.initialize_from_flags()  # before anything touches a device
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file operation at INFO
    cfg = FLAGS.config
    train.enable_compilation_cache()
    model_config = train.build_model_config(cfg)
    init_params = None
    if FLAGS.init_from:
        source = os.path.abspath(FLAGS.init_from)
        parent = os.path.dirname(source)
        if not cfg.data.tokenizer and os.path.exists(os.path.join(parent, "tokenizer.json")):
            cfg.data.tokenizer = os.path.join(parent, "tokenizer.json")
        if not cfg.data.data_dir and os.path.isdir(os.path.join(parent, "data")):
            cfg.data.data_dir = os.path.join(parent, "data")
        # Straight into its shards on the run's mesh (every process reads only its slices).
        shardings = sharding.param_shardings(model.abstract_params(model_config), train.mesh_from_config(cfg))
        if os.path.exists(os.path.join(source, "config.json")):
            model_config, init_params = hf.load_hf_checkpoint(source, dtype=model_config.param_dtype,
                                                              config=model_config, shardings=shardings)
        else:
            model_config, init_params = checkpoint.load_params(source, config=model_config, shardings=shardings)
    else:
        logging.warning("no --init_from: RL starts from a random init")
    tokenizer = train.load_tokenizer(cfg, FLAGS.workdir)
    train.check_tokenizer(model_config, tokenizer)
    state = rl_loop.run_rl(cfg, FLAGS.workdir, model_config, tokenizer, init_params=init_params)
    if not hosts.is_primary():  # process 0 wrote the metrics and reports them
        return
    rows = train.read_metrics(FLAGS.workdir)
    modes = cfg.rl.eval_modes if cfg.rl.eval_every > 0 else ()
    for row in (row for row in rows if modes and f"eval_{modes[0]}_accuracy" in row):
        print(f"step {row['step']:>4}: held-out " + ", ".join(
            f"{m} acc {row[f'eval_{m}_accuracy']:.3f} TPF {row[f'eval_{m}_tpf']:.2f}" for m in modes))
    print(f"finished at RL step {rows[-1]['step']} ({int(state.step)} updates); metrics in "
          f"{FLAGS.workdir}/metrics.jsonl, checkpoints in {FLAGS.workdir}/checkpoints")


if __name__ == "__main__":
    app.run(main)
