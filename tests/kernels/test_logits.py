"""The sliced, chunked lm_head + log-probability against the full logits (values and gradients).

The oracle is the old obvious path: one full forward over `[x_t ; x_0]` under the dense composite
mask, `[N, 2L, V]` logits, keep the first L, `log_softmax`, gather; the loss is assembled from
the same pieces (`m2t_loss`, `t2t_loss`, `cap_loss` over the full distribution, MTF on the
argmax draft). The model is the official tiny fixture.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_close_to_scale
from llada_jax import model, rl
from llada_jax.model import masks
from llada_jax.train import objectives
from llada_jax.model.config import get_config
from llada_jax.kernels.logits import chunked_output_stats, rms_norm
from llada_jax.train.objectives import ObjectiveConfig


def assert_grads_close(got, want, tol=1e-5):
    """Leaf by leaf, within `tol` of the leaf's largest entry (fp32 sums in another order)."""
    jax.tree.map(lambda a, b: assert_close_to_scale(a, b, rel=tol), got, want)

MC = get_config("tiny", logits_chunk=12)  # 12 does not divide L = 32: the padded last chunk is exercised
L, PROMPT, BS = 32, 8, 8


@pytest.fixture(scope="module")
def params(tiny_hf):
    return tiny_hf[1]


def _full_logits(params, mc, x_t, x_0, block_size):
    mask, positions = masks.composite(x_t.shape[1], block_size)
    logits = model.forward(params, mc, jnp.concatenate([x_t, x_0], axis=1), positions, mask)
    return logits[:, :x_t.shape[1]]


def test_chunked_stats_equal_full():
    ks = jax.random.split(jax.random.key(0), 4)
    n, length, d, v = 3, 20, 16, 50
    h = jax.random.normal(ks[0], (n, length, d))
    scale = 1.0 + 0.1 * jax.random.normal(ks[1], (d,))
    head = jax.random.normal(ks[2], (d, v)) / 4
    t = jax.random.randint(ks[3], (n, length), 0, v)

    def full(h, scale, head):
        logits = rms_norm(h, scale, 1e-6, jnp.float32) @ head
        logp_all = jax.nn.log_softmax(logits, -1)
        logp = jnp.take_along_axis(logp_all, t[..., None], -1)[..., 0]
        ent = -jnp.sum(jnp.exp(logp_all) * logp_all, -1)
        return logp, ent, jnp.argmax(logits, -1), jnp.argmax(logits.at[..., 7].set(-jnp.inf), -1)

    def chunked(h, scale, head):
        s = chunked_output_stats(h, scale, head, t, eps=1e-6, dtype=jnp.float32, chunk=8, entropy=True,
                                 exclude_id=7)
        return s["logp"], s["entropy"], s["argmax"], s["draft"]

    want, got = full(h, scale, head), chunked(h, scale, head)
    for a, b in zip(got, want):
        assert_close_to_scale(a, b, rel=1e-5)

    def scalar(fn):
        return lambda *a: jnp.sum(fn(*a)[0] * jnp.cos(t)) + jnp.sum(fn(*a)[1] * jnp.sin(t))

    # RL's sampling distribution: temperature, the mask id out of the normaliser.
    sampled = chunked_output_stats(h, scale, head, t, eps=1e-6, dtype=jnp.float32, chunk=8, temperature=0.7,
                                   normaliser_exclude_id=7)["logp"]
    logits = rms_norm(h, scale, 1e-6, jnp.float32) @ head
    assert_close_to_scale(sampled, rl.sampling_logprobs(logits, t, temperature=0.7, exclude_id=7), rel=1e-5)

    g_want = jax.grad(scalar(full), argnums=(0, 1, 2))(h, scale, head)
    g_got = jax.grad(scalar(chunked), argnums=(0, 1, 2))(h, scale, head)
    for a, b in zip(g_got, g_want):
        assert_close_to_scale(a, b, rel=1e-5)


def test_per_token_logprobs_equal_full_logits(params):
    x_0 = jax.random.randint(jax.random.key(1), (2, L), 0, MC.vocab_size - 2)
    x_t = jnp.where(jax.random.bernoulli(jax.random.key(2), 0.5, (2, L)), MC.mask_token_id, x_0)
    w = jax.random.normal(jax.random.key(3), (2, L))

    def chunked(p):
        return objectives.per_token_logprobs(p, MC, x_t, x_0, BS)

    def full(p):
        return objectives.token_logprobs(_full_logits(p, MC, x_t, x_0, BS), x_0)

    (v1, g1) = jax.jit(jax.value_and_grad(lambda p: jnp.sum(chunked(p) * w)))(params)
    (v2, g2) = jax.jit(jax.value_and_grad(lambda p: jnp.sum(full(p) * w)))(params)
    assert_close_to_scale(jax.jit(chunked)(params), jax.jit(full)(params), rel=1e-5)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    assert_grads_close(g1, g2)


def _oracle_loss(params, mc, oc, batch, rng):
    """`loss_fn` the obvious way, from full `[N, L, V]` logits."""
    nb = objectives.noise(batch, rng, oc)
    logits = _full_logits(params, mc, nb.x_t, nb.x_0, oc.block_size)
    logp_all = jax.nn.log_softmax(logits, -1)
    logp = jnp.take_along_axis(logp_all, nb.x_0[..., None], -1)[..., 0]
    total = objectives.m2t_loss(logp, nb.masked, nb.t, nb.loss_mask, oc.weighting)
    total += oc.lambda_t2t * objectives.t2t_loss(logp, nb.edited, nb.kept, oc.keep_weight)
    draft = jax.lax.stop_gradient(jnp.argmax(logits.at[..., oc.mask_token_id].set(-jnp.inf), -1))
    x_draft = jnp.where(nb.masked, draft, nb.x_t)
    wrong = nb.masked & (draft != nb.x_0)
    logp2 = objectives.token_logprobs(_full_logits(params, mc, x_draft, nb.x_0, oc.block_size), nb.x_0)
    total += oc.lambda_mtf * jnp.sum(jnp.where(wrong, -logp2, 0.0)) / jnp.maximum(jnp.sum(wrong), 1)
    return total + oc.cap_beta * objectives.cap_loss(logp_all, nb.x_0, nb.masked)


def test_loss_fn_equals_full_logits_oracle(params):
    # The fast path end to end (blocked attention, sliced hidden states, chunked head) against the
    # dense-mask full-logits oracle.
    mc = MC.replace(attention_impl="blocked")
    oc = ObjectiveConfig.for_model(mc, block_size=BS, p_edit=0.2, mtf=True, cap=True, cap_beta=0.5,
                                   complementary=False)
    tokens = jax.random.randint(jax.random.key(4), (2, L), 0, MC.vocab_size - 2)
    batch = {"tokens": tokens, "loss_mask": jnp.broadcast_to(jnp.arange(L) >= PROMPT, (2, L))}
    rng = jax.random.key(5)
    # Targets the random model already gets right at some masked positions, so that CAP is live:
    # the masked set does not depend on token values, so set masked targets to the predictions.
    for _ in range(2):
        nb = objectives.noise(batch, rng, oc)
        pred = jnp.argmax(jax.jit(_full_logits, static_argnums=(1, 4))(params, MC, nb.x_t, nb.x_0, BS), -1)
        batch["tokens"] = jnp.where(nb.masked, pred, batch["tokens"])
    (got, metrics), g_got = jax.jit(jax.value_and_grad(
        lambda p: objectives.loss_fn(p, mc, oc, batch, rng), has_aux=True))(params)
    want, g_want = jax.jit(jax.value_and_grad(lambda p: _oracle_loss(p, MC, oc, batch, rng)))(params)
    assert metrics["cap_loss"] > 0 and metrics["num_draft_wrong"] > 0  # every term is live
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert_grads_close(g_got, g_want)
