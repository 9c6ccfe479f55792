r"""Block-diffusion CPT / SFT (REFERENCE §2-4).

  python launch/train.py --config=configs/quickstart.py --workdir=/tmp/llada_sft
  python launch/train.py --config=configs/quickstart.py:task=sudoku --workdir=/tmp/sudoku \
      --config.total_steps=2000 --config.checkpoint_every=500
  python launch/train.py --config=configs/sft_mini.py --workdir=/runs/mini --config.model.hf_dir=/ckpt/mini ...

Rerunning the same command resumes from the latest checkpoint in --workdir.
Metrics: <workdir>/metrics.jsonl (one JSON object per logged step).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from llada_jax import hf, hosts, model, sharding, train

FLAGS = flags.FLAGS
hosts.define_flags()  # --coordinator_address, --num_processes, --process_id
config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py[:args]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the task tokenizer go here.", required=True)
flags.mark_flag_as_required("config")


def main(argv):
    del argv
    hosts.initialize_from_flags()  # before anything touches a device
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file operation at INFO
    cfg = FLAGS.config
    train.enable_compilation_cache()
    model_config = train.build_model_config(cfg)
    tokenizer = train.load_tokenizer(cfg, FLAGS.workdir)
    train.check_tokenizer(model_config, tokenizer)
    init_params = None
    if cfg.model.hf_dir:  # straight into its shards on the run's mesh, in the run's parameter dtype
        shardings = sharding.param_shardings(model.abstract_params(model_config), train.mesh_from_config(cfg))
        model_config, init_params = hf.load_hf_checkpoint(cfg.model.hf_dir, dtype=model_config.param_dtype,
                                                          config=model_config, shardings=shardings)
    obj_config = train.build_objective(cfg, model_config, extra_special_ids=tokenizer.special_ids)
    it = train.train_iterator(cfg, FLAGS.workdir, tokenizer)
    state = train.run_training(cfg, FLAGS.workdir, model_config, obj_config, it, init_params=init_params)
    if hosts.is_primary():  # the others have nothing of their own to report
        print(f"finished at step {int(state.step)}; metrics in {FLAGS.workdir}/metrics.jsonl, "
              f"checkpoints in {FLAGS.workdir}/checkpoints")


if __name__ == "__main__":
    app.run(main)
