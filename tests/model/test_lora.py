"""LoRA adapters (llada_jax.model.lora): exact at zero init, merge == adapted forward, placement
by the logical sharding rules, errors that name the field."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_close_to_scale
import llada_jax
from llada_jax.model import abstract_params, forward, init_params, lora
from llada_jax.parallel import sharding


_forward = jax.jit(forward, static_argnums=1)
_LC = lora.LoraConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def tiny():
    """tiny's params (the MoE back end does not change them) and fresh rank-4 adapters on every target."""
    params = jax.jit(init_params, static_argnums=0)(llada_jax.get_config("tiny"), jax.random.key(0))
    return params, jax.jit(lambda p: lora.init_adapters(p, _LC, jax.random.key(1)))(params)


def _trained_like(adapters, seed=3, std=0.02):
    """Adapters moved off their zero-init B, as a few training steps would."""
    leaves, treedef = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [x + std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("moe_impl", ["ragged", "dense"])
def test_zero_initialised_adapters_give_the_base_logits_exactly(moe_impl, tiny):
    config = llada_jax.get_config("tiny", moe_impl=moe_impl)
    params, adapters = tiny
    lc = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.5)
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, config.vocab_size)
    base = _forward(params, config, tokens)
    adapted = _forward(lora.combine(params, lora.prepare(adapters, lc, jax.random.key(4))), config, tokens)
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))
    # every target of the model got an adapter, A random and B zero
    names = {k for path, _ in jax.tree_util.tree_flatten_with_path(adapters)[0] for k in [str(path[-1].key)]}
    assert names == {f"{t}_lora_{x}" for t in lora.TARGETS for x in "ab"}
    a = adapters["moe_layers"]["moe"]["wi_gate_lora_a"]
    assert a.shape == (config.num_moe_layers, config.num_experts, config.hidden_size, 4) and float(jnp.std(a)) > 0
    assert not np.any(np.asarray(adapters["moe_layers"]["moe"]["wi_gate_lora_b"]))


def test_merged_weights_give_the_adapted_logits(tiny):
    """fp32: the merged tree's logits equal the adapted forward's to 1e-5 of the largest logit, with
    every target adapted at once (an adapter the model ignored, or one merge skipped, would show)."""
    config = llada_jax.get_config("tiny", moe_impl="dense")
    params, adapters = tiny
    lc = _LC
    adapters = _trained_like(adapters)
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, config.vocab_size)
    adapted = _forward(lora.combine(params, lora.prepare(adapters, lc)), config, tokens)
    merged_params = lora.merge(params, adapters, lc)
    assert jax.tree_util.tree_structure(merged_params) == jax.tree_util.tree_structure(params)
    assert_close_to_scale(_forward(merged_params, config, tokens), adapted, 1e-5)
    base = _forward(params, config, tokens)
    assert float(jnp.max(jnp.abs(adapted - base))) > 1e-2


def test_merge_matches_the_obvious_per_expert_formula(tiny):
    """W + (alpha / r) A @ B, written with numpy for one expert of one layer."""
    params, _ = tiny
    lc = lora.LoraConfig(rank=2, alpha=6.0, targets=("wi_up", "o_proj"))
    adapters = _trained_like(lora.init_adapters(params, lc, jax.random.key(1)))
    merged = lora.merge(params, adapters, lc)
    moe = adapters["moe_layers"]["moe"]
    a, b = np.asarray(moe["wi_up_lora_a"][1, 3]), np.asarray(moe["wi_up_lora_b"][1, 3])  # [D, r], [r, F]
    want = np.asarray(params["moe_layers"]["moe"]["wi_up"][1, 3]) + 3.0 * a @ b
    np.testing.assert_allclose(np.asarray(merged["moe_layers"]["moe"]["wi_up"][1, 3]), want, rtol=1e-6, atol=1e-6)
    attn = adapters["dense_layers"]["attn"]
    a, b = np.asarray(attn["o_proj_lora_a"][0]), np.asarray(attn["o_proj_lora_b"][0])  # [N, H, r], [r, D]
    want = np.asarray(params["dense_layers"]["attn"]["o_proj"][0]) + 3.0 * np.einsum("nhr,rd->nhd", a, b)
    np.testing.assert_allclose(np.asarray(merged["dense_layers"]["attn"]["o_proj"][0]), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(merged["moe_layers"]["moe"]["wo"]), np.asarray(params["moe_layers"]["moe"]["wo"]))


def test_rank_dropout_drops_whole_components_and_rescales(tiny):
    lc = lora.LoraConfig(rank=8, alpha=8.0, dropout=0.5, targets=("wi_gate",))
    adapters = _trained_like(lora.init_adapters(tiny[0], lc, jax.random.key(1)))
    a = adapters["moe_layers"]["moe"]["wi_gate_lora_a"]
    got = lora.prepare(adapters, lc, jax.random.key(5))["moe_layers"]["moe"]
    kept = np.asarray(got["wi_gate_lora_a"] != 0)  # [L, E, D, r]
    assert np.all(kept == kept[:, :, :1, :])  # a component is dropped for every input row
    assert 0.2 < kept.mean() < 0.8
    np.testing.assert_allclose(np.asarray(got["wi_gate_lora_b"]), 2.0 * np.asarray(adapters["moe_layers"]["moe"]["wi_gate_lora_b"]))
    np.testing.assert_array_equal(np.asarray(got["wi_gate_lora_a"])[kept], np.asarray(a)[kept])
    same = lora.prepare(adapters, lc)["moe_layers"]["moe"]  # no key: no dropout (evaluation, merge)
    np.testing.assert_array_equal(np.asarray(same["wi_gate_lora_a"]), np.asarray(a))


def test_adapters_follow_the_logical_sharding_rules(tiny):
    """On an fsdp x tensor x expert mesh each adapter is placed by its weight's logical names, the
    rank axis replicated: A of an expert projection splits experts over `expert` and `embed` over
    `fsdp`, B splits the expert width over `tensor`, and a sharded adapted forward equals one device."""
    config = llada_jax.get_config("tiny", moe_impl="dense")
    lc = _LC
    boxed = lora.abstract_adapters(abstract_params(config), lc)
    mesh = sharding.make_mesh(fsdp=2, tensor=2, expert=2)
    sh = sharding.param_shardings(boxed, mesh)
    P = jax.sharding.PartitionSpec
    moe = sh["moe_layers"]["moe"]
    assert moe["wi_gate_lora_a"].spec == P(None, "expert", "fsdp", None)
    assert moe["wi_gate_lora_b"].spec == P(None, "expert", None, "tensor")
    assert moe["wo_lora_b"].spec == P(None, "expert", None, "fsdp")
    assert sh["moe_layers"]["attn"]["q_proj_lora_b"].spec == P(None, None, "tensor", None)
    params, adapters = tiny
    adapters = _trained_like(adapters)
    tokens = jax.random.randint(jax.random.key(2), (8, 16), 0, config.vocab_size)
    want = _forward(lora.combine(params, lora.prepare(adapters, lc)), config, tokens)
    base_sh = sharding.param_shardings(abstract_params(config), mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        placed = jax.device_put(adapters, sh)
        assert not placed["moe_layers"]["moe"]["wi_gate_lora_a"].sharding.is_fully_replicated
        got = jax.jit(lambda p, ad: forward(lora.combine(p, lora.prepare(ad, lc)), config, tokens))(
            jax.device_put(params, base_sh), placed)
    assert_close_to_scale(got, want, 1e-5)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"lora.rank: expected an integer >= 0 \(0 = off\), found -1"):
        lora.LoraConfig(rank=-1)
    with pytest.raises(ValueError, match=r"lora.targets: expected names among .*found 'qkv'"):
        lora.LoraConfig.from_mapping({"rank": 4, "targets": "q_proj,qkv"})
    with pytest.raises(ValueError, match=r"lora.dropout: expected a probability in \[0, 1\), found 1.0"):
        lora.LoraConfig(rank=4, dropout=1.0)
    with pytest.raises(ValueError, match=r"config.lora: unknown field 'ranks'"):
        lora.LoraConfig.from_mapping({"ranks": 4})
    assert lora.LoraConfig.from_mapping({"rank": 4, "targets": "q_proj, wo"}).targets == ("q_proj", "wo")
    assert not lora.LoraConfig.from_mapping(None).enabled
