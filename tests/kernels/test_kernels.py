"""Attention kernels against the dense oracle, and mask descriptions against `masks`.

Every implementation is compared with `xla` (dense scores under the dense twin) in values and
gradients, fp32, on the masks the project uses: bidirectional, block causal, composite, the
composite with Multi-Block Editing links (window 3, clean sees noisy; window 2 over packed
documents) and packed documents (composite + segment ids), plus key padding. Shapes are tiny; splash runs in
interpret mode (T = 128, its smallest tile).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_close_to_scale
from llada_jax.model import masks
from llada_jax.kernels import AttentionMask, attention, blocked_tiles, resolve
from llada_jax.kernels.attention import TileSizes, blocked_flops_fraction, splash_attention

B, T, N, K, H = 2, 128, 4, 2, 16
BS = 16


def _docs():
    # two packed documents per row, boundaries mid-block, different per row; same ids in both halves
    d = np.stack([np.arange(T // 2) >= 20, np.arange(T // 2) >= 41]).astype(np.int32)
    return jnp.asarray(np.concatenate([d, d], axis=1))


def _masks():
    return {
        "bidirectional": AttentionMask.bidirectional(),
        "block_causal": AttentionMask.block_causal(BS),
        "composite": AttentionMask.composite(BS),
        "packed_documents": AttentionMask.composite(BS, segment_ids=_docs()),
        "composite_mbe": AttentionMask.composite(BS, window=3, clean_sees_noisy=True),
        "mbe_packed_documents": AttentionMask.composite(BS, segment_ids=_docs(), window=2, clean_sees_noisy=True),
        "bidirectional_documents": AttentionMask.bidirectional(segment_ids=_docs()),
    }


def _qkv(seed=0, t=T):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, t, N, H))
    k = jax.random.normal(ks[1], (B, t, K, H))
    v = jax.random.normal(ks[2], (B, t, K, H))
    w = jax.random.normal(ks[3], (B, t, N, H))  # a random cotangent
    return q, k, v, w


def _value_and_grads(impl, mask, rows=None, **kw):
    q, k, v, w = _qkv()

    def f(q, k, v):
        out = attention(q, k, v, mask, impl=impl, **kw)
        if rows is not None:
            out = jnp.where(rows[:, :, None, None], out, 0.0)
        return jnp.sum(out * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _assert_same(impl, mask, rows=None, **kw):
    want, want_g = _value_and_grads("xla", mask, rows)
    got, got_g = _value_and_grads(impl, mask, rows, **kw)
    assert_close_to_scale(got, want, rel=1e-5)
    for g, wg, name in zip(got_g, want_g, "qkv"):
        assert_close_to_scale(g, wg, rel=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("name,q_tile", [(name, 16) for name in _masks()]
                         + [("composite", 48), ("packed_documents", 48), ("composite_mbe", 48)])
def test_blocked_equals_dense(name, q_tile):
    _assert_same("blocked", _masks()[name], tiles=TileSizes(blocked_q=q_tile))


@pytest.mark.parametrize("name", ["block_causal", "packed_documents"])
def test_cudnn_path_equals_dense(name):
    # jax.nn.dot_product_attention (implementation="xla" on CPU; cuDNN on a GPU in bf16).
    _assert_same("cudnn", _masks()[name])


@pytest.mark.parametrize("name", ["bidirectional", "block_causal", "composite", "packed_documents",
                                  "mbe_packed_documents"])
def test_splash_interpret_equals_dense(name):
    _assert_same("splash", _masks()[name], interpret=True)


def test_splash_pads_lengths_that_are_not_whole_tiles():
    """T = 2 * 80 = 160: padded to 256 inside the kernel, padding rows invisible (values and grads)."""
    t = 160
    mask = AttentionMask.composite(BS, segment_ids=jnp.asarray(np.stack([np.arange(t) % 80 >= 30] * B), jnp.int32))
    q, k, v, w = _qkv(1, t)

    def run(impl):
        f = lambda q, k, v: jnp.sum(attention(q, k, v, mask, impl=impl, interpret=True) * w)  # noqa: E731
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)

    (want, want_g), (got, got_g) = run("xla"), run("splash")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, wg in zip(got_g, want_g):
        assert_close_to_scale(g, wg, rel=1e-5)


def test_splash_below_one_tile_runs_the_dense_oracle():
    """The documented rule: T < 128 (the model's 8-token init trace, toy shapes) runs xla."""
    q, k, v, _ = _qkv()
    mask = AttentionMask.composite(BS)
    got = attention(q[:, :96], k[:, :96], v[:, :96], mask, impl="splash")
    np.testing.assert_array_equal(got, attention(q[:, :96], k[:, :96], v[:, :96], mask, impl="xla"))


def test_splash_under_a_mesh_runs_in_shard_map():
    """Under `jax.set_mesh` (4 fake CPU devices: batch over fsdp, heads over tensor) splash runs
    inside shard_map; a Pallas kernel outside one cannot be partitioned (the AOT failure)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from llada_jax.parallel import sharding

    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=2, expert=1, devices=jax.devices()[:4])
    mask = _masks()["packed_documents"]
    q, k, v, w = _qkv()
    want, want_g = _value_and_grads("xla", mask)
    with jax.set_mesh(mesh):
        spec = NamedSharding(mesh, P("fsdp", None, "tensor", None))
        q, k, v, w = (jax.device_put(a, spec) for a in (q, k, v, w))
        f = lambda q, k, v: jnp.sum(attention(q, k, v, mask, impl="splash", interpret=True) * w)  # noqa: E731
        fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
        assert "shard_map" in str(jax.make_jaxpr(f)(q, k, v))
        _, got_g = fn(q, k, v)
        got = jax.jit(lambda q, k, v: attention(q, k, v, mask, impl="splash", interpret=True))(q, k, v)
    assert_close_to_scale(got, want, rel=1e-5)
    for g, wg, name in zip(got_g, want_g, "qkv"):
        assert_close_to_scale(g, wg, rel=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("impl", ["blocked", "splash", "cudnn"])
def test_key_padding_equals_dense_on_real_rows(impl):
    valid = jnp.asarray(np.stack([np.arange(T) < 100, np.arange(T) < T]))  # row 0 padded at the end
    mask = AttentionMask.block_causal(BS, key_valid=valid)
    _assert_same(impl, mask, rows=valid, interpret=True) if impl == "splash" else _assert_same(impl, mask, rows=valid)


def test_dense_twins_are_the_mask_builders():
    np.testing.assert_array_equal(AttentionMask.block_causal(BS).dense(T)[0], masks.block_causal(T, BS))
    np.testing.assert_array_equal(AttentionMask.composite(BS).dense(T)[0], masks.composite(T // 2, BS)[0])
    np.testing.assert_array_equal(AttentionMask.bidirectional().dense(T)[0], masks.bidirectional(T))
    docs = _docs()
    np.testing.assert_array_equal(AttentionMask.composite(BS, segment_ids=docs).dense(T),
                                  masks.composite(T // 2, BS)[0][None] & masks.document(docs))
    for window in (1, 2, 3, 5):  # 5 > the 4 blocks of L = 64
        for clean in (False, True):
            np.testing.assert_array_equal(
                AttentionMask.composite(BS, window=window, clean_sees_noisy=clean).dense(T)[0],
                masks.composite_mbe(T // 2, BS, window, clean)[0], err_msg=f"window={window} clean={clean}")
    # a last block shorter than the others (L = 60, blocks of 16)
    np.testing.assert_array_equal(AttentionMask.composite(BS, window=2, clean_sees_noisy=True).dense(120)[0],
                                  masks.composite_mbe(60, BS, 2)[0])
    # window 1 is the plain composite mask; a wider window only adds links
    np.testing.assert_array_equal(masks.composite_mbe(T // 2, BS, 1)[0], masks.composite(T // 2, BS)[0])
    assert (masks.composite_mbe(T // 2, BS, 3)[0] >= masks.composite(T // 2, BS)[0]).all()


def test_blocked_tiles_cover_exactly_the_allowed_entries():
    for kind, length, links in (("composite", 2 * 512, (1, False)), ("block_causal", 512, (1, False)),
                                ("composite", 2 * 512, (3, True))):
        structure = AttentionMask(kind, 32, window=links[0], clean_sees_noisy=links[1]).structure(length)
        seen = np.zeros_like(structure)
        for tile in blocked_tiles(kind, 32, length, 128, *links):
            cols = np.concatenate([np.arange(a, b) for a, b in tile.key_runs])
            assert not seen[tile.q_start:tile.q_end][:, cols].any()
            seen[tile.q_start:tile.q_end][:, cols] = tile.local
        np.testing.assert_array_equal(seen, structure)
    # The point of the kernel: the composite mask at L = 2048, block 32, is ~1/4 of dense.
    assert blocked_flops_fraction("composite", 32, 4096, 256) < 1 / 3


def test_bad_descriptions_name_the_field():
    q, k, v, _ = _qkv()
    with pytest.raises(ValueError, match="attention_impl"):
        attention(q, k, v, AttentionMask.bidirectional(), impl="flash")
    with pytest.raises(ValueError, match="block_size"):
        AttentionMask.composite(0)
    with pytest.raises(ValueError, match="AttentionMask.window"):
        AttentionMask.composite(BS, window=0)
    with pytest.raises(ValueError, match="segment_ids"):
        attention(q, k, v, AttentionMask.composite(BS, segment_ids=jnp.zeros((B, T - 1), jnp.int32)))
    with pytest.raises(ValueError, match=">= 128"):
        splash_attention(q[:, :96], k[:, :96], v[:, :96], AttentionMask.block_causal(BS), interpret=True)
    # An explicit boolean mask has no structure to exploit: every impl runs the dense oracle.
    assert resolve("blocked", AttentionMask.from_dense(jnp.ones((1, T, T), bool)), T) == "xla"
