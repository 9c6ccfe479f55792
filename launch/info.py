r"""Parameter counts (total / active per token) and bytes, without allocating the model.

  python launch/info.py --preset=flash
  python launch/info.py --hf_dir=/path/LLaDA2.1-mini        # reads config.json only
  python launch/info.py --preset=mini --by_module
Prints one JSON object.

It touches no device (shapes only), so it needs no distributed runtime on any number of hosts.
"""

import json

import jax
import numpy as np
from absl import app, flags, logging

from llada_jax import model
from llada_jax.model.config import ModelConfig, get_config

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "tiny", "Preset name (tiny, small, mini, flash).")
flags.DEFINE_string("hf_dir", None, "An HF checkpoint directory or config.json instead of a preset.")
flags.DEFINE_string("param_dtype", None, "Parameter dtype for the byte count (default: the config's).")
flags.DEFINE_bool("by_module", False, "Also list parameters per top-level module.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file operation at INFO
    config = ModelConfig.from_hf_config(FLAGS.hf_dir) if FLAGS.hf_dir else get_config(FLAGS.preset)
    if FLAGS.param_dtype:
        config = config.replace(param_dtype=FLAGS.param_dtype)
    abstract = jax.tree_util.tree_map(lambda x: getattr(x, "value", x), model.abstract_params(config),
                                      is_leaf=lambda x: hasattr(x, "value"))
    leaves = jax.tree_util.tree_leaves_with_path(abstract)
    counts = config.param_counts()
    total = sum(int(np.prod(v.shape)) for _, v in leaves)
    assert total == counts["total"], (total, counts)  # shapes and the closed form agree
    out = {
        "config": FLAGS.hf_dir or FLAGS.preset,
        "total_params": total,
        "active_params": counts["active"],
        "bytes": sum(int(np.prod(v.shape)) * v.dtype.itemsize for _, v in leaves),
        "param_dtype": config.param_dtype,
        "layers": {"dense": config.num_dense_layers, "moe": config.num_moe_layers},
    }
    if FLAGS.by_module:
        mods = {}
        for path, v in leaves:
            key = str(path[0].key)
            mods[key] = mods.get(key, 0) + int(np.prod(v.shape))
        out["by_module"] = mods
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    app.run(main)
