r"""Draft-and-Edit decoding benchmark, printed as one JSON object (not a test).

  python bench/decode.py                                  # hidden 256, 4 layers, 16 experts, block 32
  python bench/decode.py --baseline_rev=main~5            # 'before' = the package at that git revision
  python bench/decode.py --parts=forward,modes            # skip the engine comparison
  python bench/decode.py --parts=quant --gen_length=128   # bf16 vs int8 vs FP8 weights
  python bench/decode.py --parts=prefix,forward            # the prefix cache; the tighter prefix read
  # side by side with the official PyTorch generate(): torch + transformers 4.57 in a venv made with
  # --system-site-packages (not a dependency of llada_jax), the official code from ZHZisZZ/dllm @ ca176752
  XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
      /tmp/torchenv/bin/python bench/decode.py --parts=official --torch_threads=1 \
      --torch_reference=/path/to/dllm/dllm/pipelines/llada21/models --official_prompts=2

One process on this machine's devices (a single-host benchmark: no distributed runtime).

Parts, all on one random-weight model in one process (ratios are side by side):

  forward  per-forward time of one cached decoding step (32 tokens against the cache at block
           `--step_block`, cache donated as in the loop) vs a plain forward of the same 32 tokens,
           a plain forward of the whole window up to that block (what the official code runs per
           step), and the baseline's step (`model.forward_cached`, the cache through nn.scan and
           keys over the whole canvas); plus the same cached step reading no prefix and exactly
           the prefix it needs, which split its cost into overhead, attention and bucket waste,
           and reading the bucket of `--prefix_growth` (the tighter read), with each one's compile;
  modes    tokens/s of `generate` (prompt 64, gen 512) per mode, now and with the whole package
           as of `--baseline_rev` (extracted with `git archive` into a temporary directory and run
           in a subprocess of this run on the same weights, passed as an HF checkpoint; same
           tokens checked), plus compile time of both decoding loops measured with
           `lower(...).compile()`;
  engine   64 requests of ragged prompt and generation lengths: the continuous-batching engine
           (`--slots` slots) vs static batches of the same size in arrival order (each batch
           decoded to its longest request), useful tokens/s of both; engine compile time.
  prefix   the prefix cache on a shared-prefix workload: `--requests` requests behind one
           `--system_length`-token system prompt, each with its own question of
           [8, `--question_max`] tokens, `--prefix_gen` tokens each, decoded with threshold
           `--prefix_threshold` and no edits (a block in ~2 forwards, as a confident model decodes;
           random weights under S would fall back to one token per forward and time the decode,
           not the prefill); the engine (`--slots`) with and without a prefix cache, all requests
           submitted at once: time to first block (from submit to the request's first streamed
           block; mean and median) and useful tokens/s, plus a one-block request alone on the
           idle engine (its time to first block, wall and process CPU; best of 5; the system
           prompt cached by then on the cached side), same tokens checked;
  quant    tokens/s of `generate` (mode S) with bf16 weights vs int8 / FP8 weights (per-block
           scales, `model.quant`), all in bf16 compute, and each one's stored parameter bytes. On
           CPU the weights are widened before each matmul and the run is not memory-bound: a real
           gain needs an accelerator;
  official (only with `--torch_reference`) the official PyTorch LLaDA2.1 `generate()` on the same
           weights (written with `save_hf_checkpoint`, loaded by the official code) and the same
           `--official_prompts` prompts, one at a time, against ours one at a time: time of each,
           the ratio, forwards and whether the tokens agree. `--torch_reference` is the directory
           of `modeling_llada21_moe.py` + `configuration_llada21_moe.py` (in ZHZisZZ/dllm @
           ca176752: dllm/pipelines/llada21/models, the code the parity fixtures come from);
           torch and transformers are imported only then (they are no dependency of llada_jax).

Random weights make predictions near uniform, so decoding mostly fills one token per step
through the at-least-one fallback: TPF measures overheads, not the S/Q trade-off of a trained
model (see the README for that); speed ratios are meaningful because both sides make the same
decisions.
"""

import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from llada_jax import decode, model
from llada_jax.decode import engine, kvcache
from llada_jax.model.config import get_config

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
flags.DEFINE_list("parts", ["forward", "modes", "engine", "quant"], "What to measure.")
flags.DEFINE_list("quant_kinds", ["bf16", "int8", "fp8"], "Quant part: weights to time (the first is the reference).")
flags.DEFINE_string("baseline_rev", "f9611db", "Git revision whose package is 'before' (the commit before the "
                    "cache-in-carry decoder, 64c2e22, landed; empty: skip).")
flags.DEFINE_integer("step_block", 10, "Block index of the timed cached step.")
flags.DEFINE_integer("requests", 64, "Engine part: number of requests.")
flags.DEFINE_integer("slots", 8, "Engine part: slots, and the static batch size.")
flags.DEFINE_integer("engine_max_gen", 384, "Engine part: generation lengths are uniform in [32, this].")
flags.DEFINE_float("prefix_growth", 1.25, "Forward part: growth of the tighter prefix-read buckets; prefix "
                   "part: the engines' buckets.")
flags.DEFINE_integer("prefix_max_buckets", 64, "Bound on the number of prefix-read buckets.")
flags.DEFINE_integer("system_length", 512, "Prefix part: tokens of the shared system prompt.")
flags.DEFINE_integer("question_max", 24, "Prefix part: each request's own question is [8, this] tokens.")
flags.DEFINE_integer("prefix_gen", 64, "Prefix part: tokens generated per request.")
flags.DEFINE_float("prefix_threshold", 0.0, "Prefix part: the decoding threshold (editing off).")
flags.DEFINE_integer("seed", 0, "Seed of the weights and prompts.")
flags.DEFINE_string("moe_impl", "dense", "MoE back end; dense is the faster one on CPU (bench/forward.py).")
flags.DEFINE_string("torch_reference", "", "Directory of the official modeling_llada21_moe.py (enables 'official').")
flags.DEFINE_integer("official_prompts", 4, "Official part: prompts decoded one at a time on each side.")
flags.DEFINE_integer("torch_threads", 0, "Official part: torch.set_num_threads (0: torch's default).")


def _config():
    return get_config(FLAGS.preset, moe_impl=FLAGS.moe_impl, hidden_size=FLAGS.hidden_size,
                      num_layers=FLAGS.num_layers, num_experts=FLAGS.num_experts, num_heads=FLAGS.num_heads,
                      head_dim=FLAGS.head_dim)


# Runs inside the baseline revision's tree, so it uses that revision's module layout
# (llada_jax.decoding, llada_jax.hf: the flat package before the subpackages).
_BEFORE = r"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from llada_jax import decoding, hf
a = json.load(open(sys.argv[1]))
config, params = hf.load_hf_checkpoint(a["checkpoint"])
config = config.replace(moe_impl=a["moe_impl"])
prompts, b, gen, vocab = a["prompts"], a["block_length"], a["gen_length"], config.vocab_size
out = {}
for mode in a["modes"]:
    pre = decoding.PRESETS[mode]
    p = np.array([len(r) for r in prompts], np.int32)
    canvas_lens = (-(-(p + gen) // b) * b).astype(np.int32)
    canvas = np.full((len(prompts), int(canvas_lens.max())), config.mask_token_id, np.int32)
    for i, r in enumerate(prompts):
        canvas[i, :len(r)] = r
    settings = decoding.DecodeSettings(block_length=b, mask_id=config.mask_token_id, eos_id=config.eos_token_id,
                                       pad_id=config.pad_token_id, greedy=True, filter_top=False, use_cache=True,
                                       mbe_window=0, prefill_blocks=int(p.max()) // b)
    knobs = decoding.Knobs(threshold=jnp.float32(pre["threshold"]),
                           editing_threshold=jnp.float32(pre["editing_threshold"]), temperature=jnp.float32(0),
                           top_k=jnp.int32(vocab), top_p=jnp.float32(1), penalty_lambda=jnp.float32(0),
                           max_post_steps=jnp.int32(16), eos_early_stop=jnp.bool_(False), llada20=jnp.bool_(False))
    t0 = time.perf_counter()
    decoding.decode.lower(params, jnp.asarray(canvas), jnp.asarray(p), jnp.asarray(canvas_lens), knobs,
                          jax.random.key(0), config=config, settings=settings).compile()
    compile_s = time.perf_counter() - t0
    run = lambda: decoding.generate(params, config, prompts, gen_length=gen, block_length=b, preset=mode)
    run()
    t0, c0 = time.perf_counter(), time.process_time()
    res = run()
    out[mode] = {"run_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "compile_s": compile_s,
                 "generated": int(res.num_generated.sum()), "forwards": res.forwards.tolist(),
                 "tokens": res.tokens}
print("BEFORE_JSON " + json.dumps(out))
"""


def _run_before(rev, params, config, prompts):
    """Decodes `prompts` with the whole package as of git revision `rev`, in a subprocess."""
    from llada_jax.model import hf
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tree = tempfile.mkdtemp()
    archive = subprocess.run(["git", "archive", rev, "llada_jax"], cwd=root, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
    ckpt = os.path.join(tree, "checkpoint")
    hf.save_hf_checkpoint(ckpt, config, params)
    args = os.path.join(tree, "args.json")
    with open(args, "w") as f:
        json.dump({"checkpoint": ckpt, "moe_impl": config.moe_impl, "prompts": prompts, "modes": FLAGS.modes,
                   "block_length": FLAGS.block_length, "gen_length": FLAGS.gen_length}, f)
    env = dict(os.environ, PYTHONPATH=tree)
    proc = subprocess.run([sys.executable, "-c", _BEFORE, args], cwd=tree, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BEFORE_JSON ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"baseline at {rev} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("BEFORE_JSON "):])


def _time(fn, repeats, rounds=5):
    """(wall, process CPU) seconds per call, each the best of `rounds` rounds of `repeats` calls.

    The CPU time counts every thread of this process and barely moves when other processes share
    the cores, so it is the figure to compare on a loaded machine."""
    jax.block_until_ready(fn())
    wall = cpu = float("inf")
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            out = fn()
        jax.block_until_ready(out)
        wall = min(wall, (time.perf_counter() - t0) / repeats)
        cpu = min(cpu, (time.process_time() - c0) / repeats)
    return wall, cpu


def part_forward(config, params):
    """One cached step (donated cache, as in the decoding loop) vs plain forwards, with the parts
    that explain the difference: the same step reading no prefix (the step's own overhead) and
    reading exactly the prefix it needs (what the length bucket costs)."""
    b, n = FLAGS.block_length, FLAGS.batch
    length = decode.canvas_bucket(-(-(FLAGS.prompt_length + FLAGS.gen_length) // b), 1 << 20) * b
    start = jnp.full((n,), FLAGS.step_block * b, jnp.int32)
    tokens = jax.random.randint(jax.random.key(1), (n, b), 0, config.vocab_size - 2)
    positions = start[:, None] + jnp.arange(b)
    window = jax.random.randint(jax.random.key(2), (n, (FLAGS.step_block + 1) * b), 0, config.vocab_size - 2)
    window = window.at[:, -b:].set(tokens)
    all_buckets = kvcache.buckets(length // b)

    def stepper(prefix_buckets):
        @functools.partial(jax.jit, donate_argnums=0)
        def step(cache):
            logits, kv = kvcache.forward_chunk(params, config, tokens, positions, start, jnp.ones((1, b, b), bool),
                                               cache, kvcache.bucket_index(prefix_buckets, start.max() // b),
                                               prefix_buckets=prefix_buckets, block_length=b)
            return logits, kvcache.write(cache, kv, start, jnp.ones((n,), bool))
        state = {"cache": kvcache.init_cache(config, n, length)}

        def call():
            logits, state["cache"] = step(state["cache"])
            return logits
        return call

    blk = jnp.arange(window.shape[1]) // b
    window_mask = (blk[None, :] <= blk[:, None])[None]
    plain = jax.jit(lambda: model.forward(params, config, tokens))
    plain_window = jax.jit(lambda: model.forward(params, config, window, mask=window_mask))
    canvas_len = -(-(FLAGS.prompt_length + FLAGS.gen_length) // b) * b
    key_block = jnp.arange(canvas_len) // b
    old_mask = key_block[None, None, :] <= (positions // b)[:, :, None]
    old_step = jax.jit(lambda cache: model.forward_cached(params, config, tokens, positions, old_mask, cache, start))
    old_cache = model.init_cache(config, n, canvas_len)
    tight = kvcache.buckets(length // b, growth=FLAGS.prefix_growth, max_buckets=FLAGS.prefix_max_buckets)
    compile_s = {}
    for name, bk in (("doubling", all_buckets), ("tight", tight)):
        fn = stepper(bk)
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        compile_s[name] = round(time.perf_counter() - t0, 2)  # first call: trace + compile + one run
    reps = 20
    rows = {"cached_step": _time(stepper(all_buckets), reps),
            "cached_step_tight": _time(stepper(tight), reps),
            "cached_step_exact_prefix": _time(stepper((FLAGS.step_block,)), reps),
            "cached_step_no_prefix": _time(stepper((0,)), reps),
            "plain_forward": _time(plain, reps),
            "plain_forward_window": _time(plain_window, reps),
            "baseline_cached_step": _time(lambda: old_step(old_cache), reps)}
    bucket = all_buckets[int(kvcache.bucket_index(all_buckets, start.max() // b))]
    tight_bucket = tight[int(kvcache.bucket_index(tight, start.max() // b))]
    out = {"tokens": b, "batch": n, "at_block": FLAGS.step_block, "canvas": length,
           "prefix_keys_needed": FLAGS.step_block * b, "prefix_keys_read": bucket * b,
           "prefix_growth_tight": FLAGS.prefix_growth, "prefix_keys_read_tight": tight_bucket * b,
           "buckets_doubling": len(all_buckets), "buckets_tight": len(tight),
           "first_call_s_doubling": compile_s["doubling"], "first_call_s_tight": compile_s["tight"],
           "window_tokens": int(window.shape[1])}
    for name, (wall, cpu) in rows.items():
        out[f"{name}_ms"] = round(wall * 1e3, 3)
        out[f"{name}_cpu_ms"] = round(cpu * 1e3, 3)
    for key in ("", "_cpu"):
        c = rows["cached_step"][1 if key else 0]
        out[f"cached_over_plain{key}"] = round(c / rows["plain_forward"][1 if key else 0], 3)
        out[f"cached_tight_over_plain{key}"] = round(rows["cached_step_tight"][1 if key else 0]
                                                     / rows["plain_forward"][1 if key else 0], 3)
        out[f"window_over_cached{key}"] = round(rows["plain_forward_window"][1 if key else 0] / c, 3)
        out[f"baseline_over_cached{key}"] = round(rows["baseline_cached_step"][1 if key else 0] / c, 2)
    return out


def _decode_args(config, prompts, mode):
    """The arguments `generate` would pass to `decode` (to lower and compile it alone)."""
    b, vocab = FLAGS.block_length, config.vocab_size
    p = np.array([len(r) for r in prompts], np.int32)
    canvas_lens = (-(-(p + FLAGS.gen_length) // b) * b).astype(np.int32)
    length = decode.canvas_bucket(int(canvas_lens.max()) // b, config.max_position_embeddings // b) * b
    canvas = np.full((len(prompts), length), config.mask_token_id, np.int32)
    for i, r in enumerate(prompts):
        canvas[i, :len(r)] = r
    pre = decode.PRESETS[mode]
    settings = decode.DecodeSettings(block_length=b, mask_id=config.mask_token_id, eos_id=config.eos_token_id,
                                       pad_id=config.pad_token_id, greedy=True, filter_top=False, use_cache=True,
                                       mbe_window=0)
    knobs = decode.make_knobs(vocab, threshold=pre["threshold"], editing_threshold=pre["editing_threshold"])
    return (jnp.asarray(canvas), jnp.asarray(p), jnp.asarray(canvas_lens), knobs, jax.random.key(0)), settings


def part_modes(config, params):
    rng = np.random.default_rng(FLAGS.seed)
    prompts = rng.integers(0, config.vocab_size - 2, size=(FLAGS.batch, FLAGS.prompt_length)).tolist()
    before = _run_before(FLAGS.baseline_rev, params, config, prompts) if FLAGS.baseline_rev else {}
    out = []
    for mode in FLAGS.modes:
        args, settings = _decode_args(config, prompts, mode)
        t0 = time.perf_counter()
        decode.decode.lower(params, *args, config=config, settings=settings).compile()
        compile_s = time.perf_counter() - t0

        def run(mode=mode):
            return decode.generate(params, config, prompts, gen_length=FLAGS.gen_length,
                                     block_length=FLAGS.block_length, preset=mode)
        run()  # warm (the jit cache, not the lowered object above)
        t0, c0 = time.perf_counter(), time.process_time()
        res = run()
        run_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        gen = int(res.num_generated.sum())
        row = {"mode": mode, "after": {"tokens_per_s": round(gen / run_s, 1), "run_s": round(run_s, 3),
                                       "cpu_s": round(cpu_s, 3), "compile_s": round(compile_s, 2),
                                       "forwards": res.forwards.tolist(),
                                       "tpf": [round(float(t), 3) for t in res.tpf]}}
        if mode in before:
            old = before[mode]
            row["before"] = {"tokens_per_s": round(old["generated"] / old["run_s"], 1), "run_s": round(old["run_s"], 3),
                             "cpu_s": round(old["cpu_s"], 3), "compile_s": round(old["compile_s"], 2),
                             "forwards": old["forwards"]}
            row["same_tokens"] = old["tokens"] == res.tokens
            row["speedup"] = round(old["run_s"] / run_s, 2)
            row["speedup_cpu"] = round(old["cpu_s"] / cpu_s, 2)
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def part_quant(config, params):
    """tokens/s of `generate` (mode S, the modes part's prompts) with bf16 weights and compute
    against int8 / FP8 weights (model.quant, block 128) in bf16 compute, side by side; stored
    parameter bytes and whether the tokens agree with bf16's. Weight-only quantization saves
    memory and HBM bandwidth; XLA:CPU is not bandwidth-bound at this size and widens the weights
    before each matmul, so a speed gain needs an accelerator (read the bytes, not the speed)."""
    from llada_jax.model import quant

    rng = np.random.default_rng(FLAGS.seed)
    prompts = rng.integers(0, config.vocab_size - 2, size=(FLAGS.batch, FLAGS.prompt_length)).tolist()
    bf16 = config.replace(dtype="bfloat16", param_dtype="bfloat16")
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 and x.ndim > 1 else x, params)
    base["moe_layers"]["moe"]["router"] = params["moe_layers"]["moe"]["router"]  # fp32, as loaded
    rows, ref = [], None
    for kind in FLAGS.quant_kinds:
        p = base if kind == "bf16" else quant.quantize_params(base, kind)

        def run(p=p):
            return decode.generate(p, bf16, prompts, gen_length=FLAGS.gen_length, block_length=FLAGS.block_length,
                                   preset="S")
        t0 = time.perf_counter()
        run()
        compile_s = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        res = run()
        run_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        ref = res.tokens if ref is None else ref
        row = {"weights": kind, "compute": "bfloat16", "tokens_per_s": round(int(res.num_generated.sum()) / run_s, 1),
               "run_s": round(run_s, 3), "cpu_s": round(cpu_s, 3), "first_call_s": round(compile_s, 2),
               "param_bytes": quant.stored_bytes(p), "same_tokens_as_first": res.tokens == ref}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


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
    knobs = decode.make_knobs(config.vocab_size, **{k: v for k, v in decode.PRESETS["S"].items()})
    t0 = time.perf_counter()
    eng._admit_fn.lower(params, eng._slots, jnp.int32(0), jnp.zeros((max_len,), jnp.int32), jnp.int32(1),
                        jnp.int32(1), knobs, jax.random.key(0)).compile()
    admit_compile = time.perf_counter() - t0

    def engine_pass():
        return eng.run(reqs)

    def static_pass():
        out = []
        for i in range(0, len(reqs), FLAGS.slots):
            batch = reqs[i:i + FLAGS.slots]
            gen = max(o["gen_length"] for _, o in batch)
            res = decode.generate(params, config, [p for p, _ in batch], gen_length=gen, block_length=b, preset="S")
            out += [t[:o["gen_length"]] for t, (_, o) in zip(res.tokens, batch)]
        return out

    useful = sum(o["gen_length"] for _, o in reqs)
    engine_pass(), static_pass()  # compile
    t0, c0 = time.perf_counter(), time.process_time()
    forwards_before = eng.forwards
    eng_res = engine_pass()
    t_engine, c_engine = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    static_res = static_pass()
    t_static, c_static = time.perf_counter() - t0, time.process_time() - c0
    return {"requests": FLAGS.requests, "slots": FLAGS.slots, "prompt_lengths": "uniform [16, 128]",
            "gen_lengths": f"uniform [32, {FLAGS.engine_max_gen}]", "useful_tokens": useful,
            "engine_tokens_per_s": round(useful / t_engine, 1), "static_tokens_per_s": round(useful / t_static, 1),
            "engine_over_static": round(t_static / t_engine, 2), "engine_s": round(t_engine, 2),
            "static_s": round(t_static, 2), "engine_over_static_cpu": round(c_static / c_engine, 2),
            "engine_cpu_s": round(c_engine, 2), "static_cpu_s": round(c_static, 2), "engine_batched_forwards": eng.forwards - forwards_before,
            "engine_row_forwards": int(sum(r.forwards for r in eng_res)),
            "engine_run_compile_s": round(run_compile, 2), "engine_admit_compile_s": round(admit_compile, 2),
            "same_tokens": [r.tokens for r in eng_res] == static_res}


def part_prefix(config, params):
    """The prefix cache on requests behind one system prompt: engine with vs without it."""
    rng = np.random.default_rng(FLAGS.seed + 3)
    b = FLAGS.block_length
    system = rng.integers(0, config.vocab_size - 2, size=FLAGS.system_length).tolist()
    opts = dict(gen_length=FLAGS.prefix_gen, block_length=b, threshold=FLAGS.prefix_threshold,
                editing_threshold=1.0, max_post_steps=4)
    reqs = [(system + rng.integers(0, config.vocab_size - 2, size=int(rng.integers(8, FLAGS.question_max + 1))).tolist(),
             opts) for _ in range(FLAGS.requests)]
    max_len = -(-(FLAGS.system_length + FLAGS.question_max + FLAGS.prefix_gen) // b) * b
    budget = {"without": 0, "with": 1 << 30}

    def make(kind):
        return engine.Engine(params, config, slots=FLAGS.slots, max_length=max_len, block_length=b,
                             prefix_cache_bytes=budget[kind], prefix_growth=FLAGS.prefix_growth,
                             prefix_max_buckets=FLAGS.prefix_max_buckets)

    def workload(eng):
        first, ids = {}, []
        t0, c0 = time.perf_counter(), time.process_time()
        for k, (prompt, o) in enumerate(reqs):
            ids.append(eng.submit(prompt, o, on_block=lambda toks, k=k: first.setdefault(k, time.perf_counter())))
        out = {}
        while not eng.idle:
            for r in eng.poll():
                out[r.id] = r
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        ttfb = np.array([first[k] - t0 for k in range(len(reqs))])
        res = [out[i] for i in ids]
        return {"wall_s": wall, "cpu_s": cpu, "ttfb": ttfb, "res": res,
                "tokens": sum(len(r.tokens) for r in res), "cached": sum(r.cached_tokens for r in res)}

    def alone(eng, prompt):
        """(wall, process CPU) seconds of one request of one block on the idle engine: its time to
        first block, the run stopping as soon as the row is done."""
        t0, c0 = time.perf_counter(), time.process_time()
        eng.submit(prompt, dict(opts, gen_length=b))
        while not eng.idle:
            eng.poll()
        return time.perf_counter() - t0, time.process_time() - c0

    rows, tokens = {}, {}
    for kind in ("without", "with"):
        eng = make(kind)
        t0 = time.perf_counter()
        eng.run(reqs[:2])  # compile (a miss and, with the cache, a hit)
        compile_s = time.perf_counter() - t0
        eng.clear_prefix_cache()
        run = workload(eng)
        # One request alone on the idle engine: with the cache, its system prompt is cached by now.
        fresh = system[:] + [int(t) for t in rng.integers(0, config.vocab_size - 2, size=16)]
        lone = [alone(eng, fresh + [i]) for i in range(5)]
        lone_wall, lone_cpu = min(w for w, _ in lone), min(c for _, c in lone)
        tokens[kind] = [r.tokens for r in run["res"]]
        rows[kind] = {"ttfb_mean_s": round(float(run["ttfb"].mean()), 3),
                      "ttfb_median_s": round(float(np.median(run["ttfb"])), 3),
                      "ttfb_min_s": round(float(run["ttfb"].min()), 3),
                      "tokens_per_s": round(run["tokens"] / run["wall_s"], 1),
                      "tokens_per_cpu_s": round(run["tokens"] / run["cpu_s"], 1),
                      "wall_s": round(run["wall_s"], 2), "cpu_s": round(run["cpu_s"], 2),
                      "cached_prompt_tokens": run["cached"], "alone_ttfb_s": round(lone_wall, 3),
                      "alone_ttfb_cpu_s": round(lone_cpu, 3),
                      "first_calls_s": round(compile_s, 2)}
        if eng.prefix_cache is not None:
            rows[kind]["cache_entries"] = len(eng.prefix_cache)
            rows[kind]["cache_mib"] = round(eng.prefix_cache.nbytes / 2**20, 2)
        print(json.dumps({kind: rows[kind]}), flush=True)
    w, wo = rows["with"], rows["without"]
    return {"requests": FLAGS.requests, "slots": FLAGS.slots, "system_tokens": FLAGS.system_length,
            "question_tokens": f"uniform [8, {FLAGS.question_max}]", "gen_length": FLAGS.prefix_gen,
            "threshold": FLAGS.prefix_threshold, "prefix_growth": FLAGS.prefix_growth, **rows,
            "ttfb_mean_speedup": round(wo["ttfb_mean_s"] / w["ttfb_mean_s"], 2),
            "ttfb_median_speedup": round(wo["ttfb_median_s"] / w["ttfb_median_s"], 2),
            "alone_ttfb_speedup": round(wo["alone_ttfb_s"] / w["alone_ttfb_s"], 2),
            "alone_ttfb_cpu_speedup": round(wo["alone_ttfb_cpu_s"] / w["alone_ttfb_cpu_s"], 2),
            "tokens_per_s_speedup": round(w["tokens_per_s"] / wo["tokens_per_s"], 2),
            "tokens_per_cpu_s_speedup": round(w["tokens_per_cpu_s"] / wo["tokens_per_cpu_s"], 2),
            "same_tokens": tokens["with"] == tokens["without"]}


def _official_module(directory):
    """The official modeling code as a package of its own (its relative import needs one)."""
    import importlib.util
    init = os.path.join(directory, "__init__.py")
    if not os.path.exists(os.path.join(directory, "modeling_llada21_moe.py")):
        raise ValueError(f"--torch_reference: expected a directory holding modeling_llada21_moe.py, found {directory!r}")
    name = "llada21_official"
    if not os.path.exists(init):  # a bare copy of the two files
        init = os.path.join(tempfile.mkdtemp(), "__init__.py")
        with open(init, "w") as f:
            f.write("from .modeling_llada21_moe import LLaDA2MoeModelLM\n")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[directory])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return sys.modules[f"{name}.modeling_llada21_moe"]


def part_official(config, params):
    import torch  # only here: torch is no dependency of llada_jax

    from llada_jax.model import hf
    if FLAGS.torch_threads:
        torch.set_num_threads(FLAGS.torch_threads)
    modeling = _official_module(FLAGS.torch_reference)
    # The official loop never ends if a masked position keeps predicting the mask id: its logit is
    # pinned at 0 (as in the parity fixture), on both sides.
    params = dict(params, lm_head=params["lm_head"].at[:, config.mask_token_id].set(0.0))
    path = tempfile.mkdtemp()
    hf.save_hf_checkpoint(path, config, params)
    ref = modeling.LLaDA2MoeModelLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="sdpa").eval()
    inner_forward = ref.forward
    calls = [0]

    def forward(*args, attention_mask=None, **kwargs):
        # generate() builds its additive 0/-inf block mask in bfloat16, which SDPA rejects for fp32
        # queries; 0 and -inf are exact in fp32 (the same wrapper produced the fixtures).
        calls[0] += 1
        if attention_mask is not None and attention_mask.dtype != torch.float32:
            attention_mask = attention_mask.to(torch.float32)
        return inner_forward(*args, attention_mask=attention_mask, **kwargs)

    ref.forward = forward
    rng = np.random.default_rng(FLAGS.seed + 2)
    prompts = rng.integers(0, config.vocab_size - 2, size=(FLAGS.official_prompts, FLAGS.prompt_length)).tolist()
    out = []
    for mode in FLAGS.modes:
        pre = decode.PRESETS[mode]

        def ours(prompt, mode=mode):
            return decode.generate(params, config, [prompt], gen_length=FLAGS.gen_length,
                                     block_length=FLAGS.block_length, preset=mode)
        t0 = time.perf_counter()
        ours(prompts[0])  # compile: every prompt of this length shares the program
        warm_s = time.perf_counter() - t0
        row = {"mode": mode, "prompts": len(prompts), "ours_first_call_s": round(warm_s, 2),
               "ours_s": 0.0, "official_s": 0.0, "ours_cpu_s": 0.0, "official_cpu_s": 0.0, "ours_forwards": [], "official_forwards": [], "same_tokens": []}
        for prompt in prompts:
            t0, c0 = time.perf_counter(), time.process_time()
            res = ours(prompt)
            row["ours_s"] += time.perf_counter() - t0
            row["ours_cpu_s"] += time.process_time() - c0
            calls[0] = 0
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.no_grad():
                got = ref.generate(torch.tensor([prompt]), temperature=0.0, block_length=FLAGS.block_length,
                                   gen_length=FLAGS.gen_length, threshold=pre["threshold"],
                                   editing_threshold=pre["editing_threshold"], max_post_steps=16,
                                   eos_id=config.eos_token_id, mask_id=config.mask_token_id)
            row["official_s"] += time.perf_counter() - t0
            row["official_cpu_s"] += time.process_time() - c0
            row["ours_forwards"].append(int(res.steps[0]))
            row["official_forwards"].append(calls[0])
            row["same_tokens"].append(got[0].tolist() == res.tokens[0])
        row["ours_over_official_speed"] = round(row["official_s"] / row["ours_s"], 2)
        row["ours_over_official_cpu"] = round(row["official_cpu_s"] / row["ours_cpu_s"], 2)
        for k in ("ours_s", "official_s", "ours_cpu_s", "official_cpu_s"):
            row[k] = round(row[k], 2)
        print(json.dumps(row), flush=True)
        out.append(row)
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "runs": out}


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
        print(json.dumps({"forward": report["forward"]}), flush=True)  # kept if a later part fails
    if "modes" in FLAGS.parts:
        report["baseline_rev"] = FLAGS.baseline_rev
        report["modes"] = part_modes(config, params)
    if "engine" in FLAGS.parts:
        report["engine"] = part_engine(config, params)
    if "prefix" in FLAGS.parts:
        report["prefix"] = part_prefix(config, params)
    if "quant" in FLAGS.parts:
        report["quant"] = part_quant(config, params)
    if "official" in FLAGS.parts or FLAGS.torch_reference:
        if not FLAGS.torch_reference:
            raise ValueError("--parts=official: needs --torch_reference=<dir of modeling_llada21_moe.py>")
        report["official"] = part_official(config, params)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    app.run(main)
