"""The model against the official implementation's outputs and against slow oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_close_to_scale
from llada_jax import model
from llada_jax.model import masks, moe
from llada_jax.model.config import get_config

# The fixture README's suggested fp32 tolerance: 1e-4 on logits that reach ~21 (5x the observed
# spread of 1.1e-6 of the largest logit), said relative to the magnitude.
REL = 5e-6


@pytest.fixture(scope="module")
def fwd(fixture_dir):
    return np.load(f"{fixture_dir}/forward.npz")


def test_logits_bidirectional(tiny_hf, fwd):
    config, params = tiny_hf
    logits = model.forward(params, config, fwd["ids_bidir"])
    assert_close_to_scale(logits, fwd["logits_bidir"], rel=REL)


def test_logits_block_causal(tiny_hf, fwd):
    config, params = tiny_hf
    mask = masks.block_causal(64, int(fwd["block_size_blockcausal"]))
    np.testing.assert_array_equal(mask, fwd["allowed_blockcausal"])
    logits = model.forward(params, config, fwd["ids_blockcausal"], mask=mask)
    assert_close_to_scale(logits, fwd["logits_blockcausal"], rel=REL)


def test_logits_composite_training_input(tiny_hf, fwd):
    config, params = tiny_hf
    mask, positions = masks.composite(48, int(fwd["block_size_train"]))
    np.testing.assert_array_equal(mask, fwd["allowed_train"])
    np.testing.assert_array_equal(positions, fwd["position_ids_train"])
    tokens = np.concatenate([fwd["ids_train_xt"], fwd["ids_train_x0"]], axis=1)
    logits = model.forward(params, config, tokens, positions=positions, mask=mask)
    assert_close_to_scale(logits, fwd["logits_train"], rel=REL)


@pytest.mark.parametrize("impl", ["ragged", "dense"])
def test_router_matches_reference(tiny_hf, fwd, impl):
    config, params = tiny_hf
    _, (idx, weight) = model.forward_with_router(params, config.replace(moe_impl=impl), fwd["ids_bidir"])
    for layer in (1, 2):
        ref_idx = fwd[f"router_topk_idx_layer{layer}"].reshape(-1, 4)
        ref_w = fwd[f"router_topk_weight_layer{layer}"].reshape(-1, 4)
        got_idx = np.asarray(idx[layer - 1]).reshape(-1, 4)
        got_w = np.asarray(weight[layer - 1]).reshape(-1, 4)
        assert [set(r) for r in got_idx] == [set(r) for r in ref_idx]
        # Compare weights expert by expert (top-k order may differ).
        order_ref, order_got = np.argsort(ref_idx, -1), np.argsort(got_idx, -1)
        np.testing.assert_allclose(np.take_along_axis(got_w, order_got, -1),
                                   np.take_along_axis(ref_w, order_ref, -1), atol=1e-5)


def _loop_over_experts(x, idx, w, wi_gate, wi_up, wo):
    """The slow obvious oracle: for each expert, its tokens, its SwiGLU, its weight."""
    y = jnp.zeros_like(x)
    for e in range(wi_gate.shape[0]):
        weight = jnp.where(idx == e, w, 0.0).sum(-1)  # [T]
        h = jax.nn.silu(x @ wi_gate[e]) * (x @ wi_up[e])
        y = y + weight[:, None] * (h @ wo[e])
    return y


@pytest.mark.parametrize("experts,k,groups,topk_group", [(16, 4, 4, 2), (64, 8, 8, 4), (8, 1, 1, 1)])
def test_moe_backends_match_loop_oracle(experts, k, groups, topk_group):
    config = get_config("tiny", num_experts=experts, num_experts_per_tok=k, n_group=groups, topk_group=topk_group)
    keys = jax.random.split(jax.random.key(experts), 6)
    d, f = config.hidden_size, config.moe_intermediate_size
    x = jax.random.normal(keys[0], (96, d))
    router = jax.random.normal(keys[1], (d, experts)) * 0.3
    bias = jax.random.normal(keys[2], (experts,)) * 0.1
    wi_gate = jax.random.normal(keys[3], (experts, d, f)) / 8
    wi_up = jax.random.normal(keys[4], (experts, d, f)) / 8
    wo = jax.random.normal(keys[5], (experts, f, d)) / 6
    idx, w = model.route(x, router, bias, config)
    assert idx.shape == (96, k)
    if k > 1:
        np.testing.assert_allclose(w.sum(-1), config.routed_scaling_factor, rtol=1e-5)
    oracle = _loop_over_experts(x, idx, w, wi_gate, wi_up, wo)
    for impl in (model.experts_ragged, model.experts_dense, model.experts_tiled):
        got = impl(x, idx, w, wi_gate, wi_up, wo, jnp.float32)
        np.testing.assert_allclose(got, oracle, atol=1e-5, rtol=1e-5)


def test_tile_slots_by_hand():
    # 3 experts, tiles of 2 rows; counts [3, 0, 2]: expert 0 takes tiles 0-1 (rows 0-2, slot 3
    # empty), expert 1 none, expert 2 tile 2. 4 tiles allowed: the last is unused (expert id 3).
    sizes = jnp.asarray([3, 0, 2], jnp.int32)
    sorted_expert = jnp.asarray([0, 0, 0, 2, 2], jnp.int32)
    assert moe.num_tiles(5, 3, 2) == 5  # ceil(5 / 2) + 3 - 1 always suffices
    slots, tile_expert = moe.tile_slots(sorted_expert, sizes, 2, 4)
    assert slots.tolist() == [0, 1, 2, 4, 5]
    assert tile_expert.tolist() == [0, 0, 2, 3]


@pytest.mark.parametrize("tile", [1, 3, 128])
def test_tiled_experts_equal_the_oracle_in_values_and_gradients(tile):
    """Tiles of 1 (no padding), 3 (groups padded, several tiles per expert) and 128 (one tile
    each): forward and gradients equal the loop-over-experts oracle, with an expert that gets
    every token and experts that get none."""
    experts, k, t = 8, 2, 24
    config = get_config("tiny", num_experts=experts, num_experts_per_tok=k, n_group=1, topk_group=1)
    keys = jax.random.split(jax.random.key(tile), 5)
    d, f = config.hidden_size, config.moe_intermediate_size
    x = jax.random.normal(keys[0], (t, d))
    # expert 0 on every token, the second choice among experts 1-3: experts 4-7 get nothing
    idx = jnp.stack([jnp.zeros(t, jnp.int32), 1 + jnp.arange(t, dtype=jnp.int32) % 3], -1)
    w = jax.nn.softmax(jax.random.normal(keys[1], (t, k)), -1)
    wi_gate = jax.random.normal(keys[2], (experts, d, f)) / 8
    wi_up = jax.random.normal(keys[3], (experts, d, f)) / 8
    wo = jax.random.normal(keys[4], (experts, f, d)) / 6

    def loss(fn, *args):
        return jnp.sum(jnp.sin(fn(*args)))

    tiled = lambda x_, g_, u_, o_: moe.experts_tiled(x_, idx, w, g_, u_, o_, jnp.float32, tile=tile)  # noqa: E731
    oracle = lambda x_, g_, u_, o_: _loop_over_experts(x_, idx, w, g_, u_, o_)  # noqa: E731
    np.testing.assert_allclose(tiled(x, wi_gate, wi_up, wo), oracle(x, wi_gate, wi_up, wo), atol=1e-5, rtol=1e-5)
    got = jax.grad(lambda *a: loss(tiled, *a), argnums=(0, 1, 2, 3))(x, wi_gate, wi_up, wo)
    want = jax.grad(lambda *a: loss(oracle, *a), argnums=(0, 1, 2, 3))(x, wi_gate, wi_up, wo)
    for g, wnt in zip(got, want):
        np.testing.assert_allclose(g, wnt, atol=1e-5, rtol=1e-5)


def test_router_group_limit_and_bias_only_steer_selection():
    config = get_config("tiny")
    x = jax.random.normal(jax.random.key(3), (64, config.hidden_size))
    router = jax.random.normal(jax.random.key(4), (config.hidden_size, config.num_experts))
    bias = jax.random.normal(jax.random.key(5), (config.num_experts,)) * 0.1
    idx, w = model.route(x, router, bias, config)
    scores = jax.nn.sigmoid(x @ router)
    per_group = config.num_experts // config.n_group
    for t in range(64):
        groups = set(int(e) // per_group for e in idx[t])
        assert len(groups) <= config.topk_group
        chosen = scores[t, idx[t]]
        np.testing.assert_allclose(w[t], chosen / chosen.sum() * config.routed_scaling_factor, rtol=1e-5)


def test_ragged_and_dense_models_agree(tiny_hf, fwd):
    config, params = tiny_hf
    a = model.forward(params, config.replace(moe_impl="ragged"), fwd["ids_blockcausal"])
    b = model.forward(params, config.replace(moe_impl="dense"), fwd["ids_blockcausal"])
    assert_close_to_scale(a, b, rel=1e-6)  # logits ~20: the experts' sums in another order


def test_remat_policies_give_same_gradients(tiny_hf, fwd):
    config, params = tiny_hf
    tokens = fwd["ids_bidir"]

    def loss(p, cfg):
        return jnp.mean(jax.nn.log_softmax(model.forward(p, cfg, tokens))[..., 0])

    grad = jax.jit(jax.grad(loss), static_argnums=1)  # one program per policy, not op by op
    ref = grad(params, config)
    for policy in ("full", "dots"):
        got = grad(params, config.replace(remat_policy=policy))
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, ref)


def test_bf16_compute_tracks_fp32(tiny_hf, fwd):
    config, params = tiny_hf
    ref = model.forward(params, config, fwd["ids_bidir"])
    bf = model.forward(params, config.replace(dtype="bfloat16"), fwd["ids_bidir"])
    assert bf.dtype == jnp.float32
    # The fixture's weights are chosen to make decisions sensitive; bf16 (8-bit mantissa) moves
    # logits by ~5% of their spread there (measured 0.048) and flips ~11% of the argmaxes.
    assert float(np.abs(bf - ref).mean() / ref.std()) < 0.1
    assert np.mean(np.argmax(bf, -1) == np.argmax(ref, -1)) > 0.8
    p16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    out = model.forward(p16, config.replace(dtype="bfloat16", param_dtype="bfloat16"), fwd["ids_bidir"])
    assert np.isfinite(out).all()


def test_a_compute_dtype_copy_of_the_params_changes_nothing_but_bytes(tiny_hf, fwd):
    """`compute_params(params, bf16)`: the router and its bias stay fp32, every other weight is bf16,
    and under a bf16-compute config the copy's forward, cached forward and sampled decode equal the
    fp32 params' bit for bit (every other weight is cast to the compute dtype where it is read)."""
    from llada_jax import decode

    config, params = tiny_hf
    bf = config.replace(dtype="bfloat16")
    copy = jax.jit(lambda p: model.compute_params(p, "bfloat16"))(params)
    leaves = jax.tree_util.tree_leaves_with_path(copy)
    kept = {jax.tree_util.keystr(k) for k, v in leaves if v.dtype == jnp.float32}
    assert kept and all(k.endswith(("['router']", "['expert_bias']")) for k in kept)
    assert all(v.dtype == jnp.bfloat16 for k, v in leaves if jax.tree_util.keystr(k) not in kept)
    full = sum(v.nbytes for v in jax.tree_util.tree_leaves(params))
    assert sum(v.nbytes for _, v in leaves) < 0.55 * full
    tokens = jnp.asarray(fwd["ids_blockcausal"])
    mask = masks.block_causal(64, 16)
    np.testing.assert_array_equal(model.forward(copy, bf, tokens, mask=mask), model.forward(params, bf, tokens, mask=mask))
    cache = model.init_cache(bf, 2, 64)
    pos, index = jnp.broadcast_to(jnp.arange(16), (2, 16)), jnp.zeros((2,), jnp.int32)
    got = model.forward_cached(copy, bf, tokens[:, :16], pos, mask[None, :16], cache, index)
    want = model.forward_cached(params, bf, tokens[:, :16], pos, mask[None, :16], cache, index)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
    kw = dict(gen_length=32, block_length=16, preset="S", temperature=1.0, rng=jax.random.key(3), eos_early_stop=True)
    ids = np.random.default_rng(0).integers(0, config.mask_token_id, size=16).tolist()
    prompts = [ids, ids[:7]]
    a, b = decode.generate(copy, bf, prompts, **kw), decode.generate(params, bf, prompts, **kw)
    assert a.tokens == b.tokens and np.array_equal(a.forwards, b.forwards)


def test_init_param_dtype_and_router_stays_fp32():
    config = get_config("tiny", param_dtype="bfloat16")
    params = model.init_params(config, jax.random.key(0))
    assert params["embed"].dtype == jnp.bfloat16
    assert params["moe_layers"]["moe"]["router"].dtype == jnp.float32
    assert np.all(np.asarray(params["moe_layers"]["moe"]["expert_bias"]) == 0)


def test_kv_cache_forward_equals_full_forward(tiny_hf, fwd):
    """Block-causal attention makes a block KV cache exact: chunked prefill == one forward."""
    config, params = tiny_hf
    tokens = jnp.asarray(fwd["ids_blockcausal"])  # [2, 64]
    block = 16
    full = model.forward(params, config, tokens, mask=masks.block_causal(64, block))
    cache = model.init_cache(config, 2, 64)
    outs = []
    for start in range(0, 64, block):
        keys = jnp.arange(64)
        mask = jnp.broadcast_to(keys[None, :] < start + block, (block, 64))[None]
        pos = jnp.broadcast_to(jnp.arange(start, start + block), (2, block))
        logits, cache = model.forward_cached(params, config, tokens[:, start:start + block], pos, mask, cache,
                                             jnp.full((2,), start))
        outs.append(logits)
    assert_close_to_scale(jnp.concatenate(outs, 1), full, rel=REL)


@pytest.mark.parametrize("bad,match", [
    (dict(tokens=np.zeros((4,), np.int32)), "tokens"),
    (dict(mask=np.ones((1, 5, 5), bool)), "mask"),
    (dict(mask=np.ones((1, 8, 8), np.float32)), "boolean"),
    (dict(positions=np.zeros((3,), np.int32)), "positions"),
])
def test_forward_rejects_bad_shapes(tiny_hf, bad, match):
    config, params = tiny_hf
    kw = dict(tokens=np.zeros((2, 8), np.int32))
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        model.forward(params, config, **kw)
