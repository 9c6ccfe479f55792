"""Which attention kernel and MoE back end a mesh gets (llada_jax/model/backends.py): the rule
platform x expert axis -> impls, explicit values winning, CPU meshes (8 fake CPU devices) picking
`blocked`, and the quickstart keeping the path its README results were made with. The TPU side
compiled for a real topology is in tests/test_aot.py."""

import jax
import numpy as np
import pytest

from helpers import load_config
from llada_jax import model, train
from llada_jax.model import backends
from llada_jax.model.config import ConfigError, get_config
from llada_jax.parallel import sharding


@pytest.mark.parametrize("platform, expert, attention, moe", [
    ("tpu", 1, "splash", "ragged"),
    ("tpu", 8, "splash", "expert_parallel"),
    ("gpu", 1, "cudnn", "tiled"),
    ("gpu", 8, "cudnn", "tiled"),
    ("cuda", 2, "cudnn", "tiled"),
    ("rocm", 1, "cudnn", "tiled"),
    ("cpu", 1, "blocked", "dense"),
    ("cpu", 4, "blocked", "dense"),
])
def test_rule_platform_and_expert_axis(platform, expert, attention, moe):
    assert backends.choose(platform, expert) == (attention, moe)
    config = get_config("tiny", attention_impl="auto", moe_impl="auto")
    got = backends.resolve(config, platform=platform)
    assert (got.attention_impl, got.moe_impl) == (attention, "ragged" if moe == "expert_parallel" else moe)


@pytest.mark.parametrize("bad, field", [(("npu", 1), "platform"), (("tpu", 0), "expert_axis")])
def test_rule_rejects_unknown_platform_and_bad_axis(bad, field):
    with pytest.raises(ValueError, match=field) as e:
        backends.choose(*bad)
    assert repr(bad[0] if field == "platform" else bad[1]) in str(e.value)


def test_explicit_values_win():
    mesh = sharding.make_mesh(data=2, expert=4)
    for attn, moe in (("xla", "auto"), ("auto", "ragged"), ("splash", "dense")):
        got = backends.resolve(get_config("tiny", attention_impl=attn, moe_impl=moe), mesh, platform="tpu")
        assert got.attention_impl == (attn if attn != "auto" else "splash")
        assert got.moe_impl == (moe if moe != "auto" else "expert_parallel")
    assert backends.resolve(get_config("tiny"), mesh) == get_config("tiny")  # nothing "auto": unchanged


def test_cpu_mesh_resolves_to_blocked():
    mesh = sharding.make_mesh(data=2, fsdp=2, expert=2)
    assert backends.mesh_platform(mesh) == "cpu" and backends.expert_axis_size(mesh) == 2
    cfg = load_config("sft.py", "size=mini", **{"model.preset": "tiny"})
    got = backends.resolve(train.build_model_config(cfg), mesh)
    assert (got.attention_impl, got.moe_impl) == ("blocked", "dense")
    with jax.set_mesh(mesh):  # what a trace sees: the abstract mesh in context
        assert backends.mesh_platform() == "cpu" and backends.expert_axis_size() == 2


def test_quickstart_keeps_its_backends():
    """The quickstart's results stay bit-identical: its config pins the dense attention oracle and
    the MoE back end it was measured with (the four sums: `tiled`; its other tasks: `dense`),
    which "auto" would not pick on a CPU."""
    for arg, moe in ((None, "tiled"), ("task=sudoku4x4", "dense")):
        cfg = load_config("quickstart.py", arg)
        got = backends.resolve(train.build_model_config(cfg), train.mesh_from_config(cfg))
        assert (got.attention_impl, got.moe_impl) == ("xla", moe), arg


def test_auto_moe_at_trace_time_equals_the_resolved_back_end():
    """A config that reaches the model still "auto" (no `resolve` called) runs what resolve picks."""
    config = get_config("tiny", moe_impl="auto", attention_impl="auto")
    params = model.init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, config.vocab_size)
    auto = model.forward(params, config, tokens)
    resolved = model.forward(params, backends.resolve(config), tokens)
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(resolved))


def test_model_config_names_a_bad_back_end():
    with pytest.raises(ConfigError, match="moe_impl") as e:
        get_config("tiny", moe_impl="grouped")
    assert "'grouped'" in str(e.value) and "tiled" in str(e.value)
    with pytest.raises(ConfigError, match="moe_tile"):
        get_config("tiny", moe_tile=0)
