"""Multi-Block Editing SFT (REFERENCE §5): the composite mask's cross-block links carry exactly the
information they should into the training forward, and training with them lowers the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llada_jax import model
from llada_jax.model.config import get_config
from llada_jax.train import objectives

L, BS = 32, 8


def test_mbe_links_carry_the_later_noisy_blocks():
    """Perturbing the noisy copy of block 2 changes block 1's predictions only with MBE links (and
    block 0's through block 1: a sliding window reaches further with depth); a later block only
    through a clean block that sees noisy ones (`clean_sees_noisy`), never through a noisy link."""
    mc = get_config("tiny")
    params = model.init_params(mc, jax.random.key(0))
    rng = np.random.default_rng(0)
    x_0 = jnp.asarray(rng.integers(10, 200, (1, L)), jnp.int32)
    x_t = jnp.where(jnp.asarray(rng.random((1, L)) < 0.5), mc.mask_token_id, x_0)

    def blocks_moved(links, perturbed_block):
        f = jax.jit(lambda xt: objectives.per_token_logprobs(params, mc, xt, x_0, BS, mask_links=links))
        x_p = x_t.at[0, perturbed_block * BS:(perturbed_block + 1) * BS].set(7)
        moved = np.abs(np.asarray(f(x_p) - f(x_t)))[0].reshape(-1, BS).max(-1) > 1e-6
        return {b for b in range(L // BS) if moved[b] and b != perturbed_block}

    assert blocks_moved(None, 2) == set()  # the plain composite: a noisy block sees only itself
    assert blocks_moved(dict(window=2, clean_sees_noisy=False), 2) == {0, 1}
    assert blocks_moved(dict(window=2, clean_sees_noisy=True), 2) == {0, 1, 3}  # 3 via clean block 1


def test_mbe_training_loss_goes_down():
    """SFT steps with a window of 2 on a copy task (an answer block, then two copies of it) lower
    the loss."""
    mc = get_config("tiny")
    obj = objectives.ObjectiveConfig.for_model(mc, block_size=BS, p_edit=0.0, mbe_window=2)
    params = model.init_params(mc, jax.random.key(0))
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch, key):
        (loss, _), g = jax.value_and_grad(objectives.loss_fn, has_aux=True)(params, mc, obj, batch, key)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    losses = []
    for i in range(20):
        rng = np.random.default_rng(i)
        letters = rng.integers(10, 26, (8, BS))
        tokens = np.concatenate([rng.integers(10, 200, (8, BS)), letters, letters, letters], axis=1)
        batch = {"tokens": tokens.astype(np.int32), "loss_mask": np.tile(np.arange(L) >= BS, (8, 1))}
        params, opt, loss = step(params, opt, batch, jax.random.key(i))
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:3]), losses
