r"""Training-objective benchmarks, printed as one JSON object (REFERENCE §3–4).

  python bench/loss.py                          # tiny, L=512, block 32
  python bench/loss.py --preset=small --batch=1
  python bench/loss.py --length=2048 --variants=m2t_only --attention=xla,blocked

1. The vectorized likelihood: one composite forward over [x_t ; x_0] (2L tokens) against the
   per-block loop (one forward over [clean blocks < b, noisy block b] per block, L/B forwards),
   both jitted, with the largest difference of their per-token log-probs as a check.
2. `loss_fn` forward+backward time with T2T and MTF switched on and off, with XLA's temporary
   buffer bytes of the compiled program.
Both run once per `--attention` implementation (`ModelConfig.attention_impl`: `xla` dense
scores, `blocked` only the tiles the composite mask allows), side by side in one process.

Times exclude compilation (one warm-up call) and are medians over --repeats calls. On CPU only
ratios measured side by side in one run are meaningful; absolute numbers are for completeness.

One process on this machine's devices (a single-host benchmark: no distributed runtime).
"""

import json
import platform
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from llada_jax import model
from llada_jax.model import masks
from llada_jax.train import objectives
from llada_jax.model.config import get_config
from llada_jax.timing import time_call

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "tiny", "Model preset.")
flags.DEFINE_integer("batch", 2, "Sequences per batch (the loss doubles it with complementary masking).")
flags.DEFINE_integer("length", 512, "Sequence length L.")
flags.DEFINE_integer("block", 32, "Block size.")
flags.DEFINE_integer("prompt", 64, "Prompt tokens per sequence (never noised).")
flags.DEFINE_integer("repeats", 5, "Timed calls per measurement (median reported).")
flags.DEFINE_list("attention", ["xla", "blocked"], "Attention implementations to compare.")
flags.DEFINE_list("variants", ["m2t_only", "m2t_t2t", "m2t_mtf", "m2t_t2t_mtf"], "loss_fn variants to time.")


def _per_block_loop(config, block):
    """log p(x_0 | x_t) block by block: the L/B forwards the composite input replaces."""

    def fn(params, x_t, x_0):
        out = []
        for start in range(0, x_t.shape[1], block):
            end = min(start + block, x_t.shape[1])
            tokens = jnp.concatenate([x_0[:, :start], x_t[:, start:end]], axis=1)
            logits = model.forward(params, config, tokens, mask=masks.block_causal(end, block))[:, start:]
            out.append(objectives.token_logprobs(logits, x_0[:, start:end]))
        return jnp.concatenate(out, axis=1)

    return jax.jit(fn)


def main(argv):
    del argv
    config = get_config(FLAGS.preset)
    params = model.init_params(config, jax.random.key(0))
    b, length = FLAGS.batch, FLAGS.length
    tokens = jax.random.randint(jax.random.key(1), (b, length), 0, config.vocab_size - 2)
    batch = {"tokens": tokens, "loss_mask": jnp.broadcast_to(jnp.arange(length) >= FLAGS.prompt, (b, length))}
    out = {"device": jax.devices()[0].device_kind, "platform": platform.machine(), "preset": FLAGS.preset,
           "params": config.param_counts()["total"], "batch": b, "length": length, "block": FLAGS.block}

    base = objectives.ObjectiveConfig.for_model(config, block_size=FLAGS.block)
    nb = objectives.noise(batch, jax.random.key(2), base)
    loop = _per_block_loop(config, FLAGS.block)
    t_loop, c_loop, slow = time_call(loop, params, nb.x_t, nb.x_0, repeats=FLAGS.repeats)
    lik = out["vectorized_likelihood"] = {"rows": int(nb.x_t.shape[0]), "per_block_loop_s": round(t_loop, 5),
                                          "compile_s": {"per_block_loop": round(c_loop, 2)}}
    for impl in FLAGS.attention:
        mc = config.replace(attention_impl=impl)
        composite = jax.jit(lambda p, xt, x0, mc=mc: objectives.per_token_logprobs(p, mc, xt, x0, FLAGS.block))
        t_comp, c_comp, fast = time_call(composite, params, nb.x_t, nb.x_0, repeats=FLAGS.repeats)
        lik[f"composite_{impl}_s"] = round(t_comp, 5)
        lik[f"loop_over_composite_{impl}_time"] = round(t_loop / t_comp, 2)
        lik[f"max_abs_logprob_diff_{impl}"] = float(jnp.max(jnp.abs(fast - slow)))
        lik["compile_s"][f"composite_{impl}"] = round(c_comp, 2)

    grad = jax.jit(jax.value_and_grad(objectives.loss_fn, has_aux=True), static_argnums=(1, 2))
    variants = {"m2t_only": dict(p_edit=0.0), "m2t_t2t": dict(p_edit=0.1), "m2t_mtf": dict(p_edit=0.0, mtf=True),
                "m2t_t2t_mtf": dict(p_edit=0.1, mtf=True)}
    out["loss_and_grad"] = {}
    for impl in FLAGS.attention:
        mc = config.replace(attention_impl=impl)
        rows = out["loss_and_grad"][impl] = {}
        for name in FLAGS.variants:
            cfg = base.replace(**variants[name])
            key = jax.random.key(3)
            t0 = time.perf_counter()
            compiled = grad.lower(params, mc, cfg, batch, key).compile()
            comp = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            sec, _, _ = time_call(lambda p: compiled(p, batch, key), params, repeats=FLAGS.repeats)
            rows[name] = {"seconds": round(sec, 5), "tokens_per_s": round(b * length / sec, 1),
                          "compile_s": round(comp, 2),
                          "temp_bytes": None if mem is None else int(mem.temp_size_in_bytes)}
        if "m2t_only" in rows:
            for v in rows.values():
                v["time_over_m2t_only"] = round(v["seconds"] / rows["m2t_only"]["seconds"], 3)
    if "xla" in FLAGS.attention:
        for impl in FLAGS.attention:
            out[f"{impl}_over_xla"] = {
                "likelihood_time": round(lik[f"composite_{impl}_s"] / lik["composite_xla_s"], 3),
                **{f"{name}_time": round(out["loss_and_grad"][impl][name]["seconds"]
                                         / out["loss_and_grad"]["xla"][name]["seconds"], 3)
                   for name in FLAGS.variants},
                **{f"{name}_temp_bytes": round(out["loss_and_grad"][impl][name]["temp_bytes"]
                                               / out["loss_and_grad"]["xla"][name]["temp_bytes"], 3)
                   for name in FLAGS.variants if out["loss_and_grad"]["xla"][name]["temp_bytes"]}}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    app.run(main)
