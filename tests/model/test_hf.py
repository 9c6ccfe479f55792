"""Hugging Face checkpoint I/O: exact round trips, the reference key set, clear errors."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from llada_jax import model
from llada_jax.model import hf
from llada_jax.parallel import sharding
from llada_jax.model.hf import CheckpointError, load_hf_checkpoint, save_hf_checkpoint


def _assert_trees_equal(a, b):
    fa, ta = jax.tree_util.tree_flatten(a)
    fb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(fa, fb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact_and_matches_reference_file(tiny_hf, fixture_dir, tmp_path):
    config, params = tiny_hf
    written = save_hf_checkpoint(tmp_path, config, params)
    assert written == ["model.safetensors", "config.json"]
    ref = load_file(os.path.join(fixture_dir, "model.safetensors"))
    ours = load_file(tmp_path / "model.safetensors")
    assert set(ours) == set(ref) == set(hf.hf_keys(config))
    for k in ref:  # our save inverts our load bit for bit, in the reference layout
        assert ours[k].shape == ref[k].shape, k
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
    config2, params2 = load_hf_checkpoint(tmp_path)
    assert config2 == config
    _assert_trees_equal(params2, params)


def test_sharded_save_writes_an_index_and_loads_back(tiny_hf, tmp_path):
    config, params = tiny_hf
    written = save_hf_checkpoint(tmp_path, config, params, max_shard_bytes=200_000)
    shards = [w for w in written if w.startswith("model-")]
    assert len(shards) > 2 and hf.INDEX_NAME in written
    with open(tmp_path / hf.INDEX_NAME) as f:
        index = json.load(f)
    assert set(index["weight_map"]) == set(hf.hf_keys(config))
    assert sorted(set(index["weight_map"].values())) == shards
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
    _, params2 = load_hf_checkpoint(tmp_path)
    _assert_trees_equal(params2, params)


def test_bf16_save_keeps_expert_bias_fp32(tiny_hf, tmp_path):
    config, params = tiny_hf
    save_hf_checkpoint(tmp_path, config, params, dtype="bfloat16")
    t = load_file(tmp_path / "model.safetensors")
    assert t["model.layers.1.mlp.gate.expert_bias"].dtype == np.float32
    assert t["model.layers.1.mlp.experts.0.gate_proj.weight"].dtype.name == "bfloat16"
    config2, params2 = load_hf_checkpoint(tmp_path, dtype="bfloat16")
    assert config2.param_dtype == "bfloat16" and config2.dtype == "bfloat16"  # the release computes in bf16
    assert params2["embed"].dtype.name == "bfloat16"
    assert params2["moe_layers"]["moe"]["router"].dtype == np.float32


def test_load_places_each_leaf_on_its_sharding(tiny_hf, fixture_dir):
    config, _ = tiny_hf
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    shardings = sharding.param_shardings(model.abstract_params(config), mesh)
    _, params = load_hf_checkpoint(fixture_dir, shardings=shardings)
    got = jax.tree_util.tree_map(lambda x: x.sharding, params)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: a == b, got, shardings))


def _copy_fixture(fixture_dir, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(fixture_dir, dst)
    for p in dst.iterdir():
        os.chmod(p, 0o644)
    return dst


def _rewrite(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor_is_named(fixture_dir, tmp_path):
    d = _copy_fixture(fixture_dir, tmp_path)
    _rewrite(d, lambda t: t.pop("model.layers.2.mlp.experts.7.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.2\.mlp\.experts\.7\.up_proj\.weight' "
                                              r"\(expected shape \(32, 64\)\)"):
        load_hf_checkpoint(d)


def test_unexpected_tensor_is_named(fixture_dir, tmp_path):
    d = _copy_fixture(fixture_dir, tmp_path)
    _rewrite(d, lambda t: t.update({"model.layers.0.extra.weight": np.zeros((3,), np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.extra\.weight'"):
        load_hf_checkpoint(d)


def test_extra_tensors_are_skipped_by_ignore_patterns(tiny_hf, fixture_dir, tmp_path):
    """An exporter's extra router bias on every MoE layer (names in the checkpoint's own style):
    the error names them and suggests the pattern; with it the load equals the clean one."""
    config, params = tiny_hf
    d = _copy_fixture(fixture_dir, tmp_path)
    extras = {f"model.layers.{i}.mlp.gate.bias": np.ones((16,), np.float32) for i in (1, 2)}
    _rewrite(d, lambda t: t.update(extras))
    with pytest.raises(CheckpointError) as err:
        load_hf_checkpoint(d)
    msg = str(err.value)
    assert "unexpected tensor 'model.layers.1.mlp.gate.bias' (shape (16,)); 2 unexpected in all" in msg, msg
    assert "ignore=('model.layers.*.mlp.gate.bias',)" in msg and "--ignore=model.layers.*.mlp.gate.bias" in msg, msg
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.2\.mlp\.gate\.bias'"):
        load_hf_checkpoint(d, ignore=("model.layers.1.*",))  # a pattern skips only what it matches
    config2, params2 = load_hf_checkpoint(d, ignore=("model.layers.*.mlp.gate.bias",))
    assert config2 == config
    _assert_trees_equal(params2, params)


def test_wrong_shape_names_key_expected_and_found(fixture_dir, tmp_path):
    d = _copy_fixture(fixture_dir, tmp_path)
    _rewrite(d, lambda t: t.update({"model.norm.weight": np.ones((63,), np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight: expected shape \(64,\), found \(63,\)"):
        load_hf_checkpoint(d)


def test_config_that_does_not_match_the_weights(fixture_dir, tmp_path):
    d = _copy_fixture(fixture_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.3\."):
        load_hf_checkpoint(d)


def test_corrupt_file_and_missing_pieces(fixture_dir, tmp_path):
    d = _copy_fixture(fixture_dir, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf_checkpoint(d)
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_hf_checkpoint(tmp_path / "nope")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf_checkpoint(d)


def test_index_listing_a_missing_shard(tiny_hf, tmp_path):
    config, params = tiny_hf
    written = save_hf_checkpoint(tmp_path, config, params, max_shard_bytes=200_000)
    (tmp_path / written[1]).unlink()
    with pytest.raises(CheckpointError, match=f"shard '{written[1]}' is listed but missing"):
        load_hf_checkpoint(tmp_path)
