r"""Chat SFT with one conversation per padded row against packed rows, printed as one JSON object.

  python bench/pack.py                              # small preset, L = 4096, block 32, 3 steps each
  python bench/pack.py --preset=tiny --seq_len=1024 --steps=2   # a quick look

A synthetic chat JSONL (multi-turn conversations whose rendered lengths follow a lognormal,
median --median tokens, sigma --sigma, at most --seq_len tokens) is read with the user-data
reader (`data.read_jsonl`) and fed, in one process, through
1. "padded": `data.sft_dataset` (one conversation per row, EOS padding to --seq_len), what
   `configs/sft.py` did before, and
2. "packed": `data.packed_sft_dataset` (whole conversations packed into the rows, each on a block
   boundary), what `configs/sft.py` does now (`data.pack_conversations`).

For each: the real-token fraction over --rows rows (conversation tokens / positions computed;
the target is >= 0.95 packed), and the SFT step (`train.make_train_step`: the composite M2T + T2T
loss, AdamW) of the `small` preset timed on --steps batches of --batch rows, as real tokens per
second. Both modes run the same compiled step (same shapes), one after the other. The preset's
vocabulary is cut to the locally built task tokenizer's (512 ids, its mask / EOS ids), so the
benchmark needs no download. The attention kernel and the MoE back end are configs/sft.py's
"auto", resolved for the device the step runs on (`model.backends`; on CPU: blocked attention,
dense MoE), unless --attention_impl / --moe_impl name one.

On CPU only ratios measured side by side in one run are meaningful. Memory: at L = 4096 (a
composite input of 8192 positions, two rows with complementary masking) and --remat=full, XLA:CPU
asks for 8.0 GB of temporaries with the dense MoE and 6.5 GB with `tiled`, but 31.3 GB with the
preset's own `ragged` (XLA:CPU lowers `ragged_dot` to a masked dense dot over every expert: 64
here), the figure that once kept this step off a 23 GB host.
"""

import json
import os
import platform
import sys
import tempfile
import time

import grain
import jax
import numpy as np
from absl import app, flags, logging

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
from common import base_config  # noqa: E402

from llada_jax import data, train  # noqa: E402
from llada_jax.data.tokenizer import build_task_tokenizer  # noqa: E402
from llada_jax.model import backends  # noqa: E402
from llada_jax.model.config import get_config  # noqa: E402
from llada_jax.parallel import sharding  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "small", "Model preset of the timed SFT step.")
flags.DEFINE_integer("seq_len", 4096, "Row length L.")
flags.DEFINE_integer("block", 32, "Block size (packed conversations start on block boundaries).")
flags.DEFINE_integer("median", 500, "Median conversation length in tokens.")
flags.DEFINE_float("sigma", 0.8, "Lognormal sigma of the conversation lengths.")
flags.DEFINE_integer("conversations", 4000, "Conversations in the synthetic JSONL.")
flags.DEFINE_integer("rows", 64, "Rows over which each mode's real-token fraction is measured.")
flags.DEFINE_integer("packing_bins", 64, "Open rows of the packer (data.packing_bins).")
flags.DEFINE_integer("batch", 1, "Rows per timed step.")
flags.DEFINE_integer("steps", 3, "Timed steps per mode (after one compile / warm-up step).")
flags.DEFINE_integer("seed", 0, "Data seed.")
flags.DEFINE_string("remat", "full", "remat_policy of the timed step.")
flags.DEFINE_string("attention_impl", "auto", "Attention kernel of the timed step (`auto`: the device's choice).")
flags.DEFINE_string("moe_impl", "auto", "MoE back end of the timed step (`auto`: the device's choice; the "
                    "preset's `ragged` densifies on XLA:CPU, see the docstring).")

_WORDS = ("12+34", "=46", "7*8", "(3-1)", "sum", "of", "the", "and", "99", "0,", "1", "x=", "4/2")


def _text(rng, tokens: int, per_word: float) -> str:
    return " ".join(rng.choice(_WORDS, size=max(1, int(tokens / per_word))))


def synthetic_jsonl(path: str, tok, rng) -> np.ndarray:
    """Writes the conversations; returns their rendered token lengths (`encode_chat`)."""
    sample = " ".join(_WORDS * 20)
    per_word = len(tok.encode(sample)) / (len(_WORDS) * 20)  # tokens a word costs, with its space
    lengths = []
    with open(path, "w") as f:
        for _ in range(FLAGS.conversations):
            target = int(np.clip(rng.lognormal(np.log(FLAGS.median), FLAGS.sigma), 24, FLAGS.seq_len))
            turns = int(rng.integers(1, 4))
            overhead = 8 + 10 * turns  # the template's tags per turn and the system turn
            body = max(target - overhead, 2 * turns)
            messages = []
            for _ in range(turns):  # user 40% and assistant 60% of each turn's share
                share = body / turns
                messages += [{"role": "user", "content": _text(rng, 0.4 * share, per_word)},
                             {"role": "assistant", "content": _text(rng, 0.6 * share, per_word)}]
            n = len(tok.encode_chat(messages))
            if n > FLAGS.seq_len:  # at most seq_len tokens: drop the rare overshoot of the estimate
                continue
            lengths.append(n)
            f.write(json.dumps({"messages": messages, "id": len(lengths)}) + "\n")
    return np.asarray(lengths)


def main(argv):
    del argv
    tok = build_task_tokenizer()
    rng = np.random.default_rng(FLAGS.seed)
    path = os.path.join(tempfile.mkdtemp(prefix="bench_pack_"), "chat.jsonl")
    lengths = synthetic_jsonl(path, tok, rng)
    examples = grain.MapDataset.source([ex for _, ex in data.read_jsonl(path)])
    common = dict(batch_size=FLAGS.batch, seq_len=FLAGS.seq_len, block_size=FLAGS.block, seed=FLAGS.seed,
                  too_long="truncate", shard_index=0, shard_count=1)
    modes = {"padded": data.sft_dataset(examples, tok, **common),
             "packed": data.packed_sft_dataset(examples, tok, packing_bins=FLAGS.packing_bins, **common)}

    config = get_config(FLAGS.preset, vocab_size=tok.vocab_size, mask_token_id=tok.mask_id, eos_token_id=tok.eos_id,
                        pad_token_id=tok.pad_id, attention_impl=FLAGS.attention_impl, moe_impl=FLAGS.moe_impl,
                        remat_policy=FLAGS.remat)
    mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
    config = backends.resolve(config, mesh)  # what launcher.setup does for configs/sft.py
    cfg = base_config()
    cfg.total_steps = 1000
    obj = train.build_objective(cfg, config, extra_special_ids=tok.special_ids).replace(block_size=FLAGS.block)
    tx = train.make_optimizer(cfg)
    shardings = train.state_shardings(config, tx, mesh)
    state = train.init_state(config, tx, mesh, jax.random.key(0), shardings)
    step_fn = None

    out = {"device": jax.devices()[0].device_kind, "platform": platform.machine(), "preset": FLAGS.preset,
           "params": config.param_counts()["total"], "vocab_size": config.vocab_size, "seq_len": FLAGS.seq_len,
           "block": FLAGS.block, "batch": FLAGS.batch, "remat": FLAGS.remat,
           "attention_impl": config.attention_impl, "moe_impl": config.moe_impl, "packing_bins": FLAGS.packing_bins,
           "conversations": {"count": int(lengths.size), "median_tokens": int(np.median(lengths)),
                             "mean_tokens": round(float(lengths.mean()), 1),
                             "p90_tokens": int(np.percentile(lengths, 90)), "max_tokens": int(lengths.max())}}
    prepared = {}
    for name, ds in modes.items():  # the data side first: its figures stand even if a step fails
        it = iter(ds)
        rows = [next(it) for _ in range(max(1 + FLAGS.steps, FLAGS.rows // FLAGS.batch))]
        real = sum(train.real_tokens(b)[0] for b in rows)
        positions = sum(train.real_tokens(b)[1] for b in rows)
        per_row = [len(np.unique(d[d > 0])) if name == "packed" else 1 for b in rows for d in b["doc_ids"]]
        trained = sum(int(b["loss_mask"].sum()) for b in rows)
        logging.info("%s: real-token fraction %.4f over %d rows", name, real / positions, len(rows) * FLAGS.batch)
        out[name] = {"real_token_fraction": round(real / positions, 4),
                     "trained_token_fraction": round(trained / positions, 4),
                     "conversations_per_row": round(float(np.mean(per_row)), 2)}
        prepared[name] = [({k: v for k, v in b.items() if k in ("tokens", "loss_mask", "doc_ids")},
                           train.real_tokens(b)[0]) for b in rows]
    for name, batches in prepared.items():
        with jax.set_mesh(mesh):
            if step_fn is None:
                step_fn = train.jit_train_step(train.make_train_step(config, obj, tx, train.learning_rate_schedule(cfg)),
                                               shardings, mesh, batches[0][0])
                t0 = time.perf_counter()
                state, _ = jax.block_until_ready(step_fn(state, batches[0][0], jax.random.key(1)))
                out["compile_s"] = round(time.perf_counter() - t0, 1)
            times, real_timed = [], 0
            for b, n_real in batches[1:1 + FLAGS.steps]:
                real_timed += n_real
                t0 = time.perf_counter()
                state, metrics = jax.block_until_ready(step_fn(state, b, jax.random.key(1)))
                times.append(time.perf_counter() - t0)
        # Over the timed rows only (a few: their real counts vary more than the fraction's 64 rows),
        # and at the mode's real-token fraction (every step runs the same program on the same shapes,
        # so a row's time does not depend on what it holds).
        out[name].update({"step_s": [round(t, 2) for t in times],
                          "real_tokens_per_s": round(real_timed / sum(times), 1),
                          "real_tokens_per_s_at_fraction": round(
                              out[name]["real_token_fraction"] * FLAGS.batch * FLAGS.seq_len / np.mean(times), 1),
                          "loss_last_step": round(float(metrics["loss"]), 4)})
    out["packed_over_padded"] = {
        "real_token_fraction": round(out["packed"]["real_token_fraction"] / out["padded"]["real_token_fraction"], 2),
        "real_tokens_per_s": round(out["packed"]["real_tokens_per_s"] / out["padded"]["real_tokens_per_s"], 2),
        "real_tokens_per_s_at_fraction": round(out["packed"]["real_tokens_per_s_at_fraction"]
                                               / out["padded"]["real_tokens_per_s_at_fraction"], 2)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    app.run(main)
