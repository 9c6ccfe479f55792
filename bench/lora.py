r"""LoRA vs full fine-tuning: the SFT update step side by side, printed as one JSON object.

  python bench/lora.py                                   # the quickstart's tiny model, ranks 8 and 32
  python bench/lora.py --preset=small --ranks=8,32,64 --batch=4 --length=256

For each variant (full fine-tuning, then LoRA at each rank on every target) the trainer's own
update step (`train.make_train_step`, AdamW) is jitted on one device and run on the same random
batch: median step time over --repeats calls after a warm-up (compile) call, trainable
parameters, train-state bytes (what a checkpoint and the optimizer hold: params + Adam moments for
full fine-tuning, adapters + their moments for LoRA; LoRA's frozen base comes on top once) and
XLA's temporary bytes of the compiled step. On CPU only ratios measured side by side in one run
are meaningful; absolute times are for completeness.
"""

import json
import platform

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from llada_jax import model, train
from llada_jax.model import lora
from llada_jax.model.config import get_config
from llada_jax.timing import time_call

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "tiny", "Model preset.")
flags.DEFINE_list("ranks", ["8", "32"], "LoRA ranks to compare with full fine-tuning.")
flags.DEFINE_integer("batch", 8, "Sequences per batch.")
flags.DEFINE_integer("length", 40, "Sequence length (a multiple of --block).")
flags.DEFINE_integer("block", 5, "Block size.")
flags.DEFINE_integer("repeats", 10, "Timed calls per variant.")


def _run_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.total_steps = 1000
    c.optim = dict(lr=1e-3, warmup_frac=0.0, min_lr_ratio=0.0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
                   grad_clip=1.0, accum_steps=1)
    return ml_collections.ConfigDict(c)


def _bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


def main(argv):
    del argv
    config = get_config(FLAGS.preset, moe_impl="dense")
    cfg = _run_config()
    obj = train.objectives.ObjectiveConfig.for_model(config, block_size=FLAGS.block)
    tx = train.make_optimizer(cfg)
    schedule = train.learning_rate_schedule(cfg)
    base = jax.jit(model.init_params, static_argnums=0)(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(0, config.vocab_size - 4, (FLAGS.batch, FLAGS.length)), jnp.int32),
             "loss_mask": jnp.asarray(np.arange(FLAGS.length)[None, :] >= FLAGS.length // 2).repeat(FLAGS.batch, 0)}
    out = {"preset": FLAGS.preset, "batch": FLAGS.batch, "length": FLAGS.length, "block": FLAGS.block,
           "device": jax.devices()[0].device_kind, "machine": platform.machine(), "variants": {}}
    variants = [("full", None)] + [(f"lora_r{r}", lora.LoraConfig(rank=int(r), alpha=2.0 * int(r)))
                                   for r in FLAGS.ranks]
    for name, settings in variants:
        params = base if settings is None else lora.init_adapters(base, settings, jax.random.key(1))
        state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
        step = train.make_train_step(config, obj, tx, schedule, lora_config=settings)
        args = (state, batch, jax.random.key(2)) + (() if settings is None else (base,))
        fn = jax.jit(step)
        temp = fn.lower(*args).compile().memory_analysis()
        seconds, first, (_, metrics) = time_call(fn, *args, repeats=FLAGS.repeats)
        out["variants"][name] = {
            "step_ms": round(seconds * 1e3, 2), "first_call_s": round(first, 2),
            "trainable_params": lora.count(params), "train_state_bytes": _bytes(state),
            "temp_bytes": int(getattr(temp, "temp_size_in_bytes", 0) or 0) if temp is not None else None,
            "loss": round(float(metrics["loss"]), 5)}
    full = out["variants"]["full"]
    for name, row in out["variants"].items():
        row["step_time_vs_full"] = round(row["step_ms"] / full["step_ms"], 3)
        row["trainable_share"] = round(row["trainable_params"] / full["trainable_params"], 4)
    print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
