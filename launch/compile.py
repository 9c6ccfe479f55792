r"""Compile a job ahead of time for a TPU topology on this (CPU-only) machine; print its memory plan.

  pip install -e '.[tpu]'    # libtpu: XLA's TPU compiler, no TPU needed
  python launch/compile.py --config=configs/sft.py:size=mini --topology=v5p-64 --job=sft
  python launch/compile.py --config=configs/rl_pod.py:size=mini --topology=v5p-64 --job=rl
  python launch/compile.py --config=configs/sft.py:size=mini --topology=v5e-16 --job=decode \
      --config.data.batch_size=64 --prompt_length=1024 --gen_length=2048 \
      --config.model.overrides.param_dtype=bfloat16

Prints ONE JSON line: job, topology, chips, mesh, per-chip argument / output / temporary /
generated-code / total bytes, the chip's HBM, `fits` (total <= 90% of HBM) and compile seconds.
When XLA refuses the program (out of HBM) the line carries `fits: false` and a readable `error`
naming the job and the shortfall, and the exit status is 1.

--topology: Cloud names (v5p-64 = 64 TensorCores = 32 chips; v5e-16, v6e-32 count chips) or
generation:shape (v5p:2x4x4, v5e:4x4). The mesh is the one launch/train.py builds from the
config's `mesh` section over the topology's chips (configs/sft.py:size=mini on v5p-64: fsdp=4 x
expert=8); --data/--fsdp/--tensor/--expert override single axes (one given as -1 takes the
remaining chips; the config's own -1 axes then become 1). "auto" attention / MoE back ends
resolve for the TPU and that mesh (llada_jax/model/backends.py). Configs and `--config.x=...`
overrides are those of launch/train.py (--job=sft, --job=decode) and launch/rl.py (--job=rl: a
config with an `rl` section).
"""

import os

# Before JAX initialises: the default backend stays the CPU (a concrete array on the device-less
# TPU client would fail); the TPU compiler is reached through the topology only.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import json  # noqa: E402
import sys  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from llada_jax import aot  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py[:args]).", lock_config=True)
flags.DEFINE_string("topology", None, "TPU slice: v5p-64, v6e-32, v5e-16, ... or v5p:2x4x4.", required=True)
flags.DEFINE_enum("job", "sft", aot.JOBS, "What to compile: the SFT train step, the RL update step, decoding.")
flags.DEFINE_integer("data", None, "Override the config's mesh.data; -1: the remaining chips.")
flags.DEFINE_integer("fsdp", None, "Override the config's mesh.fsdp; -1: the remaining chips.")
flags.DEFINE_integer("tensor", None, "Override the config's mesh.tensor.")
flags.DEFINE_integer("expert", None, "Override the config's mesh.expert.")
flags.DEFINE_integer("prompt_length", 1024, "--job=decode: prompt tokens per row.")
flags.DEFINE_integer("gen_length", 2048, "--job=decode: tokens to generate per row.")
flags.DEFINE_float("temperature", 0.0, "--job=decode: 0 compiles greedy decoding, > 0 sampling.")
flags.DEFINE_integer("mbe_window", 0, "--job=decode: Multi-Block Editing window (0 = off).")
flags.DEFINE_enum("quantize", None, ["int8", "fp8"], "--job=decode: weights stored int8 / FP8 (per-block scales).")
flags.DEFINE_integer("hbm_mib", None, "Compile as if each chip had this much HBM (MiB); default: the chip's.")
flags.mark_flag_as_required("config")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    topology = aot.parse_topology(FLAGS.topology)
    report = aot.plan(FLAGS.job, FLAGS.config, topology, data=FLAGS.data, fsdp=FLAGS.fsdp, tensor=FLAGS.tensor,
                      expert=FLAGS.expert, hbm_mib=FLAGS.hbm_mib,
                      **(dict(prompt_length=FLAGS.prompt_length, gen_length=FLAGS.gen_length,
                              temperature=FLAGS.temperature, mbe_window=FLAGS.mbe_window,
                              quantize=FLAGS.quantize)
                         if FLAGS.job == "decode" else {}))
    print(json.dumps(report), flush=True)
    if "required_bytes" in report:  # XLA refused: out of HBM
        print(f"error: {report['error']}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
