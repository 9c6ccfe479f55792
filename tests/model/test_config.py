"""ModelConfig: presets with the published sizes (from shapes only), HF conversion, validation."""

import json

import jax
import numpy as np
import pytest

from llada_jax import model
from llada_jax.model.config import ConfigError, ModelConfig, get_config


def _count_abstract(config):
    """Parameters counted from `jax.eval_shape` (nothing allocated)."""
    leaves = jax.tree_util.tree_leaves(model.abstract_params(config))
    return sum(int(np.prod(getattr(x, "value", x).shape)) for x in leaves)


@pytest.mark.parametrize("name,total,active", [("mini", 16.26e9, 1.43e9), ("flash", 102.9e9, 6.15e9)])
def test_published_sizes(name, total, active):
    config = get_config(name)
    counts = config.param_counts()
    assert _count_abstract(config) == counts["total"]
    assert abs(counts["total"] - total) / total < 1e-3
    # The published active counts have three significant digits: ours must round to them.
    assert round(counts["active"] / 1e9, 2) == active / 1e9
    assert abs(counts["active"] - active) / active < 2.5e-3


def test_tiny_matches_fixture_config(fixture_dir):
    from_hf = ModelConfig.from_hf_config(fixture_dir)
    assert from_hf == get_config("tiny")


def test_hf_config_round_trip(fixture_dir):
    config = ModelConfig.from_hf_config(fixture_dir)
    assert ModelConfig.from_hf_config(config.to_hf_config()) == config
    with open(f"{fixture_dir}/config.json") as f:
        ref = json.load(f)
    ours = config.to_hf_config()
    for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts",
                "n_group", "topk_group", "moe_intermediate_size", "partial_rotary_factor", "rope_theta"):
        assert ours[key] == ref[key], key


def test_real_hf_config_without_special_ids_uses_ling_ids():
    hf = get_config("mini").to_hf_config()
    for k in ("mask_token_id", "eos_token_id", "pad_token_id"):
        hf.pop(k)
    config = ModelConfig.from_hf_config(hf)
    assert (config.mask_token_id, config.eos_token_id) == (156895, 156892)


@pytest.mark.parametrize("override,field", [
    (dict(num_heads=6, num_kv_heads=4), "num_heads"),
    (dict(num_experts=15), "n_group"),
    (dict(topk_group=5), "topk_group"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(partial_rotary_factor=0.3), "partial_rotary_factor"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(mask_token_id=512), "mask_token_id"),
    (dict(moe_impl="magic"), "moe_impl"),
    (dict(dtype="float8"), "dtype"),
    (dict(remat_policy="some"), "remat_policy"),
])
def test_validation_names_the_field(override, field):
    with pytest.raises(ConfigError, match=rf"ModelConfig\.{field}: expected .* found"):
        get_config("tiny", **override)


def test_hf_config_rejects_unsupported_features():
    hf = get_config("tiny").to_hf_config()
    with pytest.raises(ConfigError, match="score_function"):
        ModelConfig.from_hf_config({**hf, "score_function": "softmax"})
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        ModelConfig.from_hf_config({**hf, "tie_word_embeddings": True})
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        ModelConfig.from_hf_config({k: v for k, v in hf.items() if k != "num_hidden_layers"})
    with pytest.raises(ConfigError, match="preset"):
        get_config("huge")
