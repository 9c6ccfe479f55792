"""Expert-parallel MoE (llada_jax/model/moe.py) against the loop-over-experts oracle on 8 fake CPU devices,
its offset arithmetic against tables worked out by hand, and the compiled program's collectives."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_close_to_scale
from llada_jax import model
from llada_jax.model import moe
from llada_jax.parallel import sharding
from llada_jax.model.config import get_config

CFG = get_config("tiny", moe_impl="expert_parallel")
E, K, D, F = CFG.num_experts, CFG.num_experts_per_tok, CFG.hidden_size, CFG.moe_intermediate_size
MESHES = {
    "expert8": dict(data=1, expert=8),
    "data2_expert4": dict(data=2, expert=4),
    "fsdp2_expert4": dict(data=1, fsdp=2, expert=4),
    "tensor2_expert4": dict(data=1, tensor=2, expert=4),
}


# ------------------------------------------------------------------------- offsets by hand
def test_send_plan_and_padded_slots_by_hand():
    # 4 experts on 2 shards (2 each); local counts [2, 0, 1, 3]: shard 0 gets 2 rows, shard 1 gets 4.
    sizes = jnp.asarray([2, 0, 1, 3], jnp.int32)
    send, start = moe.send_plan(sizes, 2)
    assert send.tolist() == [2, 4] and start.tolist() == [0, 2]
    sorted_expert = jnp.asarray([0, 0, 2, 3, 3, 3], jnp.int32)
    slot, fits = moe.padded_slots(sorted_expert, sizes, 2, capacity=3)
    # shard 0's slot is rows 0..2, shard 1's is 3..5; the 4th row for shard 1 does not fit (-> 6)
    assert slot.tolist() == [0, 1, 3, 4, 5, 6]
    assert fits.tolist() == [True, True, True, True, True, False]


def test_ragged_plan_by_hand():
    # 3 shards, 6 experts (2 per shard). Row s: shard s's local per-expert counts.
    all_sizes = jnp.asarray([[1, 2, 0, 0, 3, 1],    # shard 0 sends 3, 0, 4 to shards 0, 1, 2
                             [0, 1, 2, 2, 0, 0],    # shard 1 sends 1, 4, 0
                             [2, 0, 1, 0, 1, 1]],   # shard 2 sends 2, 1, 2
                            jnp.int32)
    table = {  # shard: (input_offsets, send_sizes, output_offsets, recv_sizes), worked out by hand
        0: ([0, 3, 3], [3, 0, 4], [0, 0, 0], [3, 1, 2]),
        1: ([0, 1, 5], [1, 4, 0], [3, 0, 4], [0, 4, 1]),
        2: ([0, 2, 3], [2, 1, 2], [4, 4, 4], [4, 0, 2]),
    }
    for shard, want in table.items():
        got = moe.ragged_plan(all_sizes, shard, capacity=100)
        assert [g.tolist() for g in got] == [list(w) for w in want], shard
    # Receive buffers of 4 rows, filled in sender order: shard 0 takes 3 from shard 0 and 1 from
    # shard 1; shard 1 takes 4 from shard 1; shard 2 takes 4 from shard 0. Shard 2 sends nothing.
    in_off, send, out_off, recv = moe.ragged_plan(all_sizes, 2, capacity=4)
    assert send.tolist() == [0, 0, 0] and out_off.tolist() == [4, 4, 4] and recv.tolist() == [4, 0, 0]
    _, send, _, recv = moe.ragged_plan(all_sizes, 1, capacity=4)
    assert send.tolist() == [1, 4, 0] and recv.tolist() == [0, 4, 0]


def test_received_experts_by_hand():
    # 2 senders, 2 local experts. Sender 0 sent [1, 2] rows (expert 0, 1), sender 1 sent [0, 1].
    groups = jnp.asarray([[1, 2], [0, 1]], jnp.int32)
    recv = jnp.asarray([3, 1], jnp.int32)
    padded = moe.received_experts(groups, recv, rows=8, chunk=4)  # slots of 4 rows
    assert padded.tolist() == [0, 1, 1, 2, 1, 2, 2, 2]
    ragged = moe.received_experts(groups, recv, rows=6, chunk_starts=jnp.asarray([0, 3], jnp.int32))
    assert ragged.tolist() == [0, 1, 1, 1, 2, 2]


# ------------------------------------------------------------------------- parity with the oracle
def loop_oracle(x, router, bias, wi_gate, wi_up, wo, config):
    """The slow obvious way: every expert on every token, kept where routed."""
    b, t, d = x.shape
    x2 = x.reshape(b * t, d)
    idx, w = model.route(x2, router, bias, config)
    y = jnp.zeros_like(x2)
    for e in range(config.num_experts):
        h = nn.silu(x2 @ wi_gate[e]) * (x2 @ wi_up[e])
        weight = jnp.sum(jnp.where(idx == e, w, 0.0), axis=-1)  # [T]
        y = y + weight[:, None] * (h @ wo[e])
    return y.reshape(b, t, d)


def skewed_inputs(b=8, t=4, seed=0):
    """Expert 0 never chosen (bias -10), expert 5 chosen by every token (bias +10): uneven loads."""
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (b, t, D))
    router = 0.3 * jax.random.normal(ks[1], (D, E))
    bias = jnp.zeros((E,)).at[0].set(-10.0).at[5].set(10.0)
    wi_gate = 0.2 * jax.random.normal(ks[2], (E, D, F))
    wi_up = 0.2 * jax.random.normal(ks[3], (E, D, F))
    wo = 0.2 * jax.random.normal(ks[4], (E, F, D))
    cot = jax.random.normal(ks[5], (b, t, D))
    return (x, router, bias, wi_gate, wi_up, wo), cot


def _first_second_last(out):
    return out[0], out[1], out[-1]


def _value_and_vjp(fn, args, cot):
    """(fn's outputs, the cotangent `cot` of its first output pulled back to x, router, wi_gate, wi_up, wo)."""
    diff = (0, 1, 3, 4, 5)

    def f(*d):
        full = list(args)
        for i, v in zip(diff, d):
            full[i] = v
        out = fn(*full)
        return out[0], tuple(out[1:])

    y, pullback, aux = jax.vjp(f, *[args[i] for i in diff], has_aux=True)
    return (y,) + aux, pullback(cot)


@pytest.mark.parametrize("name", sorted(MESHES))
def test_expert_parallel_equals_loop_oracle(name):
    args, cot = skewed_inputs()
    idx, _ = model.route(args[0].reshape(-1, D), args[1], args[2], CFG)
    load = np.bincount(np.asarray(idx).ravel(), minlength=E)
    assert load[0] == 0 and load.max() >= 4 * load.mean() and load.max() == idx.shape[0]  # uneven

    (y_ref, _, _), ref_grads = _value_and_vjp(lambda *a: (loop_oracle(*a, CFG), None, None), args, cot)

    mesh = sharding.make_mesh(**MESHES[name])
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        (y, ep_idx, dropped), grads = jax.jit(lambda *a: _value_and_vjp(
            lambda *b: _first_second_last(moe.expert_parallel(*b, CFG)), a, cot))(*args)
    assert int(dropped) == 0
    np.testing.assert_array_equal(ep_idx.reshape(-1, K), idx)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                axis_name):
    """`ragged_all_to_all` written with all_gather (XLA:CPU lacks the primitive): for the offset logic."""
    ops = jax.lax.all_gather(operand, axis_name)  # [P, M, D]
    ins = jax.lax.all_gather(input_offsets, axis_name)
    sends = jax.lax.all_gather(send_sizes, axis_name)
    outs = jax.lax.all_gather(output_offsets, axis_name)
    me = moe._shard_index(axis_name)
    rows = jnp.arange(output.shape[0])
    for s in range(ops.shape[0]):
        start, n, dst = ins[s, me], sends[s, me], outs[s, me]
        src_rows = jnp.clip(rows - dst + start, 0, ops.shape[1] - 1)
        take = (rows >= dst) & (rows < dst + n)
        output = jnp.where(take[:, None], ops[s][src_rows], output)
    return output


@pytest.mark.parametrize("factor", [0.0, 1.0])
def test_ragged_exchange_offsets_through_an_emulation(factor):
    """The ragged exchange's offsets (dispatch, truncation and the way back) with the primitive
    emulated; with a tight buffer (factor 1) the dropped rows are exactly those counted."""
    cfg = dataclasses.replace(CFG, moe_capacity_factor=factor)
    args, _ = skewed_inputs()
    y_ref = loop_oracle(*args, cfg)
    mesh = sharding.make_mesh(**MESHES["data2_expert4"])
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        y, _, _, dropped = jax.jit(lambda *a: moe.expert_parallel(
            *a, cfg, exchange="ragged", ragged_all_to_all=_emulated_ragged_all_to_all))(*args)
    if factor == 0:
        assert int(dropped) == 0
        np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    else:
        assert int(dropped) > 0  # expert 5 takes every token: its shard overflows
        # tokens with a dropped row differ from the oracle, the others match
        diff = np.abs(np.asarray(y) - np.asarray(y_ref)).max(-1).ravel()
        assert (diff < 1e-5).sum() >= 1 and (diff > 1e-5).sum() >= 1


def test_model_forward_expert_parallel_equals_ragged(tiny_hf):
    """The whole tiny model, moe_impl switched at the seam, on a data x expert mesh."""
    config, params = tiny_hf
    tokens = jax.random.randint(jax.random.key(0), (8, 16), 0, 510)
    ref = model.forward(params, config, tokens)
    ep_config = dataclasses.replace(config, moe_impl="expert_parallel")
    mesh = sharding.make_mesh(data=2, expert=4)
    sharded = jax.device_put(params, sharding.param_shardings(model.abstract_params(config), mesh))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        out = jax.jit(lambda p, t: model.forward(p, ep_config, t))(sharded, tokens)
    assert_close_to_scale(out, ref, rel=1e-4)


_NAMES = [("act_batch", None, None), ("embed", "router_exp"), ("router_exp",), ("exp", "embed", "expert_mlp"),
          ("exp", "embed", "expert_mlp"), ("exp", "expert_mlp", "embed")]


def _compiled_collectives(impl, num_devices, per_device_batch=2, t=4):
    """Collectives of the MoE layer's gradient program on `expert=num_devices`, per-device batch fixed."""
    cfg = dataclasses.replace(CFG, moe_capacity_factor=2.0)
    args, cot = skewed_inputs(b=per_device_batch * num_devices, t=t)
    mesh = sharding.make_mesh(data=1, expert=num_devices, devices=jax.devices()[:num_devices])

    def layer(*a):
        if impl == "ragged":  # the GSPMD back end, routed over the global token set
            b, t_, d = a[0].shape
            idx, w = model.route(a[0].reshape(-1, d), a[1], a[2], cfg)
            return model.experts_ragged(a[0].reshape(-1, d), idx, w, *a[3:], jnp.float32).reshape(b, t_, d)
        return moe.expert_parallel(*a, cfg)[0]

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        args = [jax.device_put(a, sharding.logical_sharding(n, a.shape, mesh)) for a, n in zip(args, _NAMES)]
        grad = jax.jit(jax.grad(lambda *a: jnp.sum(layer(*a) * cot), argnums=(0, 1, 3, 4, 5)))
        text = grad.lower(*args).compile().as_text()
    return sorted(moe.collective_buffers(text))


def test_collectives_follow_the_per_device_batch():
    """At a fixed per-device batch, 4 and 8 devices compile to the same collective buffers for the
    expert-parallel layer, none as large as the global [T*k, D] dispatch; the GSPMD ragged back
    end's grow with the global batch (the audit can tell them apart)."""
    ep4, ep8 = _compiled_collectives("expert_parallel", 4), _compiled_collectives("expert_parallel", 8)
    assert {op for op, _ in ep8} >= {"all-to-all"}
    assert ep4 == ep8
    global_dispatch = 2 * 8 * 4 * K * D * 4  # f32[T*k, D] of the 8-device global batch
    assert max(n for _, n in ep8) < global_dispatch / 2
    rg4, rg8 = _compiled_collectives("ragged", 4), _compiled_collectives("ragged", 8)
    assert max(n for _, n in rg8) > max(n for _, n in rg4)
    assert max(n for _, n in rg8) >= global_dispatch


def test_no_expert_axis_needs_no_exchange():
    """FSDP only (no `expert` axis, P = 1): each device routes its own tokens through every expert
    and nothing is exchanged, whichever exchange is asked for (the ragged one on TPU: an AOT plan)."""
    args, _ = skewed_inputs()
    y_ref = loop_oracle(*args, CFG)
    mesh = sharding.make_mesh(data=1, fsdp=8)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        fn = jax.jit(lambda *a: moe.expert_parallel(*a, CFG, exchange="ragged")[0])
        assert "ragged_all_to_all" not in fn.lower(*args).as_text()
        y = fn(*args)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)


def test_ragged_exchange_gradient_lowers_with_the_real_primitive():
    """XLA:CPU cannot run `ragged_all_to_all`, but the program (forward and backward) must lower with
    it: two exchanges forward, their two transposes backward."""
    args, cot = skewed_inputs()
    mesh = sharding.make_mesh(**MESHES["data2_expert4"])
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        grad = jax.jit(jax.grad(lambda *a: jnp.sum(moe.expert_parallel(*a, CFG, exchange="ragged")[0] * cot),
                                argnums=(0, 3)))
        text = grad.lower(*args).as_text()
    assert text.count("ragged_all_to_all") == 4


def test_one_sequence_splits_its_tokens_over_the_expert_axis():
    """Batch 1 (decoding): the tokens, not the sequences, split over the devices."""
    args, cot = skewed_inputs(b=1, t=16)
    y_ref = loop_oracle(*args, CFG)
    with jax.set_mesh(sharding.make_mesh(**MESHES["expert8"])), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        y = jax.jit(lambda *a: moe.expert_parallel(*a, CFG)[0])(*args)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)


def test_default_exchange_follows_the_meshs_platform_under_jit():
    """Under `jit` only the abstract mesh is known: its device's platform picks the exchange, so an
    ahead-of-time compile for TPU on a CPU host uses ragged_all_to_all (it once fell back to the
    host's backend and compiled the padded worst-case exchange for TPU)."""
    from jax._src.mesh import AbstractDevice, AbstractMesh

    def mesh(platform):
        return AbstractMesh((4,), ("expert",), abstract_device=AbstractDevice(
            device_kind=f"{platform} device", num_cores=1, platform=platform))

    assert moe._default_exchange(mesh("tpu")) == "ragged"
    assert moe._default_exchange(mesh("gpu")) == "ragged"
    assert moe._default_exchange(mesh("cpu")) == "padded"
    cpu_mesh = sharding.make_mesh(data=1, expert=4, devices=jax.devices()[:4])
    seen = []
    with jax.set_mesh(cpu_mesh):
        jax.jit(lambda x: seen.append(moe._default_exchange(jax.sharding.get_abstract_mesh())) or x)(jnp.ones(4))
    assert seen == ["padded"]
