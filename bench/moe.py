r"""MoE layer benchmark on fake CPU devices, printed as one JSON object (SCALE.md §4).

  python bench/moe.py                                  # small's MoE dims, 512 tokens per device
  python bench/moe.py --preset=tiny --tokens_per_device=64 --devices=2,4,8

The routed-expert layer's gradient program (forward + backward of `sum(y * cotangent)`), on an
`expert=n` mesh of n fake CPU devices, at a FIXED per-device batch (the global batch grows with
n), for three back ends:

  ragged             the GSPMD back end (`model.experts_ragged`): sorts the GLOBAL token set
  expert_parallel    `moe.expert_parallel`, padded all_to_all, worst-case (dropless) buffers
  expert_parallel_c2 the same with `moe_capacity_factor=2` (flat buffers, drops counted)

Reported per back end and device count: per-device temporary bytes of the compiled program
(`memory_analysis().temp_size_in_bytes`), the largest collective's result bytes and their sum
(`moe.collective_buffers` over the compiled HLO), the compile time, and the median step time.
All devices share this machine's cores, so step times are for comparison within one run only;
the bytes are what a real device of that mesh would hold.

One process (a single-host benchmark: no distributed runtime).
"""

import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from llada_jax import model  # noqa: E402
from llada_jax.model import moe
from llada_jax.parallel import sharding
from llada_jax.model.config import get_config  # noqa: E402
from llada_jax.timing import time_call  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "small", "Model preset whose MoE dimensions are used.")
flags.DEFINE_integer("tokens_per_device", 512, "Tokens per device (batch x length), fixed across device counts.")
flags.DEFINE_list("devices", ["2", "4", "8"], "Device counts (expert-axis sizes).")
flags.DEFINE_list("impls", ["ragged", "expert_parallel", "expert_parallel_c2"], "Back ends.")
flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (median reported).")

_NAMES = [("act_batch", None, None), ("embed", "router_exp"), ("router_exp",), ("exp", "embed", "expert_mlp"),
          ("exp", "embed", "expert_mlp"), ("exp", "expert_mlp", "embed")]


def _layer(impl, config):
    if impl == "ragged":
        def fn(x, router, bias, wg, wu, wo):
            b, t, d = x.shape
            idx, w = model.route(x.reshape(-1, d), router, bias, config)
            return model.experts_ragged(x.reshape(-1, d), idx, w, wg, wu, wo, jnp.float32).reshape(b, t, d)
        return fn
    cfg = dataclasses.replace(config, moe_capacity_factor=2.0 if impl.endswith("_c2") else 0.0)
    return lambda *a: moe.expert_parallel(*a, cfg)[0]


def _inputs(config, batch, length):
    c = config
    e, d, f = c.num_experts, c.hidden_size, c.moe_intermediate_size
    ks = jax.random.split(jax.random.key(0), 6)
    return [jax.random.normal(ks[0], (batch, length, d)), 0.02 * jax.random.normal(ks[1], (d, e)), jnp.zeros((e,)),
            0.02 * jax.random.normal(ks[2], (e, d, f)), 0.02 * jax.random.normal(ks[3], (e, d, f)),
            0.02 * jax.random.normal(ks[4], (e, f, d))], jax.random.normal(ks[5], (batch, length, d))


def measure(impl, config, n):
    length = min(FLAGS.tokens_per_device, 128)
    per_device_batch = FLAGS.tokens_per_device // length
    mesh = sharding.make_mesh(data=1, expert=n, devices=jax.devices()[:n])
    args, cot = _inputs(config, per_device_batch * n, length)
    layer = _layer(impl, config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        args = [jax.device_put(a, sharding.logical_sharding(nm, a.shape, mesh)) for a, nm in zip(args, _NAMES)]
        cot = jax.device_put(cot, sharding.logical_sharding(_NAMES[0], cot.shape, mesh))
        grad = jax.jit(jax.grad(lambda c, *a: jnp.sum(layer(*a) * c), argnums=(1, 2, 4, 5, 6)))
        t0 = time.perf_counter()
        compiled = grad.lower(cot, *args).compile()
        compile_s = time.perf_counter() - t0
        step_s, _, _ = time_call(compiled, cot, *args, repeats=FLAGS.repeats)
    coll = moe.collective_buffers(compiled.as_text())
    return {"devices": n, "global_tokens": per_device_batch * n * length,
            "temp_bytes_per_device": int(compiled.memory_analysis().temp_size_in_bytes),
            "largest_collective_bytes": max((b for _, b in coll), default=0),
            "collective_bytes_total": sum(b for _, b in coll),
            "compile_s": round(compile_s, 2), "step_s": round(step_s, 4)}


def main(argv):
    del argv
    config = get_config(FLAGS.preset)
    out = {"preset": FLAGS.preset, "experts": config.num_experts, "top_k": config.num_experts_per_tok,
           "hidden": config.hidden_size, "expert_width": config.moe_intermediate_size,
           "tokens_per_device": FLAGS.tokens_per_device, "program": "grad of the routed-expert layer",
           "results": {}}
    for impl in FLAGS.impls:
        out["results"][impl] = [measure(impl, config, int(n)) for n in FLAGS.devices]
        print(json.dumps({impl: out["results"][impl]}), file=sys.stderr)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    app.run(main)
