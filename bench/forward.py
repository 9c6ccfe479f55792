r"""Model benchmarks, printed as one JSON object (performance claims live here, not in tests).

  python bench/forward.py                      # forward tokens/s (tiny, small) and ragged/dense MoE ratio
  python bench/forward.py --presets=small --batch=8 --length=512
  python bench/forward.py --presets= --moe_experts=0 --quickstart    # the quickstart's MoE back end: dense vs tiled

`--quickstart`: the MoE back ends on the quickstart's shapes (configs/quickstart.py: the tiny
preset, an SFT loss + gradient on 64 x 40 tokens, forwards of 64 / 8 / 1 rows of one 5-token
block as decoding runs them), each timed as wall seconds and as this process's CPU seconds
(`time.process_time`, all threads), which on a shared machine moves less with other load.

Times exclude compilation (one warm-up call) and are medians over --repeats calls.
On CPU only ratios measured side by side in one run are meaningful; absolute numbers
are reported for completeness.

One process on this machine's devices (a single-host benchmark: no distributed runtime).
"""

import json
import os
import platform
import sys
import time

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
flags.DEFINE_integer("moe_experts", 64, "Experts for the ragged-vs-dense MoE comparison (0: skip it).")
flags.DEFINE_bool("quickstart", False, "Also time the MoE back ends on the quickstart's shapes (dense, tiled).")
flags.DEFINE_list("quickstart_impls", ["dense", "tiled"], "MoE back ends for --quickstart.")


def _cpu_and_wall(fn, *args, repeats: int):
    """Median wall and CPU (all threads of this process) seconds of `repeats` calls after one warm-up."""
    jax.block_until_ready(fn(*args))
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return sorted(wall)[len(wall) // 2], sorted(cpu)[len(cpu) // 2]


def quickstart_moe(repeats: int) -> dict:
    """The quickstart config's SFT step and decoding forwards under each MoE back end, same weights."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
    from common import quickstart_config  # configs/common.py

    from llada_jax.train import objectives, trainer

    cfg = quickstart_config()
    length, prompt = cfg.data.seq_len, cfg.data.seq_len // 2
    tokens = jax.random.randint(jax.random.key(1), (cfg.data.batch_size, length), 0, 500)
    batch = {"tokens": tokens, "loss_mask": jnp.arange(length)[None, :].repeat(cfg.data.batch_size, 0) >= prompt}
    out = {"batch": cfg.data.batch_size, "length": length, "block": cfg.objective.block_size}
    params = None
    for impl in FLAGS.quickstart_impls:
        with cfg.unlocked():
            cfg.model.overrides.moe_impl = impl
        mc = trainer.build_model_config(cfg)
        obj = trainer.build_objective(cfg, mc)
        params = model.init_params(mc, jax.random.key(0)) if params is None else params
        grad = jax.jit(jax.value_and_grad(lambda p, b, k: objectives.loss_fn(p, mc, obj, b, k)[0]))
        fwd = jax.jit(lambda p, t: model.forward(p, mc, t))
        wall, cpu = _cpu_and_wall(grad, params, batch, jax.random.key(2), repeats=repeats)
        row = {"sft_step_s": round(wall, 4), "sft_step_cpu_s": round(cpu, 4)}
        for rows in (64, 8, 1):
            wall, cpu = _cpu_and_wall(fwd, params, jnp.zeros((rows, cfg.objective.block_size), jnp.int32),
                                      repeats=repeats)
            row[f"forward_{rows}x{cfg.objective.block_size}_s"] = round(wall, 5)
            row[f"forward_{rows}x{cfg.objective.block_size}_cpu_s"] = round(cpu, 5)
        out[impl] = row
    return out


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

    if FLAGS.moe_experts > 0:
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
    if FLAGS.quickstart:
        out["quickstart_moe"] = quickstart_moe(max(FLAGS.repeats, 8))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    app.run(main)
