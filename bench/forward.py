r"""Model benchmarks, printed as one JSON object (performance claims live here, not in tests).

  python bench/forward.py                      # forward tokens/s (tiny, small) and ragged/dense MoE ratio
  python bench/forward.py --presets=small --batch=8 --length=512

Times exclude compilation (one warm-up call) and are medians over --repeats calls.
On CPU only ratios measured side by side in one run are meaningful; absolute numbers
are reported for completeness.

One process on this machine's devices (a single-host benchmark: no distributed runtime).
"""

import json
import platform

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from llada_jax import model
from llada_jax.model import masks
from llada_jax.model.config import get_config
from llada_jax.timing import time_call

FLAGS = flags.FLAGS
flags.DEFINE_list("presets", ["tiny", "small"], "Presets to time the forward of.")
flags.DEFINE_integer("batch", 4, "Batch size.")
flags.DEFINE_integer("length", 256, "Sequence length.")
flags.DEFINE_integer("block", 32, "Block size of the block-causal mask.")
flags.DEFINE_integer("repeats", 5, "Timed calls per measurement (median reported).")
flags.DEFINE_integer("moe_experts", 64, "Experts for the ragged-vs-dense MoE comparison.")


def _forward_fn(config, length):
    mask = masks.block_causal(length, FLAGS.block)
    return jax.jit(lambda p, t: model.forward(p, config, t, mask=mask))


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file operation at INFO
    out = {"device": jax.devices()[0].device_kind, "platform": platform.machine(), "batch": FLAGS.batch,
           "length": FLAGS.length, "forward": {}}
    tokens_n = FLAGS.batch * FLAGS.length
    for name in FLAGS.presets:
        config = get_config(name)
        params = model.init_params(config, jax.random.key(0))
        tokens = jax.random.randint(jax.random.key(1), (FLAGS.batch, FLAGS.length), 0, config.vocab_size - 2)
        sec, comp, _ = time_call(_forward_fn(config, FLAGS.length), params, tokens, repeats=FLAGS.repeats)
        out["forward"][name] = {"params": config.param_counts()["total"], "tokens_per_s": round(tokens_n / sec, 1),
                                "seconds": round(sec, 5), "compile_s": round(comp, 2)}

    # Ragged (sorted dropless) vs dense (every expert on every token) MoE, same weights.
    cfg = get_config("small", num_experts=FLAGS.moe_experts, num_experts_per_tok=4, n_group=8, topk_group=4)
    params = model.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (FLAGS.batch, FLAGS.length), 0, cfg.vocab_size - 2)
    res = {}
    for impl in ("ragged", "dense"):
        sec, _, _ = time_call(_forward_fn(cfg.replace(moe_impl=impl), FLAGS.length), params, tokens,
                              repeats=FLAGS.repeats)
        res[impl] = sec
    out["moe"] = {"experts": FLAGS.moe_experts, "top_k": 4, "ragged_s": round(res["ragged"], 5),
                  "dense_s": round(res["dense"], 5), "ragged_over_dense_time": round(res["ragged"] / res["dense"], 3)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    app.run(main)
