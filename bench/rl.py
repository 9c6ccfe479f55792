r"""RL likelihood and update benchmarks, printed as one JSON object (REFERENCE §6).

  python bench/rl.py                               # tiny, L = 512 and 2048, block 32, N = 8
  python bench/rl.py --lengths=512 --grad_length=256
  python bench/rl.py --lengths=2048 --vectorize=scan   # the scanned form only
  python bench/rl.py --lengths=2048 --vectorize=batch --attention=xla,blocked --grad_length=0

1. Likelihood cost: EBPO's vectorized ELBO terms (one composite [x_t ; x_0] forward per
   timestep, all N timesteps batched, and the same under `lax.scan`) against the per-block loop
   they replace (per block k, one forward over [clean blocks < k, noisy block k] carrying all N
   timesteps as batch rows: L/B forwards of growing length), with the largest difference of the
   terms as a check. Each vectorized form runs with every `--attention` implementation
   (`ModelConfig.attention_impl`: `xla` dense scores, `blocked` only the tiles the composite
   mask allows); the loop's masks are dense booleans, so it always runs `xla`.
2. EBPO loss + gradient: "direct" (differentiate through the N forwards) against "replay"
   (terms without gradient, then one replayed forward per timestep), with XLA's temporary-buffer
   size of each compiled program as the activation-memory figure.

Times exclude compilation (one warm-up call) and are medians over --repeats calls. On CPU only
ratios measured side by side in one run are meaningful.

One process on this machine's devices (a single-host benchmark: no distributed runtime).
"""

import json
import platform
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from llada_jax import model, rl
from llada_jax.model.config import get_config
from llada_jax.timing import time_call

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "tiny", "Model preset.")
flags.DEFINE_list("lengths", ["512", "2048"], "Sequence lengths L for the likelihood benchmark.")
flags.DEFINE_integer("block", 32, "Block size.")
flags.DEFINE_integer("timesteps", 8, "EBPO timesteps N.")
flags.DEFINE_integer("prompt", 64, "Prompt tokens per sequence (never masked).")
flags.DEFINE_list("attention", ["xla", "blocked"], "Attention implementations of the vectorized forms.")
flags.DEFINE_integer("grad_length", 512, "L of the loss + gradient benchmark (0: skip it).")
flags.DEFINE_integer("grad_batch", 2, "Completions per batch in the loss + gradient benchmark.")
flags.DEFINE_list("vectorize", list(rl.VECTORIZE), "Vectorized modes to time (batch holds the activations "
                  "of all N timesteps at once, scan of one).")
flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (median reported).")


def _batch(config, b, length):
    tokens = jax.random.randint(jax.random.key(1), (b, length), 0, config.vocab_size - 2)
    completion = jnp.broadcast_to(jnp.arange(length) >= FLAGS.prompt, (b, length))
    return {"tokens": tokens, "completion_mask": completion, "advantages": jnp.linspace(-1.0, 1.0, b)}


def main(argv):
    del argv
    config = get_config(FLAGS.preset)
    params = jax.jit(model.init_params, static_argnums=0)(config, jax.random.key(0))
    out = {"device": jax.devices()[0].device_kind, "platform": platform.machine(), "preset": FLAGS.preset,
           "params": config.param_counts()["total"], "block": FLAGS.block, "timesteps": FLAGS.timesteps}

    out["likelihood"] = {}
    loop = rl.per_block_likelihood_terms(config, rl.LikelihoodConfig(block_size=FLAGS.block,
                                                                     num_timesteps=FLAGS.timesteps))
    for length in map(int, FLAGS.lengths):
        batch = _batch(config, 1, length)
        n, nb = FLAGS.timesteps, length // FLAGS.block
        row = {"batch": 1, "length": length,
               "model_calls": {"vectorized_batch": 1, "vectorized_scan": n, "per_block_loop": nb},
               "tokens_through_model": {"vectorized": n * 2 * length,
                                        "per_block_loop": n * FLAGS.block * nb * (nb + 1) // 2}}
        terms = {}
        for vectorize in FLAGS.vectorize:
            for impl in FLAGS.attention:
                lik = rl.LikelihoodConfig(block_size=FLAGS.block, num_timesteps=FLAGS.timesteps, vectorize=vectorize)
                noise = rl.sample_noise(jax.random.key(2), batch["completion_mask"], lik)
                mc = config.replace(attention_impl=impl)
                fn = jax.jit(lambda p, t, nz, lik=lik, mc=mc: rl.likelihood_terms(p, mc, t, nz, lik))
                sec, comp, terms[vectorize, impl] = time_call(fn, params, batch["tokens"], noise, repeats=FLAGS.repeats)
                row[f"vectorized_{vectorize}_{impl}_s"] = round(sec, 4)
                row[f"compile_{vectorize}_{impl}_s"] = round(comp, 1)
        sec, comp, slow = time_call(loop, params, batch["tokens"], noise, repeats=FLAGS.repeats)
        row["per_block_loop_s"], row["compile_per_block_loop_s"] = round(sec, 4), round(comp, 1)
        for (vectorize, impl), got in terms.items():
            row[f"loop_over_vectorized_{vectorize}_{impl}"] = round(sec / row[f"vectorized_{vectorize}_{impl}_s"], 2)
            row[f"max_abs_term_diff_{vectorize}_{impl}"] = float(jnp.max(jnp.abs(got - slow)))
        out["likelihood"][str(length)] = row

    if FLAGS.grad_length <= 0:
        print(json.dumps(out, indent=2))
        return
    b, length = FLAGS.grad_batch, FLAGS.grad_length
    batch = _batch(config, b, length)
    lik = rl.LikelihoodConfig(block_size=FLAGS.block, num_timesteps=FLAGS.timesteps)
    key = jax.random.key(3)
    batch["old_terms"] = jax.jit(rl.policy_terms, static_argnames=("model_config", "config"))(
        params, batch, key, model_config=config, config=rl.EBPOConfig(likelihood=lik))
    out["ebpo_loss_and_grad"] = {"batch": b, "length": length}
    for mode in rl.GRAD_MODES:
        cfg = rl.EBPOConfig(likelihood=lik, grad_mode=mode)
        fn = jax.jit(lambda p, bt, k, cfg=cfg: rl.loss_and_grad(p, bt, k, model_config=config, config=cfg))
        t0 = time.perf_counter()
        compiled = fn.lower(params, batch, key).compile()
        comp = time.perf_counter() - t0
        temp = compiled.memory_analysis()
        sec, _, _ = time_call(compiled, params, batch, key, repeats=FLAGS.repeats)
        out["ebpo_loss_and_grad"][mode] = {
            "seconds": round(sec, 4), "compile_s": round(comp, 1),
            "temp_bytes": None if temp is None else int(temp.temp_size_in_bytes)}
    g = out["ebpo_loss_and_grad"]
    g["replay_over_direct_time"] = round(g["replay"]["seconds"] / g["direct"]["seconds"], 2)
    if g["direct"]["temp_bytes"]:
        g["replay_over_direct_temp_bytes"] = round(g["replay"]["temp_bytes"] / g["direct"]["temp_bytes"], 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    app.run(main)
