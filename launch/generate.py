r"""Draft-and-Edit generation from the command line (REFERENCE §5), streamed block by block.

  python launch/generate.py --checkpoint=/tmp/llada_quickstart/checkpoints \
      --tokenizer=/tmp/llada_quickstart/tokenizer.json --prompt="12+34=" --mode=Q
  python launch/generate.py --checkpoint=/ckpt/LLaDA2.1-mini --prompts_file=questions.jsonl \
      --mode=S --gen_length=512 --output=answers.jsonl

--checkpoint is an Orbax directory (training or converted) or a Hugging Face directory (with
config.json; its tokenizer.json is used unless --tokenizer is given). Prompts are user turns,
rendered in the LLaDA2 chat format (--raw to feed them as they are). A JSONL file holds one
object per line: {"prompt": "..."} or {"messages": [...]} (a chat ending before the answer).

Decoding runs on a mesh (--mesh, default every device on `data`): prompts are split over the
batch axes (a last partial batch is padded with copies of its last prompt, whose answers are
dropped) and parameters are loaded straight into their shards by the rule table. On several
processes (--coordinator_address ... or a pod), each decodes its rows and process 0 prints and
writes the results.
"""

import json
import sys
import time

import jax
import numpy as np
from absl import app, flags

from llada_jax import decode, launcher
from llada_jax.evaluation import heldout
from llada_jax.parallel import hosts

FLAGS = flags.FLAGS
hosts.define_flags()  # --coordinator_address, --num_processes, --process_id
flags.DEFINE_string("checkpoint", None, "Orbax checkpoint directory or Hugging Face directory.", required=True)
flags.DEFINE_string("tokenizer", None, "tokenizer.json (file or directory); default: the HF checkpoint's.")
flags.DEFINE_multi_string("prompt", [], "A user prompt (repeatable).")
flags.DEFINE_string("prompts_file", None, "JSONL of {'prompt': ...} or {'messages': [...]} objects.")
flags.DEFINE_bool("raw", False, "Feed prompts as raw text, without the chat format.")
flags.DEFINE_string("mode", "Q", "Preset: S (speed), Q (quality), no_edit, llada20.")
flags.DEFINE_float("threshold", None, "Override the preset's unmasking threshold tau_mask.")
flags.DEFINE_float("editing_threshold", None, "Override the preset's editing threshold tau_edit.")
flags.DEFINE_integer("gen_length", 64, "Tokens to generate per prompt (at most).")
flags.DEFINE_integer("block_length", 32, "Block size B.")
flags.DEFINE_integer("max_post_steps", 16, "Editing steps allowed after a block has no masks.")
flags.DEFINE_bool("eos_early_stop", True, "Stop after a block once the answer has ended.")
flags.DEFINE_integer("mbe_window", 0, "Multi-Block Editing window in blocks (0 = off).")
flags.DEFINE_enum("mbe_select", "surprisal", ["surprisal", "last"],
                  "How an MBE window picks its history blocks: the most uncertain ones, or the last ones.")
flags.DEFINE_integer("mbe_max_steps", 5, "Edit forwards per MBE window at most.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_integer("top_k", None, "Top-k filter when sampling.")
flags.DEFINE_float("top_p", None, "Top-p filter when sampling.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("batch_size", 16, "Prompts decoded together.")
flags.DEFINE_string("moe_impl", None, "Override the MoE back end (dense is faster on CPU).")
flags.DEFINE_bool("stream", True, "Print each block as it is finished.")
flags.DEFINE_string("output", None, "Write one JSON object per prompt (text and statistics) here.")
flags.DEFINE_string("mesh", "-1,1,1,1", "Mesh as data,fsdp,tensor,expert sizes (-1: the remaining devices).")
launcher.define_model_flags()  # --dtype, --quantize, --quant_block


def read_prompts():
    items = [{"prompt": p} for p in FLAGS.prompt]
    if FLAGS.prompts_file:
        with open(FLAGS.prompts_file) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise app.UsageError(f"{FLAGS.prompts_file}:{n}: not JSON ({err.msg})")
                if not isinstance(obj, dict) or not ({"prompt", "messages"} & set(obj)):
                    raise app.UsageError(f"{FLAGS.prompts_file}:{n}: expected an object with 'prompt' or 'messages'")
                items.append(obj)
    if not items:
        raise app.UsageError("no prompts: pass --prompt and/or --prompts_file")
    return items


def make_mesh():
    try:
        return launcher.parse_mesh(FLAGS.mesh)
    except ValueError as err:
        raise app.UsageError(str(err))


def main(argv):
    del argv
    launcher.start_runtime()  # before anything touches a device
    items = read_prompts()
    mesh = make_mesh()
    config, params, tok, _ = launcher.load(FLAGS.checkpoint, FLAGS.tokenizer, FLAGS.moe_impl, mesh=mesh,
                                           **launcher.model_flag_values())
    ways = hosts.batch_ways(mesh)

    def encode(item):
        if FLAGS.raw:
            return tok.encode(item.get("prompt", ""))
        messages = item.get("messages") or [{"role": "user", "content": item["prompt"]}]
        return tok.encode_chat(messages, add_generation_prompt=True)

    prompts = [encode(it) for it in items]
    rows, batch_start, n_real = {}, [0], [0]

    def on_block(finished, blocks, canvas):  # host side, called from inside the jitted loop
        for r in np.flatnonzero(finished[:n_real[0]]):
            p = len(prompts[batch_start[0] + r])
            lo, hi = max(int(blocks[r]) * FLAGS.block_length, p), (int(blocks[r]) + 1) * FLAGS.block_length
            ids = [int(t) for t in canvas[r, lo:hi] if t not in (tok.mask_id,)]
            rows.setdefault(r, []).extend(ids)
            text = tok.decode([t for t in ids if t != tok.eos_id], skip_special_tokens=True)
            print(f"[{batch_start[0] + r}] {text}", flush=True)

    kw = dict(gen_length=FLAGS.gen_length, block_length=FLAGS.block_length, preset=FLAGS.mode,
              threshold=FLAGS.threshold, editing_threshold=FLAGS.editing_threshold,
              max_post_steps=FLAGS.max_post_steps, eos_early_stop=FLAGS.eos_early_stop,
              mbe_window=FLAGS.mbe_window, mbe_select=FLAGS.mbe_select, mbe_max_steps=FLAGS.mbe_max_steps,
              temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
              rng=jax.random.key(FLAGS.seed) if FLAGS.temperature > 0 else None)
    results, total_tokens, total_forwards, run_s = [], 0, 0, 0.0
    for start in range(0, len(prompts), FLAGS.batch_size):
        batch_start[0], rows = start, {}
        chunk = prompts[start:start + FLAGS.batch_size]
        n_real[0] = len(chunk)
        padded = chunk + [chunk[-1]] * (-len(chunk) % ways)  # rows must divide the mesh's batch axes
        index, count = hosts.batch_rows(mesh, len(padded), "prompts per batch (padded)")
        per = len(padded) // count
        t0 = time.perf_counter()
        out = decode.generate(params, config, padded[index * per:(index + 1) * per], mesh=mesh,
                                on_block=on_block if FLAGS.stream and jax.process_count() == 1 else None, **kw)
        run_s += time.perf_counter() - t0
        out = heldout.gather_rows(out, index, count, len(chunk), FLAGS.gen_length)
        if not hosts.is_primary():
            continue
        for i, tokens in enumerate(out.tokens):
            text = tok.decode([t for t in tokens if t != tok.eos_id], skip_special_tokens=True)
            total_tokens += int(out.num_generated[i])
            total_forwards += int(out.forwards[i])
            results.append({"index": start + i, "prompt": items[start + i], "text": text, "tokens": tokens,
                            "forwards": int(out.forwards[i]), "denoising_steps": int(out.steps[i]),
                            "tpf": float(out.tpf[i])})
            print(f"=== [{start + i}] {text}")
    if not hosts.is_primary():
        return
    print(f"{len(results)} prompts, mode {FLAGS.mode}: {total_tokens} tokens in {total_forwards} forwards "
          f"(TPF {total_tokens / max(total_forwards, 1):.2f}), {total_tokens / max(run_s, 1e-9):.1f} tokens/s "
          f"including compilation", file=sys.stderr)
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
        print(f"wrote {FLAGS.output}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
