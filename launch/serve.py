r"""OpenAI-compatible server for Draft-and-Edit decoding (`llada_jax.serve.server` over `llada_jax.decode.engine`).

  pip install -e '.[serve]'
  python launch/serve.py --checkpoint=/ckpt/LLaDA2.1-mini --port=8000 --max_length=2048
  python launch/serve.py --checkpoint=/tmp/llada_quickstart/rl_ebpo/checkpoints \
      --tokenizer=/tmp/llada_quickstart/tokenizer.json --block_length=5 --max_length=64

  curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}],
      "mode": "S", "max_tokens": 128}'
  # plain-text models (the quickstart's): {"messages": [...], "raw": true} or /v1/completions

--checkpoint is an Orbax directory (training or converted) or a Hugging Face directory, as in
launch/generate.py. The engine's shapes are flags (slots, canvas length, block length, MBE
window); requests choose everything else (mode, thresholds, max_post_steps, ...).

One process on one host: the engine decodes on one device, or with --mesh=data,fsdp,tensor,expert
on this host's devices (weights sharded by the training rule table, slots over the batch axes;
no distributed runtime: for batch decoding across hosts use launch/generate.py or
launch/eval.py). --dtype (default: the checkpoint's) and --quantize=int8|fp8 (weight-only,
per-block scales) choose how the model runs. --prefix_cache_mb (default 512, 0: off) keeps the
K/V of whole prompt blocks across requests in host memory, so prompts behind one system prompt
skip its prefill.
"""

import math
import os

from absl import app, flags

from llada_jax import launcher

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Orbax checkpoint directory or Hugging Face directory.", required=True)
flags.DEFINE_string("tokenizer", None, "tokenizer.json (file or directory); default: the HF checkpoint's.")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
flags.DEFINE_integer("port", 8000, "Port to listen on.")
flags.DEFINE_string("model_name", None, "Model id reported by /v1/models (default: the checkpoint's name).")
flags.DEFINE_integer("slots", 8, "Requests decoded at once (continuous batching).")
flags.DEFINE_integer("max_length", 1024, "Canvas tokens per slot: prompt + max_tokens, rounded up to blocks.")
flags.DEFINE_integer("block_length", 32, "Block size B (requests may only ask for this one).")
flags.DEFINE_integer("mbe_window", 0, "Multi-Block Editing window in blocks (requests may turn it off).")
flags.DEFINE_enum("mbe_attention", "bidirectional", ["bidirectional", "block_causal"], "MBE window attention.")
flags.DEFINE_enum("mbe_select", "surprisal", ["surprisal", "last"], "How an MBE window picks its history blocks.")
flags.DEFINE_bool("sampling", False, "Compile in sampling (temperature/top_k/top_p); greedy otherwise.")
flags.DEFINE_integer("steps_per_call", 8, "Loop iterations per engine call (streaming granularity).")
flags.DEFINE_integer("default_max_tokens", 256, "max_tokens when a request gives none.")
flags.DEFINE_string("moe_impl", None, "Override the MoE back end (dense is faster on CPU).")
flags.DEFINE_integer("prefix_cache_mb", 512, "Host memory (MiB) for the prefix cache: the K/V of whole prompt "
                     "blocks kept across requests, LRU-evicted; a prompt sharing whole blocks with a cached one "
                     "skips their prefill (usage.prompt_tokens_details.cached_tokens). 0: off.", lower_bound=0)
flags.DEFINE_float("prefix_growth", 1.25, "Prefix-read buckets of the cached step: each at most this many "
                   "times the one before (2.0 doubles; closer to 1 reads closer to the prefix, more compiled "
                   "branches: a server compiles once and decodes for long, so it reads tight by default).")
flags.DEFINE_integer("prefix_max_buckets", 64, "Most prefix-read buckets (compiled attention branches); the "
                     "spacing widens to fit.")
flags.DEFINE_string("mesh", None, "Mesh as data,fsdp,tensor,expert sizes over this host's devices (-1: the "
                    "remaining ones), e.g. 1,1,2,4: weights sharded by the rule table, slots over the batch "
                    "axes; default: one device.")
launcher.define_model_flags()  # --dtype, --quantize, --quant_block


def main(argv):
    del argv
    import uvicorn

    from llada_jax.decode import engine
    from llada_jax.serve import server

    launcher.start_runtime()  # before the mesh touches a device
    mesh = launcher.parse_mesh(FLAGS.mesh) if FLAGS.mesh else None
    config, params, tok, _ = launcher.load(FLAGS.checkpoint, FLAGS.tokenizer, FLAGS.moe_impl, mesh=mesh,
                                           **launcher.model_flag_values())
    # The flag is what a user can fit per slot; the engine's max_length is a compiled shape and
    # must be whole blocks, so the launcher (not the engine, whose callers choose shapes) rounds up.
    max_length = math.ceil(FLAGS.max_length / FLAGS.block_length) * FLAGS.block_length
    eng = engine.Engine(params, config, slots=FLAGS.slots, max_length=max_length,
                        block_length=FLAGS.block_length, mbe_window=FLAGS.mbe_window,
                        mbe_attention=FLAGS.mbe_attention, mbe_select=FLAGS.mbe_select, sampling=FLAGS.sampling,
                        steps_per_call=FLAGS.steps_per_call, mask_id=tok.mask_id, eos_id=tok.eos_id, mesh=mesh,
                        prefix_cache_bytes=FLAGS.prefix_cache_mb << 20, prefix_growth=FLAGS.prefix_growth,
                        prefix_max_buckets=FLAGS.prefix_max_buckets)
    name = FLAGS.model_name or os.path.basename(os.path.normpath(FLAGS.checkpoint))
    api = server.App(eng, tok, model_name=name, default_max_tokens=FLAGS.default_max_tokens)
    how = f"{config.dtype}" + (f", {FLAGS.quantize} weights" if FLAGS.quantize else "")
    where = f", mesh {dict(mesh.shape)}" if mesh is not None else ""
    where += f", prefix cache {FLAGS.prefix_cache_mb} MiB" if FLAGS.prefix_cache_mb else ", no prefix cache"
    print(f"serving {name} on http://{FLAGS.host}:{FLAGS.port}/v1 ({FLAGS.slots} slots of {max_length} tokens) "
          f"in {how}{where}", flush=True)
    uvicorn.run(api.app, host=FLAGS.host, port=FLAGS.port, log_level="warning")


if __name__ == "__main__":
    app.run(main)
