r"""Draft-and-Edit decoding benchmark, printed as one JSON object (not a test).

  python launch/bench_decode.py                                   # small preset, prompt 64, gen 512, block 32
  python launch/bench_decode.py --preset=tiny --gen_length=128 --block_length=16

For each decoding mode (S, Q, no_edit) with the block KV cache, and for one mode without it:
model forwards, denoising steps, TPF, tokens/s of the timed run, and compile time (first call
minus a second, identical call). The model has random weights (`init_params`), so its
predictions are near uniform: few positions pass any threshold and decoding mostly fills one
token per step through the at-least-one fallback. TPF here therefore measures the decoder's
overheads (prefill, commits, post-fill steps), not the S/Q trade-off of a trained model; the
cached/uncached ratio is meaningful because both paths make the same denoising decisions.
"""

import json
import platform
import time

import jax
import numpy as np
from absl import app, flags

from llada_jax import decoding, model
from llada_jax.config import get_config

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "small", "Model preset (random weights).")
flags.DEFINE_integer("batch", 1, "Prompts per batch.")
flags.DEFINE_integer("prompt_length", 64, "Prompt length.")
flags.DEFINE_integer("gen_length", 512, "Tokens to generate.")
flags.DEFINE_integer("block_length", 32, "Block length.")
flags.DEFINE_list("modes", ["S", "Q", "no_edit"], "Presets to run with the cache.")
flags.DEFINE_string("uncached_mode", "S", "Preset also run without the cache (empty: skip).")
flags.DEFINE_integer("seed", 0, "Seed of the weights and prompts.")
flags.DEFINE_string("moe_impl", "dense", "MoE back end; dense is the faster one on CPU (launch/bench.py).")


def _timed(fn):
    t0 = time.perf_counter()
    first = fn()
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = fn()
    run_s = time.perf_counter() - t0
    return out, run_s, max(first_s - run_s, 0.0)


def main(_):
    config = get_config(FLAGS.preset, moe_impl=FLAGS.moe_impl)
    params = model.init_params(config, jax.random.key(FLAGS.seed))
    rng = np.random.default_rng(FLAGS.seed)
    specials = {config.mask_token_id, config.eos_token_id, config.pad_token_id}
    vocab = np.array([t for t in range(config.vocab_size) if t not in specials])
    prompts = rng.choice(vocab, size=(FLAGS.batch, FLAGS.prompt_length)).tolist()

    def run(mode, use_cache):
        out, run_s, compile_s = _timed(lambda: decoding.generate(
            params, config, prompts, gen_length=FLAGS.gen_length, block_length=FLAGS.block_length,
            preset=mode, use_cache=use_cache))
        generated = int(out.num_generated.sum())
        return {
            "mode": mode, "use_cache": use_cache, "compile_s": round(compile_s, 2), "run_s": round(run_s, 3),
            "tokens_per_s": round(generated / run_s, 2), "generated_tokens": generated,
            "forwards": out.forwards.tolist(), "denoising_steps": out.steps.tolist(),
            "cache_writes": out.cache_writes.tolist(), "tpf": [round(float(t), 3) for t in out.tpf],
            "_tokens": out.tokens,
        }

    results = [run(mode, True) for mode in FLAGS.modes]
    report = {
        "device": jax.devices()[0].device_kind, "platform": platform.platform(), "preset": FLAGS.preset,
        "params": config.param_counts(), "batch": FLAGS.batch, "prompt_length": FLAGS.prompt_length,
        "gen_length": FLAGS.gen_length, "block_length": FLAGS.block_length,
    }
    if FLAGS.uncached_mode:
        cached = next((r for r in results if r["mode"] == FLAGS.uncached_mode), None) \
            or run(FLAGS.uncached_mode, True)
        uncached = run(FLAGS.uncached_mode, False)
        report["cached_vs_uncached"] = {
            "mode": FLAGS.uncached_mode,
            "same_tokens": cached["_tokens"] == uncached["_tokens"],
            "tokens_per_s_ratio": round(cached["tokens_per_s"] / uncached["tokens_per_s"], 2),
            "uncached": {k: v for k, v in uncached.items() if not k.startswith("_")},
        }
    report["modes"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    app.run(main)
