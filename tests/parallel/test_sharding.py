"""Sharded == unsharded on 8 fake CPU devices, and nothing large left replicated."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import assert_close_to_scale
from llada_jax import model
from llada_jax.model import masks
from llada_jax.parallel import sharding
from llada_jax.model.config import get_config

MESHES = {
    "data": dict(data=8),
    "fsdp_x_tensor": dict(fsdp=4, tensor=2),
    "data_fsdp_tensor": dict(data=2, fsdp=2, tensor=2),
    "expert_parallel": dict(data=2, expert=4),
}


def test_eight_fake_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("name", sorted(MESHES))
def test_sharded_forward_equals_single_device(tiny_hf, name):
    config, params = tiny_hf
    tokens = jax.random.randint(jax.random.key(0), (8, 32), 0, 510)
    mask = masks.block_causal(32, 8)
    ref = model.forward(params, config, tokens, mask=mask)
    mesh = sharding.make_mesh(**MESHES[name])
    shardings = sharding.param_shardings(model.abstract_params(config), mesh)
    sharded = jax.device_put(params, shardings)
    batch = jax.device_put(tokens, sharding.logical_sharding(("act_batch", "act_length"), tokens.shape, mesh))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        out = jax.jit(lambda p, t: model.forward(p, config, t, mask=mask))(sharded, batch)
    assert_close_to_scale(out, ref, rel=1e-4)
    if name != "data":  # pure data parallelism replicates parameters by definition
        assert sharding.replicated_bytes(sharded, min_bytes=4096) == {}


def test_init_sharded_places_experts_on_the_expert_axis():
    config = get_config("tiny")
    mesh = sharding.make_mesh(data=2, expert=4)
    params, shardings = model.init_sharded(config, mesh, jax.random.key(0))
    wi = params["moe_layers"]["moe"]["wi_gate"]  # [layers, E, D, F]
    assert wi.sharding.spec == P(None, "expert", None, None)
    assert wi.addressable_shards[0].data.shape == (2, 4, 64, 32)
    # Same values as the unsharded init with the same key.
    ref = model.init_params(config, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(wi), np.asarray(ref["moe_layers"]["moe"]["wi_gate"]))
    assert sharding.replicated_bytes(params, min_bytes=4096) == {}


def test_rules_skip_axes_that_do_not_divide_or_repeat():
    spec = sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16),
                                    {"data": 1, "fsdp": 2, "tensor": 4, "expert": 1})
    assert spec == P("fsdp", None, None)  # 2 kv heads cannot split 4 ways
    spec = sharding.logical_to_spec(("exp", "embed", "expert_mlp"), (16, 64, 32),
                                    {"data": 1, "fsdp": 2, "tensor": 1, "expert": 4})
    assert spec == P("expert", "fsdp", None)  # embed may not reuse the expert axis
    with pytest.raises(KeyError, match="no rule for logical axis 'bogus'"):
        sharding.logical_to_spec(("bogus",), (4,), {"data": 1})


def test_make_mesh_validates():
    with pytest.raises(ValueError, match="need 16 devices, found 8"):
        sharding.make_mesh(data=4, tensor=4)
    with pytest.raises(ValueError, match=r"mesh\.tensor: expected a positive integer"):
        sharding.make_mesh(tensor=0)
    assert dict(sharding.make_mesh(tensor=2).shape) == {"data": 4, "fsdp": 1, "tensor": 2, "expert": 1}
