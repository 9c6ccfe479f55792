r"""Converts checkpoints: Hugging Face directory <-> Orbax params checkpoint.

  python launch/convert.py --hf_dir=/path/LLaDA2.1-mini --orbax_dir=/ckpt/mini      # HF -> Orbax
  python launch/convert.py --orbax_dir=/ckpt/mini --hf_dir=/out/mini --to_hf        # Orbax -> HF

HF -> Orbax streams one parameter at a time (the host never holds two copies of the model).
With --mesh, leaves are placed in their shards as they are read. The tokenizer files
(tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja) travel
both ways: into the Orbax directory (where launch/eval.py, generate.py and --init_from find
them) and back into the HF directory. --ignore skips extra tensors the architecture does not
use (comma-separated globs, e.g. --ignore='model.layers.*.mlp.gate.bias'); any other
unexpected tensor is an error that names it.

A LoRA run's checkpoints (adapters and the path of their base, `lora.rank > 0`) convert to HF as the
base with the adapters merged (`checkpoint.load_params`), an ordinary checkpoint in the official layout.

On several hosts (the same command on every one: no extra flags on a TPU pod or under SLURM,
--coordinator_address/--num_processes/--process_id elsewhere; README "Many hosts") the
parameters live in shards on a mesh of every process's devices (--mesh, default FSDP over all
of them): HF -> Orbax reads on each process only its slices and every process writes its part
of the Orbax checkpoint; Orbax -> HF restores in shards, gathers one tensor at a time, and
process 0 writes the safetensors. Both directories must be ones every host sees.
"""

import jax
from absl import app, flags, logging
from tqdm import tqdm

from llada_jax import model
from llada_jax.model import hf
from llada_jax.parallel import hosts, sharding
from llada_jax.train import checkpoint

FLAGS = flags.FLAGS
hosts.define_flags()  # --coordinator_address, --num_processes, --process_id
flags.DEFINE_string("hf_dir", None, "Hugging Face checkpoint directory (config.json + safetensors).", required=True)
flags.DEFINE_string("orbax_dir", None, "Orbax checkpoint directory.", required=True)
flags.DEFINE_bool("to_hf", False, "Convert Orbax -> HF instead of HF -> Orbax.")
flags.DEFINE_string("dtype", None, "Parameter dtype to convert to (float32, bfloat16). Default: as stored.")
flags.DEFINE_string("mesh", None, "Mesh as data,fsdp,tensor,expert sizes (e.g. '1,8,1,1'; -1: the remaining "
                    "devices); default: one device, or FSDP over every device on several processes.")
flags.DEFINE_integer("max_shard_gb", 5, "HF shard size limit in GB (Orbax -> HF).")
flags.DEFINE_list("ignore", [], "HF -> Orbax: glob patterns of extra HF tensors to skip (fnmatch).")


def _mesh_shardings(config):
    spec = FLAGS.mesh or ("1,-1,1,1" if jax.process_count() > 1 else None)  # no process holds the whole model
    if not spec:
        return None
    try:
        d, f, t, e = (int(x) for x in spec.split(","))
    except ValueError:
        raise app.UsageError(f"--mesh: expected four integers data,fsdp,tensor,expert, found {spec!r}")
    mesh = sharding.make_mesh(data=d, fsdp=f, tensor=t, expert=e)
    return sharding.param_shardings(model.abstract_params(config), mesh)


def main(argv):
    del argv
    hosts.initialize_from_flags()  # before anything touches a device
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file operation at INFO
    if not FLAGS.to_hf:
        config = hf.ModelConfig.from_hf_config(FLAGS.hf_dir)
        if FLAGS.dtype:
            config = config.replace(param_dtype=FLAGS.dtype)
        n_leaves = len(hf._leaf_shapes(config))
        with tqdm(total=n_leaves, desc="HF -> Orbax", unit="param", disable=not hosts.is_primary()) as bar:
            config, params = hf.load_hf_checkpoint(FLAGS.hf_dir, dtype=FLAGS.dtype, config=config,
                                                   shardings=_mesh_shardings(config),
                                                   progress=lambda name: bar.update(1), ignore=FLAGS.ignore)
        checkpoint.save_params(FLAGS.orbax_dir, config, params)
        copied = checkpoint.copy_tokenizer_files(FLAGS.hf_dir, FLAGS.orbax_dir)
        counts = config.param_counts()
        if hosts.is_primary():
            print(f"wrote {FLAGS.orbax_dir}: {counts['total']:,} parameters ({counts['active']:,} active)"
                  f"{'; ' + ', '.join(copied) if copied else '; no tokenizer files in ' + FLAGS.hf_dir}")
    else:
        config = checkpoint.read_config(FLAGS.orbax_dir)
        config, params = checkpoint.load_params(FLAGS.orbax_dir, config=config, shardings=_mesh_shardings(config))
        with tqdm(desc="Orbax -> HF", unit="shard", disable=not hosts.is_primary()) as bar:
            files = hf.save_hf_checkpoint(FLAGS.hf_dir, config, params, dtype=FLAGS.dtype,
                                          max_shard_bytes=FLAGS.max_shard_gb * 2**30,
                                          progress=lambda name: bar.update(1))
        files += checkpoint.copy_tokenizer_files(FLAGS.orbax_dir, FLAGS.hf_dir, beside=True)
        if hosts.is_primary():
            print(f"wrote {FLAGS.hf_dir}: {', '.join(files)}")


if __name__ == "__main__":
    app.run(main)
