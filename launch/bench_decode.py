r"""Draft-and-Edit decoding benchmark, printed as one JSON object (not a test).

  python launch/bench_decode.py                                  # hidden 256, 4 layers, 16 experts, block 32
  python launch/bench_decode.py --baseline_rev=main~5            # 'before' = decoding.py at that git revision
  python launch/bench_decode.py --parts=forward,modes            # skip the engine comparison

Parts, all on one random-weight model in one process (ratios are side by side):

  forward  per-forward time of one cached decoding step (32 tokens against the cache at block
           `--step_block`) vs a plain forward of the same 32 tokens, and vs the baseline's step
           (`model.forward_cached`, the cache through nn.scan and keys over the whole canvas);
  modes    tokens/s of `generate` (prompt 64, gen 512) per mode, now and with the baseline's
           decoding.py loaded from `--baseline_rev` (same tokens checked), plus compile time of
           both loops measured with `lower(...).compile()`;
  engine   64 requests of ragged prompt and generation lengths: the continuous-batching engine
           (`--slots` slots) vs static batches of the same size in arrival order (each batch
           decoded to its longest request), useful tokens/s of both; engine compile time.

Random weights make predictions near uniform, so decoding mostly fills one token per step
through the at-least-one fallback: TPF measures overheads, not the S/Q trade-off of a trained
model (see the README for that); speed ratios are meaningful because both sides make the same
decisions.
"""

import importlib.util
import json
import os
import platform
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from llada_jax import decoding, engine, kvcache, model
from llada_jax.config import get_config

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "tiny", "Base preset (random weights); the flags below override it.")
flags.DEFINE_integer("hidden_size", 256, "Model width.")
flags.DEFINE_integer("num_layers", 4, "Layers (the first dense, the rest MoE).")
flags.DEFINE_integer("num_experts", 16, "Routed experts.")
flags.DEFINE_integer("num_heads", 4, "Query heads.")
flags.DEFINE_integer("head_dim", 64, "Head dim.")
flags.DEFINE_integer("batch", 1, "Prompts per batch in the modes part.")
flags.DEFINE_integer("prompt_length", 64, "Prompt length.")
flags.DEFINE_integer("gen_length", 512, "Tokens to generate.")
flags.DEFINE_integer("block_length", 32, "Block length.")
flags.DEFINE_list("modes", ["S", "Q"], "Presets to time.")
flags.DEFINE_list("parts", ["forward", "modes", "engine"], "What to measure.")
flags.DEFINE_string("baseline_rev", "f9611db", "Git revision whose decoding.py is 'before' (empty: skip).")
flags.DEFINE_integer("step_block", 10, "Block index of the timed cached step.")
flags.DEFINE_integer("requests", 64, "Engine part: number of requests.")
flags.DEFINE_integer("slots", 8, "Engine part: slots, and the static batch size.")
flags.DEFINE_integer("engine_max_gen", 384, "Engine part: generation lengths are uniform in [32, this].")
flags.DEFINE_integer("seed", 0, "Seed of the weights and prompts.")
flags.DEFINE_string("moe_impl", "dense", "MoE back end; dense is the faster one on CPU (launch/bench.py).")


def _config():
    return get_config(FLAGS.preset, moe_impl=FLAGS.moe_impl, hidden_size=FLAGS.hidden_size,
                      num_layers=FLAGS.num_layers, num_experts=FLAGS.num_experts, num_heads=FLAGS.num_heads,
                      head_dim=FLAGS.head_dim)


def _baseline_module(rev):
    """decoding.py as of `rev`, imported as a module of its own (it reuses today's model.py)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = subprocess.run(["git", "show", f"{rev}:llada_jax/decoding.py"], cwd=root, capture_output=True,
                         text=True, check=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "baseline_decoding.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("llada_jax_baseline_decoding", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _time(fn, repeats):
    jax.block_until_ready(fn())
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / repeats


def part_forward(config, params):
    b, n = FLAGS.block_length, FLAGS.batch
    length = decoding.canvas_bucket(-(-(FLAGS.prompt_length + FLAGS.gen_length) // b), 1 << 20) * b
    start = jnp.full((n,), FLAGS.step_block * b, jnp.int32)
    tokens = jax.random.randint(jax.random.key(1), (n, b), 0, config.vocab_size - 2)
    positions = start[:, None] + jnp.arange(b)
    buckets = kvcache.buckets(length // b)

    @jax.jit
    def cached_step(cache):
        logits, kv = kvcache.forward_chunk(params, config, tokens, positions, start, jnp.ones((1, b, b), bool),
                                           cache, kvcache.bucket_index(buckets, start.max() // b),
                                           prefix_buckets=buckets, block_length=b)
        return logits, kvcache.write(cache, kv, start, jnp.ones((n,), bool))

    plain = jax.jit(lambda: model.forward(params, config, tokens))
    canvas_len = -(-(FLAGS.prompt_length + FLAGS.gen_length) // b) * b
    key_block = jnp.arange(canvas_len) // b
    old_mask = key_block[None, None, :] <= (positions // b)[:, :, None]
    old_step = jax.jit(lambda cache: model.forward_cached(params, config, tokens, positions, old_mask, cache, start))
    cache = kvcache.init_cache(config, n, length)
    old_cache = model.init_cache(config, n, canvas_len)
    reps = 30
    t_cached = _time(lambda: cached_step(cache), reps)
    t_plain = _time(plain, reps)
    t_old = _time(lambda: old_step(old_cache), reps)
    return {"tokens": b, "batch": n, "at_block": FLAGS.step_block, "canvas": length,
            "cached_step_ms": round(t_cached * 1e3, 3), "plain_forward_ms": round(t_plain * 1e3, 3),
            "baseline_cached_step_ms": round(t_old * 1e3, 3),
            "cached_over_plain": round(t_cached / t_plain, 3), "baseline_over_cached": round(t_old / t_cached, 2)}


def _decode_args(mod, config, prompts, mode, new):
    """The arguments `generate` would pass to `decode` (to lower and compile it alone)."""
    b, vocab = FLAGS.block_length, config.vocab_size
    p = np.array([len(r) for r in prompts], np.int32)
    canvas_lens = (-(-(p + FLAGS.gen_length) // b) * b).astype(np.int32)
    length = int(canvas_lens.max())
    if new:
        length = decoding.canvas_bucket(length // b, config.max_position_embeddings // b) * b
    canvas = np.full((len(prompts), length), config.mask_token_id, np.int32)
    for i, r in enumerate(prompts):
        canvas[i, :len(r)] = r
    pre = mod.PRESETS[mode]
    common = dict(block_length=b, mask_id=config.mask_token_id, eos_id=config.eos_token_id,
                  pad_id=config.pad_token_id, greedy=True, filter_top=False, use_cache=True, mbe_window=0)
    if new:
        settings = mod.DecodeSettings(**common)
        knobs = mod.make_knobs(vocab, threshold=pre["threshold"], editing_threshold=pre["editing_threshold"])
    else:
        settings = mod.DecodeSettings(**common, prefill_blocks=int(p.max()) // b)
        knobs = mod.Knobs(threshold=jnp.float32(pre["threshold"]),
                          editing_threshold=jnp.float32(pre["editing_threshold"]), temperature=jnp.float32(0),
                          top_k=jnp.int32(vocab), top_p=jnp.float32(1), penalty_lambda=jnp.float32(0),
                          max_post_steps=jnp.int32(16), eos_early_stop=jnp.bool_(False), llada20=jnp.bool_(False))
    return (jnp.asarray(canvas), jnp.asarray(p), jnp.asarray(canvas_lens), knobs, jax.random.key(0)), settings


def part_modes(config, params, baseline):
    rng = np.random.default_rng(FLAGS.seed)
    prompts = rng.integers(0, config.vocab_size - 2, size=(FLAGS.batch, FLAGS.prompt_length)).tolist()
    out = []
    for mode in FLAGS.modes:
        row = {"mode": mode}
        for name, mod in (("after", decoding), ("before", baseline)):
            if mod is None:
                continue
            args, settings = _decode_args(mod, config, prompts, mode, new=mod is decoding)
            t0 = time.perf_counter()
            mod.decode.lower(params, *args, config=config, settings=settings).compile()
            compile_s = time.perf_counter() - t0

            def run(mod=mod):
                return mod.generate(params, config, prompts, gen_length=FLAGS.gen_length,
                                    block_length=FLAGS.block_length, preset=mode)
            res = run()  # warm (the jit cache, not the lowered object above)
            t0 = time.perf_counter()
            res = run()
            run_s = time.perf_counter() - t0
            gen = int(res.num_generated.sum())
            row[name] = {"tokens_per_s": round(gen / run_s, 1), "run_s": round(run_s, 3), "compile_s": round(compile_s, 2),
                         "forwards": res.forwards.tolist(), "tpf": [round(float(t), 3) for t in res.tpf]}
            row.setdefault("_tokens", []).append(res.tokens)
        if len(row["_tokens"]) == 2:
            row["same_tokens"] = row["_tokens"][0] == row["_tokens"][1]
            row["speedup"] = round(row["after"]["tokens_per_s"] / row["before"]["tokens_per_s"], 2)
        del row["_tokens"]
        out.append(row)
    return out


def part_engine(config, params):
    rng = np.random.default_rng(FLAGS.seed + 1)
    b = FLAGS.block_length
    reqs = []
    for _ in range(FLAGS.requests):
        prompt = rng.integers(0, config.vocab_size - 2, size=int(rng.integers(16, 129))).tolist()
        reqs.append((prompt, dict(gen_length=int(rng.integers(32, FLAGS.engine_max_gen + 1)), block_length=b,
                                  preset="S")))
    max_len = -(-(128 + FLAGS.engine_max_gen) // b) * b
    eng = engine.Engine(params, config, slots=FLAGS.slots, max_length=max_len, block_length=b)
    # Compile time of the engine's two programs, measured alone.
    t0 = time.perf_counter()
    eng._run_fn.lower(params, eng._slots, jnp.int32(8)).compile()
    run_compile = time.perf_counter() - t0

    def engine_pass():
        return eng.run(reqs)

    def static_pass():
        out = []
        for i in range(0, len(reqs), FLAGS.slots):
            batch = reqs[i:i + FLAGS.slots]
            gen = max(o["gen_length"] for _, o in batch)
            res = decoding.generate(params, config, [p for p, _ in batch], gen_length=gen, block_length=b, preset="S")
            out += [t[:o["gen_length"]] for t, (_, o) in zip(res.tokens, batch)]
        return out

    useful = sum(o["gen_length"] for _, o in reqs)
    engine_pass(), static_pass()  # compile
    t0 = time.perf_counter()
    forwards_before = eng.forwards
    eng_res = engine_pass()
    t_engine = time.perf_counter() - t0
    t0 = time.perf_counter()
    static_pass()
    t_static = time.perf_counter() - t0
    return {"requests": FLAGS.requests, "slots": FLAGS.slots, "prompt_lengths": "uniform [16, 128]",
            "gen_lengths": f"uniform [32, {FLAGS.engine_max_gen}]", "useful_tokens": useful,
            "engine_tokens_per_s": round(useful / t_engine, 1), "static_tokens_per_s": round(useful / t_static, 1),
            "engine_over_static": round(t_static / t_engine, 2), "engine_s": round(t_engine, 2),
            "static_s": round(t_static, 2), "engine_batched_forwards": eng.forwards - forwards_before,
            "engine_row_forwards": int(sum(r.forwards for r in eng_res)),
            "engine_run_compile_s": round(run_compile, 2)}


def main(_):
    config = _config()
    params = model.init_params(config, jax.random.key(FLAGS.seed))
    report = {"device": jax.devices()[0].device_kind, "platform": platform.platform(),
              "model": {"hidden_size": config.hidden_size, "num_layers": config.num_layers,
                        "num_experts": config.num_experts, "vocab": config.vocab_size, "moe_impl": config.moe_impl,
                        "params": config.param_counts()},
              "block_length": FLAGS.block_length, "prompt_length": FLAGS.prompt_length, "gen_length": FLAGS.gen_length}
    if "forward" in FLAGS.parts:
        report["forward"] = part_forward(config, params)
    if "modes" in FLAGS.parts:
        baseline = _baseline_module(FLAGS.baseline_rev) if FLAGS.baseline_rev else None
        report["baseline_rev"] = FLAGS.baseline_rev
        report["modes"] = part_modes(config, params, baseline)
    if "engine" in FLAGS.parts:
        report["engine"] = part_engine(config, params)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    app.run(main)
