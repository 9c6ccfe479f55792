"""`rl.make_rl_step` accumulated over micro-batches and `rl.run_updates` over mini-batches: the
accumulated update is the unaccumulated one, and every mini-batch update is clipped against the
rollout policy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import assert_close_to_scale
from llada_jax import model, rl
from llada_jax.model.config import get_config
from llada_jax.train import TrainState

MC = get_config("tiny")
L, BS, PROMPT, B = 32, 8, 5, 8
LIK = rl.LikelihoodConfig(block_size=BS, num_timesteps=2)
CONFIGS = {
    # block-level ratios with a k3 KL to a reference and one dropped sample: every weight of the objective
    "ebpo": rl.EBPOConfig(likelihood=LIK, ratio_level="block", beta=0.1, kl_estimator="k3"),
    "espo_replay": rl.ESPOConfig(likelihood=rl.LikelihoodConfig(block_size=BS, num_timesteps=2, coupled=True),
                                 beta=0.05, grad_mode="replay"),
    "dipo": rl.DiPOConfig(block_size=4, num_steps=3, beta=0.1),
}


@pytest.fixture(scope="module")
def params():
    return jax.jit(model.init_params, static_argnums=0)(MC, jax.random.key(0))


def _perturb(params, key, scale=0.01):
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    return unravel(flat + scale * jax.random.normal(key, flat.shape))


def make_batch(name, params):
    """B rollouts with advantages of both signs, sample 3 dropped, and θ_old's / the reference's
    terms from perturbed params (so that ratios differ from 1 and some are clipped)."""
    cfg = CONFIGS[name]
    if name == "dipo":
        tokens = np.array([[20, 21, 30, 31, 40, 44, 42, 43]])
        steps, written = np.full((1, 8, 3), -1), np.zeros((1, 8, 3), np.int64)
        for pos, writes in {2: [(0, 30)], 3: [(1, 31)], 4: [(2, 40)], 5: [(2, 41), (4, 44)], 6: [(3, 42)],
                            7: [(4, 43)]}.items():
            for i, (st, tok) in enumerate(writes):
                steps[0, pos, i], written[0, pos, i] = st, tok
        batch = {"tokens": np.repeat(tokens, B, 0), "completion_mask": np.repeat(np.arange(8)[None] >= 2, B, 0),
                 "write_step": np.repeat(steps, B, 0), "write_token": np.repeat(written, B, 0)}
        batch["write_step"][1::2, 7] = -1  # rows differ in their scored writes (DiPO's count)
    else:
        tokens = jax.random.randint(jax.random.key(2), (B, L), 0, MC.vocab_size - 2)
        completion = np.broadcast_to(np.arange(L) >= PROMPT, (B, L)).copy()
        completion[::3, L - 6:] = False  # unequal completion lengths
        batch = {"tokens": np.asarray(tokens), "completion_mask": completion}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    batch["advantages"] = jnp.linspace(-1.0, 1.5, B)
    batch["sample_mask"] = jnp.arange(B) != 3
    batch["example_ids"] = jnp.arange(B, dtype=jnp.int32) + 16  # global row ids, as the loop passes
    key = jax.random.key(7)
    terms = jax.jit(rl.policy_terms, static_argnames=("model_config", "config"))
    batch["old_terms"] = terms(_perturb(params, jax.random.key(1)), batch, key, model_config=MC, config=cfg)
    batch["ref_terms"] = terms(_perturb(params, jax.random.key(2)), batch, key, model_config=MC, config=cfg)
    return batch, key


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_accumulation_over_4_micro_batches_is_the_same_update(params, name):
    """One update over B = 8 rollouts, unaccumulated and accumulated over 4 micro-batches of 2:
    the same parameters after the update (SGD: the update is the gradient), the same metrics and
    the same returned terms, up to fp32 rounding, both on the first (on-policy) update and a
    later one against given θ_old terms."""
    cfg = CONFIGS[name]
    batch, key = make_batch(name, params)
    tx = optax.sgd(1.0)  # linear in the gradient, so params compare the gradients at full scale
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))
    outs = {}
    for accum in (1, 4):
        step = jax.jit(rl.make_rl_step(MC, cfg, tx, accum_steps=accum))
        outs[accum] = [jax.device_get(step(state, batch, key, np.bool_(on_policy))) for on_policy in (True, False)]
    assert float(outs[1][1][1]["ratio_max"]) > float(outs[1][1][1]["ratio_min"])  # off-policy ratios vary
    for (s1, m1, t1), (s4, m4, t4) in zip(outs[1], outs[4]):
        assert set(m1) == set(m4)
        for k in m1:
            assert_close_to_scale(m4[k], m1[k], 1e-6, err_msg=k)
        assert_close_to_scale(t4, t1, 1e-6, err_msg="terms")
        flat1, flat4 = (jax.flatten_util.ravel_pytree(s.params)[0] for s in (s1, s4))
        flat0 = jax.flatten_util.ravel_pytree(params)[0]
        assert float(jnp.abs(flat1 - flat0).max()) > 1e-4  # the update moved the params
        assert_close_to_scale(flat4 - flat0, flat1 - flat0, 1e-6, err_msg="the update")


def test_accumulation_needs_a_divisor_of_the_batch(params):
    batch, key = make_batch("ebpo", params)
    tx = optax.sgd(1.0)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))
    with pytest.raises(ValueError, match=r"optim.accum_steps: expected a divisor of the update's 8 rollouts, found 3"):
        rl.make_rl_step(MC, CONFIGS["ebpo"], tx, accum_steps=3)(state, batch, key, True)
    with pytest.raises(ValueError, match=r"optim.accum_steps: expected an integer >= 1, found 0"):
        rl.make_rl_step(MC, CONFIGS["ebpo"], tx, accum_steps=0)
