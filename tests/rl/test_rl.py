"""RL likelihoods and losses (REFERENCE §6) against slow oracles, hand computations and a toy reward.

The model is the tiny preset with random weights; a second, perturbed copy plays θ_old where a
ratio away from one is needed.
"""

import dataclasses

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llada_jax import decode, model, rl
from llada_jax.model import masks
from llada_jax.train import objectives
from llada_jax.model.config import ConfigError, get_config
from llada_jax.train import TrainState

MC = get_config("tiny")
L, BS, PROMPT = 32, 8, 5  # 4 blocks; block 0 holds the end of the prompt and the start of the completion
STATIC = ("model_config", "config")
# Compiling the tiny model dominates this file's time, so tests share shapes, configs and jitted
# functions: every model-based test below uses batches of [4, 32] and one of these configs.
LIK = rl.LikelihoodConfig(block_size=BS, num_timesteps=4)
EBPO = rl.EBPOConfig(likelihood=LIK)
EBPO_BLOCK = rl.EBPOConfig(likelihood=LIK, ratio_level="block", beta=0.1, kl_estimator="k3", eps_low=0.02,
                           eps_high=0.02)
_fwd = jax.jit(model.forward, static_argnums=1)
_terms = jax.jit(rl.policy_terms, static_argnames=STATIC)
_loss_and_grad = jax.jit(rl.loss_and_grad, static_argnames=STATIC)
_noise = jax.jit(rl.sample_noise, static_argnames="config")


@pytest.fixture(scope="module")
def params():
    return jax.jit(model.init_params, static_argnums=0)(MC, jax.random.key(0))


@jax.jit
def _perturb(params, key):
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    return unravel(flat + 0.01 * jax.random.normal(key, flat.shape))


@pytest.fixture(scope="module")
def params_old(params):
    return _perturb(params, jax.random.key(1))


def make_batch(b=4, length=L, prompt=PROMPT, seed=2):
    tokens = jax.random.randint(jax.random.key(seed), (b, length), 0, MC.vocab_size - 2)
    completion = jnp.broadcast_to(jnp.arange(length) >= prompt, (b, length))
    adv = jnp.linspace(-1.0, 1.5, b)  # mean != 0, both signs
    return {"tokens": tokens, "completion_mask": completion, "advantages": adv}


def oracle_terms(params, tokens, noise, block_size):
    """One forward per (timestep, block) over [clean blocks < k, noisy block k] under the
    block-causal inference mask; the keys past block k are padding that no query attends."""
    tokens, masked, t = (np.asarray(a) for a in (tokens, noise.masked, noise.t))
    b, n, length = masked.shape
    out = np.zeros(t.shape)
    for i in range(n):
        x_t = np.where(masked[:, i], MC.mask_token_id, tokens)
        for k, start in enumerate(range(0, length, block_size)):
            end = start + block_size
            inp = np.concatenate([tokens[:, :start], x_t[:, start:end], np.zeros((b, length - end), tokens.dtype)], 1)
            mask = masks.block_causal(length, block_size) & (jnp.arange(length) < end)[None, :]
            logits = _fwd(params, MC, jnp.asarray(inp), jnp.arange(length), mask)[:, start:end]
            logits = logits.at[..., MC.mask_token_id].set(-jnp.inf)  # the decoder never samples it
            logp = jax.nn.log_softmax(logits, -1)
            logp = np.take_along_axis(np.asarray(logp), tokens[:, start:end, None], -1)[..., 0]
            out[:, i, k] = np.where(masked[:, i, start:end], logp, 0).sum(-1) / t[:, i, k]
    return out


# ------------------------------------------------------------------------- likelihood
def test_vectorized_terms_match_per_block_oracle(params):
    batch, key = make_batch(), jax.random.key(3)
    fast = _terms(params, batch, key, model_config=MC, config=EBPO)
    slow = oracle_terms(params, batch["tokens"], _noise(key, batch["completion_mask"], config=LIK), BS)
    assert fast.shape == (4, 4, L // BS) and np.mean(slow[:, :, 1:] < 0) > 0.8  # most completion blocks scored
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)
    scan = rl.EBPOConfig(likelihood=dataclasses.replace(LIK, vectorize="scan"))
    np.testing.assert_allclose(_terms(params, batch, key, model_config=MC, config=scan), fast, rtol=1e-5, atol=1e-5)


def test_noise_is_stratified_per_block_and_coupled_masks_are_complements():
    b, n = 64, 4
    completion = jnp.broadcast_to(jnp.arange(L) >= PROMPT, (b, L))
    noise = _noise(jax.random.key(4), completion, config=rl.LikelihoodConfig(block_size=BS, num_timesteps=n))
    t, masked = np.asarray(noise.t), np.asarray(noise.masked)
    lo = 1e-3 + (1 - 1e-3) * np.arange(n)[None, :, None] / n
    assert np.all((t >= lo) & (t < lo + (1 - 1e-3) / n))  # row n of every block in stratum n
    assert not masked[..., :PROMPT].any()  # the prompt is never masked
    assert len(np.unique(t[:, 0, :])) == b * (L // BS)  # drawn per sample and block
    rate = masked[..., PROMPT:].mean(axis=(0, 2))
    np.testing.assert_allclose(rate, (np.arange(n) + 0.5) / n, atol=0.05)  # each row masks at its stratum

    coupled = _noise(jax.random.key(4), completion, config=rl.LikelihoodConfig(block_size=BS, num_timesteps=n,
                                                                               coupled=True))
    m, tc = np.asarray(coupled.masked), np.asarray(coupled.t)
    np.testing.assert_array_equal(m[:, :2] ^ m[:, 2:], np.broadcast_to(np.asarray(completion)[:, None], m[:, :2].shape))
    assert not np.any(m[:, :2] & m[:, 2:])
    np.testing.assert_allclose(tc[:, 2:], 1 - tc[:, :2], rtol=1e-6)


def test_common_random_numbers(params):
    batch = make_batch()
    a = _terms(params, batch, jax.random.key(5), model_config=MC, config=EBPO)
    b = _terms(params, dict(batch), jax.random.key(5), model_config=MC, config=EBPO)
    c = _terms(params, batch, jax.random.key(6), model_config=MC, config=EBPO)
    np.testing.assert_array_equal(a, b)  # same key, same params: bitwise the same terms
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3  # the key really drives the masks
    # Per-example noise: reordering rows with their example ids reorders the terms.
    perm = np.array([2, 0, 3, 1])
    shuffled = {k: jnp.asarray(v)[perm] for k, v in batch.items()} | {"example_ids": jnp.asarray(perm)}
    np.testing.assert_allclose(_terms(params, shuffled, jax.random.key(5), model_config=MC, config=EBPO),
                               np.asarray(a)[perm], rtol=1e-6, atol=1e-5)


# ------------------------------------------------------------------------- EBPO gradients
def test_on_policy_ratio_is_one(params):
    """At θ == θ_old, with the same key, the loss recomputes θ_old's terms bit for bit: ρ == 1
    exactly, the loss is -mean(A) and nothing is clipped."""
    batch, key = make_batch(), jax.random.key(7)
    batch["old_terms"] = _terms(params, batch, key, model_config=MC, config=EBPO)
    loss, m = jax.jit(rl.ebpo_loss, static_argnames=STATIC)(params, batch, key, model_config=MC, config=EBPO)
    assert float(m["ratio_min"]) == 1.0 and float(m["ratio_max"]) == 1.0 and float(m["clip_frac"]) == 0.0
    assert float(loss) == pytest.approx(-float(np.mean(np.asarray(batch["advantages"]))), rel=1e-6)


def test_on_policy_block_ratio_in_the_gradient_program(params):
    """The same at the block level inside the jitted gradient. XLA fuses the forward of a gradient
    program differently from a forward-only one, so here ρ is one to float rounding, not bitwise."""
    batch, key = make_batch(), jax.random.key(7)
    batch["old_terms"] = batch["ref_terms"] = _terms(params, batch, key, model_config=MC, config=EBPO_BLOCK)
    (loss, m), _ = _loss_and_grad(params, batch, key, model_config=MC, config=EBPO_BLOCK)
    np.testing.assert_allclose([m["ratio_min"], m["ratio_max"]], 1.0, atol=1e-5)
    assert float(m["clip_frac"]) == 0.0 and abs(float(m["kl"])) < 1e-9
    np.testing.assert_allclose(loss, -np.mean(batch["advantages"]), atol=1e-5)


@pytest.mark.parametrize("algorithm", ["ebpo", "dipo"])
def test_on_policy_ratio_is_one_in_bf16(params, algorithm):
    """bf16 compute: θ_old's terms from a forward-only program differ from the gradient program's
    (XLA fuses them differently), so the update computes θ_old's terms itself on its first inner
    update: every ratio is exactly one, whatever the precision."""
    mc = MC.replace(dtype="bfloat16")
    if algorithm == "ebpo":
        cfg, batch = EBPO, make_batch()
    else:
        cfg = rl.DiPOConfig(block_size=4, num_steps=3)
        batch = {k: jnp.asarray(np.repeat(v, 4, axis=0)) for k, v in hand_trajectory().items()}
        batch["advantages"] = jnp.linspace(-1.0, 1.5, 4)
    tx = optax.sgd(0.0)
    step = jax.jit(rl.make_rl_step(mc, cfg, tx))
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))
    _, m, terms = step(state, batch, jax.random.key(7), True)
    assert float(m["ratio_min"]) == 1.0 == float(m["ratio_max"]) and float(m["clip_frac"]) == 0.0
    # The separate forward-only program is what drifted: it does not reproduce the step's terms.
    separate = jax.jit(rl.policy_terms, static_argnames=STATIC)(params, batch, jax.random.key(7), model_config=mc,
                                                                config=cfg)
    assert separate.shape == terms.shape


def test_zero_variance_groups_of_non_dyadic_rewards():
    """float32 mean(0.1 x 8) != 0.1, so a std > 0 test kept such groups; max > min does not."""
    r = jnp.full(8, 0.1)
    adv, keep = rl.zscore_advantages(r, 8)
    assert not np.asarray(keep).any() and np.all(np.asarray(adv) == 0.0)
    assert np.all(np.asarray(rl.group_normalized_advantages(r, 8)) == 0.0)
    assert np.all(np.asarray(rl.leave_one_out_advantages(jnp.full(4, 1 / 3), 4)) == 0.0)


def test_dual_clip_bounds_the_negative_advantage_gradient():
    """With A < 0 the plain clip keeps rho*A, whose gradient in log rho is rho*A (unbounded); the
    dual clip floors the objective at c*A, so past rho = c the gradient is zero."""
    log_ratio = jnp.array([0.0, 1.0, 5.0, 10.0])
    adv = jnp.full((4,), -1.0)
    w = jnp.full((4,), 0.25)
    grad = lambda c: np.asarray(jax.grad(lambda lr: rl.policy_loss(lr, adv, w, 0.2, 0.28, dual_clip=c)[0])(log_ratio))
    np.testing.assert_allclose(grad(None), 0.25 * np.exp([0.0, 1.0, 5.0, 10.0]), rtol=1e-5)  # grows as rho
    np.testing.assert_allclose(grad(3.0), [0.25, 0.25 * np.e, 0.0, 0.0], rtol=1e-5)
    _, m = rl.policy_loss(log_ratio, adv, w, 0.2, 0.28, dual_clip=3.0)
    np.testing.assert_allclose(m["pg_loss"], -(-1 - np.e - 3 - 3) / 4, rtol=1e-6)
    with pytest.raises(ConfigError, match=r"EBPOConfig.dual_clip: expected None or a value > 1, found 0.5"):
        rl.EBPOConfig(dual_clip=0.5)


def test_token_normalised_sequence_ratio():
    """normalize="token": log rho is the ELBO difference per completion token."""
    rng = np.random.default_rng(1)
    terms, old = (jnp.asarray(rng.normal(-3, 1, (2, 4, 4)), jnp.float32) for _ in range(2))
    completion = np.zeros((2, 32), bool)
    completion[0, 5:], completion[1, 5:13] = True, True
    batch = {"completion_mask": jnp.asarray(completion), "advantages": jnp.array([1.0, -1.0]), "old_terms": old,
             "sample_mask": jnp.array([True, True])}
    _, m = rl.ebpo_objective(terms, batch, rl.EBPOConfig(likelihood=LIK, normalize="token", eps_low=0.9, eps_high=9))
    delta = (np.asarray(terms) - np.asarray(old)).mean(1).sum(-1) / completion.sum(1)
    np.testing.assert_allclose(m["ratio_mean"], np.exp(delta).mean(), rtol=1e-5)


def test_count_weighting_scales_by_the_realised_mask_rate(params):
    batch, key = make_batch(), jax.random.key(3)
    lik = dataclasses.replace(LIK, weighting="count")
    noise = _noise(key, batch["completion_mask"], config=lik)
    rate = _terms(params, batch, key, model_config=MC, config=EBPO)
    count = _terms(params, batch, key, model_config=MC, config=rl.EBPOConfig(likelihood=lik))
    masked = np.asarray(noise.masked).reshape(4, 4, L // BS, BS).sum(-1)
    tokens = np.asarray(batch["completion_mask"]).reshape(4, 1, L // BS, BS).sum(-1)
    want = np.asarray(rate) * np.asarray(noise.t) * tokens / np.maximum(masked, 1)
    np.testing.assert_allclose(count, want, rtol=1e-4, atol=1e-5)


def test_replay_gradient_equals_direct(params, params_old):
    """Block ratios with clipping on some blocks and a k3 KL: the replayed per-timestep cotangents
    must rebuild exactly the gradient of differentiating through all N forwards."""
    batch, key = make_batch(), jax.random.key(8)
    batch["old_terms"] = _terms(params_old, batch, key, model_config=MC, config=EBPO_BLOCK)
    batch["ref_terms"] = _terms(_perturb(params, jax.random.key(9)), batch, key, model_config=MC, config=EBPO_BLOCK)
    (loss_d, m_d), g_d = _loss_and_grad(params, batch, key, model_config=MC, config=EBPO_BLOCK)
    (loss_r, m_r), g_r = _loss_and_grad(params, batch, key, model_config=MC,
                                        config=dataclasses.replace(EBPO_BLOCK, grad_mode="replay"))
    np.testing.assert_allclose(loss_r, loss_d, rtol=1e-5)
    assert 0 < float(m_d["clip_frac"]) < 1  # some blocks clipped, some not: cotangents differ per block
    norm = float(optax.tree.norm(g_d))
    assert norm > 1e-3
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_d), jax.tree.leaves(g_r)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * norm, err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------------- surrogate and advantages
def test_clipped_surrogate_by_hand():
    ratio = jnp.array([0.5, 0.9, 1.1, 1.5, 0.5, 1.5, 0.9])
    adv = jnp.array([1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -2.0])
    weight = jnp.full((7,), 1 / 7)
    # A > 0: min(rho, clip(rho)) -> 0.5, 0.9, 1.1, 1.28 (clipped); A < 0: -0.8 (clipped), -1.5, -1.8.
    want = -(0.5 + 0.9 + 1.1 + 1.28 - 0.8 - 1.5 - 1.8) / 7
    loss_fn = lambda lr: rl.policy_loss(lr, adv, weight, 0.2, 0.28)
    (loss, m), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.log(ratio))
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(m["clip_frac"], 2 / 7, rtol=1e-6)
    np.testing.assert_allclose(m["ratio_max"], 1.5, rtol=1e-6)
    clipped = np.array([0, 0, 0, 1, 1, 0, 0], bool)
    np.testing.assert_allclose(grad, np.where(clipped, 0.0, -ratio * adv / 7), rtol=1e-6)  # no gradient when clipped


def test_kl_estimators_by_hand():
    d = jnp.array([-0.5, 0.0, 0.3])  # log pi_ref - log pi_theta
    np.testing.assert_allclose(rl.kl_estimate(d, "k1"), [0.5, 0.0, -0.3])
    np.testing.assert_allclose(rl.kl_estimate(d, "k2"), [0.125, 0.0, 0.045])
    np.testing.assert_allclose(rl.kl_estimate(d, "k3"), np.exp(d) - 1 - d, rtol=1e-6)


def test_espo_objective_by_hand():
    """Sequence ratio exp(ΔELBO / L) and k2 KL 0.5 (ELBO - ELBO_ref)^2 / L, from made-up terms."""
    rng = np.random.default_rng(0)
    terms, old, ref = (jnp.asarray(rng.normal(-3, 1, (3, 2, 2)), jnp.float32) for _ in range(3))
    completion = np.zeros((3, 8), bool)
    completion[0, 2:], completion[1, 4:], completion[2, 1:] = True, True, True
    adv = jnp.array([1.0, -0.5, 2.0])
    batch = {"completion_mask": jnp.asarray(completion), "advantages": adv, "old_terms": old, "ref_terms": ref,
             "sample_mask": jnp.array([True, True, False])}
    cfg = rl.ESPOConfig(beta=0.3)
    loss, m = rl.espo_objective(terms, batch, cfg)
    n = completion.sum(1)
    elbo, elbo_old, elbo_ref = (np.asarray(x).mean(1).sum(1) for x in (terms, old, ref))
    rho = np.exp((elbo - elbo_old) / n)
    surr = np.minimum(rho * adv, np.clip(rho, 0.8, 1.2) * adv)
    kl = 0.5 * (elbo - elbo_ref) ** 2 / n
    np.testing.assert_allclose(loss, -surr[:2].mean() + 0.3 * kl[:2].mean(), rtol=1e-5)
    np.testing.assert_allclose(m["ratio_mean"], rho[:2].mean(), rtol=1e-5)


def test_advantages_by_hand():
    r = jnp.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 3.0])
    np.testing.assert_allclose(rl.group_normalized_advantages(r, 4, eps=0.0)[:4], [1, -1, -1, 1], rtol=1e-6)
    np.testing.assert_allclose(rl.group_normalized_advantages(r, 4)[4:8], 0.0)
    np.testing.assert_allclose(rl.group_normalized_advantages(r, 4, eps=0.0)[8:], [-1 / 3 ** .5] * 3 + [3 ** .5],
                               rtol=1e-6)
    np.testing.assert_allclose(rl.leave_one_out_advantages(r, 4),
                               [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0, -1, -1, -1, 3], rtol=1e-6, atol=1e-7)
    adv, keep = rl.zscore_advantages(r, 4)
    np.testing.assert_array_equal(keep, [True] * 4 + [False] * 4 + [True] * 4)  # zero-variance group dropped
    np.testing.assert_allclose(adv[4:8], 0.0)
    np.testing.assert_allclose(adv[:4], [1, -1, -1, 1], rtol=1e-5)
    with pytest.raises(ValueError, match="group_size"):
        rl.group_normalized_advantages(r, 5)


# ------------------------------------------------------------------------- DiPO
def hand_trajectory():
    """Two blocks of 4: prompt [0, 2); block 0 writes 30 at step 0, 31 at step 1; block 1 (steps
    2..4) writes 40 and 41 at step 2, 42 at step 3, then EDITS 41 -> 44 at step 4 and writes 43."""
    tokens = np.array([[20, 21, 30, 31, 40, 44, 42, 43]])
    e = -1
    steps = np.full((1, 8, 3), e)
    written = np.zeros((1, 8, 3), np.int64)
    for pos, writes in {2: [(0, 30)], 3: [(1, 31)], 4: [(2, 40)], 5: [(2, 41), (4, 44)], 6: [(3, 42)], 7: [(4, 43)]}.items():
        for i, (st, tok) in enumerate(writes):
            steps[0, pos, i], written[0, pos, i] = st, tok
    decoded = np.arange(8)[None] >= 2
    return {"tokens": tokens, "completion_mask": decoded, "write_step": steps, "write_token": written}


def test_dipo_inputs_show_the_canvas_as_it_was():
    t = hand_trajectory()
    local = rl.dipo_local_steps(jnp.asarray(t["write_step"]), 4)
    n = rl.NEVER
    np.testing.assert_array_equal(local[0, 2:, 0], [0, 1, 0, 0, 1, 2])
    np.testing.assert_array_equal(local[0, 5], [0, 2, n])  # the edit is a write of its own
    assert rl.dipo_num_steps(t["write_step"], 4) == 3
    m = MC.mask_token_id
    # Before step 2 of block 1, position 5 shows its first value 41, not its final 44.
    want = {0: [20, 21, m, m, m, m, m, m], 1: [20, 21, 30, m, 40, 41, m, m], 2: [20, 21, 30, 31, 40, 41, 42, m],
            3: [20, 21, 30, 31, 40, 44, 42, 43]}
    for step, row in want.items():
        got = rl.dipo_inputs(jnp.asarray(t["tokens"]), jnp.asarray(t["completion_mask"]), local,
                             jnp.asarray(t["write_token"]), step, m)
        np.testing.assert_array_equal(got, [row], err_msg=f"step {step}")


@pytest.mark.parametrize("vectorize", ["batch", "scan"])
def test_dipo_logprobs_match_decode_time_inputs(params, vectorize):
    """Each write's log-prob equals the uncached decoder's view when it was made: the canvas up to
    its block under the block-causal mask, earlier blocks final, its block as at that step (an
    edit sees the value it replaces), at the rollout temperature with the mask id excluded."""
    t = hand_trajectory()
    cfg = rl.DiPOConfig(block_size=4, num_steps=3, vectorize=vectorize, temperature=0.7)
    got = np.asarray(jax.jit(rl.dipo_token_logprobs, static_argnames=STATIC)(
        params, MC, {k: jnp.asarray(v) for k, v in t.items()}, config=cfg))
    m = MC.mask_token_id
    views = {(2, 0): [m, m], (3, 0): [30, m], (4, 0): [m, m, m, m], (5, 0): [m, m, m, m],
             (6, 0): [40, 41, m, m], (5, 1): [40, 41, 42, m], (7, 0): [40, 41, 42, m]}
    for (i, slot), block in views.items():
        start = i // 4 * 4
        canvas = t["tokens"][0].copy()
        canvas[start:start + 4] = ([20, 21] + block) if start == 0 else block
        mask = masks.block_causal(8, 4) & (jnp.arange(8) < start + 4)[None, :]  # nothing past block i reaches it
        logits = _fwd(params, MC, jnp.asarray(canvas)[None], jnp.arange(8), mask)[0, i]
        want = jax.nn.log_softmax(logits.at[m].set(-jnp.inf) / 0.7)[t["write_token"][0, i, slot]]
        np.testing.assert_allclose(got[0, i, slot], want, rtol=1e-5, atol=1e-5, err_msg=f"position {i} write {slot}")
    assert np.count_nonzero(got) == 7


def test_dipo_rebuilds_the_exact_context_of_every_greedy_write(params):
    """Decode greedily in S mode (it edits) with `P + gen_length` not a multiple of the block, pack
    the recorded trajectory, and check that every write, the EOS fill and the canvas past the
    answer included, is the argmax of the logits DiPO's rebuilt context gives."""
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15], list(range(20, 31))]
    out = decode.generate(params, MC, prompts, gen_length=16, block_length=8, preset="S", record_trajectory=True)
    batch = rl.pack_trajectory(out, 32, pad_id=MC.pad_token_id)
    local = np.asarray(rl.dipo_local_steps(jnp.asarray(batch["write_step"]), 8))
    writes = local < rl.NEVER
    assert writes.sum() > int(batch["completion_mask"].sum())  # S mode edited some positions
    # Canvases of 24 or 32 tokens: the decoder wrote past P + 16, and those writes are in the batch.
    assert any(batch["completion_mask"][i, len(p) + 16:].any() for i, p in enumerate(prompts))
    x_t = jax.vmap(lambda j: rl.dipo_inputs(jnp.asarray(batch["tokens"]), jnp.asarray(batch["completion_mask"]),
                                            jnp.asarray(local), jnp.asarray(batch["write_token"]), j,
                                            MC.mask_token_id))(jnp.arange(local[writes].max() + 1))
    logits_fn = jax.jit(objectives.denoiser_logits, static_argnums=(1, 4))
    bad, gaps = 0, []
    for j in range(x_t.shape[0]):
        logits = np.array(logits_fn(params, MC, x_t[j], jnp.asarray(batch["tokens"]), 8))
        logits[..., MC.mask_token_id] = -np.inf
        for b, i, w in zip(*np.nonzero(local == j)):
            tok = batch["write_token"][b, i, w]
            gaps.append(logits[b, i].max() - logits[b, i, tok])
            bad += int(logits[b, i].argmax() != tok)
    assert len(gaps) == writes.sum()
    assert max(gaps) < 1e-4, (bad, max(gaps))  # argmax up to float rounding (cached vs composite forward)


def test_dipo_drops_zero_variance_groups(params):
    rewards = jnp.array([1.0, 0.0, 0.1, 0.1])  # group 0 varies; group 1 is all 0.1 (not a dyadic float)
    adv, keep = rl.zscore_advantages(rewards, 2)
    np.testing.assert_array_equal(keep, [True, True, False, False])
    t = hand_trajectory()
    batch = {k: np.repeat(v, 4, axis=0) for k, v in t.items()}
    cfg = rl.DiPOConfig(block_size=4, num_steps=rl.dipo_num_steps(batch["write_step"], 4))
    old = jnp.asarray(np.random.default_rng(0).normal(-6, 0.1, (4, 8, 3)), jnp.float32)
    batch.update(advantages=adv, sample_mask=keep, old_terms=old)
    loss_fn = jax.jit(rl.dipo_loss, static_argnames=STATIC)
    loss, m = loss_fn(params, batch, model_config=MC, config=cfg)
    assert int(m["scored_tokens"]) == 14 and int(m["unscored_tokens"]) == 0  # 2 kept samples x 7 writes
    # The dropped group's numbers do not matter at all; the kept group's do.
    loss2, _ = loss_fn(params, dict(batch, old_terms=old.at[2:].add(5.0), advantages=adv.at[2:].set(9.0)),
                       model_config=MC, config=cfg)
    assert float(loss2) == float(loss)
    loss3, _ = loss_fn(params, dict(batch, old_terms=old.at[:2].add(0.1)), model_config=MC, config=cfg)
    assert float(loss3) != float(loss)


# ------------------------------------------------------------------------- configs and batches
def test_config_errors_name_field_expected_found():
    with pytest.raises(ConfigError, match=r"LikelihoodConfig.num_timesteps: expected an even number.*found 3"):
        rl.LikelihoodConfig(num_timesteps=3, coupled=True)
    with pytest.raises(ConfigError, match=r"EBPOConfig.ratio_level: expected one of .* found 'token'"):
        rl.EBPOConfig(ratio_level="token")
    with pytest.raises(ConfigError, match=r"DiPOConfig.eps_low: expected a value in \[0, 1\), found 1.5"):
        rl.DiPOConfig(eps_low=1.5)
    with pytest.raises(ValueError, match="multiple of block_size=8, found 12"):
        rl.policy_terms(None, {"tokens": np.zeros((1, 12), np.int32), "completion_mask": np.ones((1, 12), bool)},
                        jax.random.key(0), model_config=MC, config=rl.EBPOConfig(likelihood=rl.LikelihoodConfig(8)))
    with pytest.raises(KeyError, match="ref_terms"):
        batch = make_batch(b=1)
        batch["old_terms"] = jnp.zeros((1, 2, L // BS))
        rl.ebpo_loss(None, batch, jax.random.key(0), model_config=MC,
                     config=rl.EBPOConfig(likelihood=rl.LikelihoodConfig(BS, 2), beta=0.1))


def test_pack_rollouts_scores_exactly_what_was_generated():
    """Completion + EOS fill up to gen_length after the prompt; nothing past it (layout padding)."""
    out = rl.pack_rollouts([[5, 6, 7], [5]], [[8, 9], [1, 2, 3]], 8, pad_id=0, gen_length=3)
    np.testing.assert_array_equal(out["tokens"], [[5, 6, 7, 8, 9, 0, 0, 0], [5, 1, 2, 3, 0, 0, 0, 0]])
    np.testing.assert_array_equal(out["completion_mask"], [[0, 0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0]])
    no_fill = rl.pack_rollouts([[5, 6, 7]], [[8, 9]], 8, pad_id=0, score_padding=False)
    np.testing.assert_array_equal(no_fill["completion_mask"], [[0, 0, 0, 1, 1, 0, 0, 0]])
    with pytest.raises(ValueError, match="row 0"):
        rl.pack_rollouts([[1] * 6], [[2] * 3], 8, pad_id=0, gen_length=3)
    with pytest.raises(ValueError, match="gen_length: expected"):
        rl.pack_rollouts([[1]], [[2]], 8, pad_id=0)


# ------------------------------------------------------------------------- a toy RL problem
def test_ebpo_updates_raise_the_likelihood_of_rewarded_completions(params):
    """Reward 1 iff the completion starts with token 7. A few EBPO rounds (old terms, then two
    inner updates through `make_rl_step`) must widen the ELBO gap between rewarded and other
    completions. The first update of each round runs at θ == θ_old: sequence ratio exactly one."""
    tokens = np.array(make_batch(seed=10)["tokens"])
    tokens[:, :PROMPT] = tokens[0, :PROMPT]  # one prompt, a group of 4 completions
    tokens[::2, PROMPT] = 7  # two of them rewarded
    batch = make_batch()
    batch["tokens"] = jnp.asarray(tokens)
    batch["advantages"] = rl.group_normalized_advantages(jnp.asarray(tokens[:, PROMPT] == 7, jnp.float32), 4)

    def gap(p):
        elbo = np.mean([np.asarray(_terms(p, batch, jax.random.key(100 + i), model_config=MC, config=EBPO))
                        .mean(1).sum(-1) for i in range(4)], axis=0)
        return elbo[::2].mean() - elbo[1::2].mean()

    tx = optax.adam(3e-3)
    step = jax.jit(rl.make_rl_step(MC, EBPO, tx))
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))
    before = gap(params)
    batch["old_terms"] = jnp.zeros((4, LIK.num_timesteps, L // BS))
    for r in range(4):
        state, inner = rl.run_inner_updates(step, state, batch, jax.random.key(r), 2)
        assert all(np.isfinite(float(m["loss"])) for m in inner)
        # The first update is at θ == θ_old: the step's own terms, so exactly one.
        assert float(inner[0]["ratio_min"]) == 1.0 == float(inner[0]["ratio_max"])
        np.testing.assert_allclose(inner[0]["loss"], -np.mean(batch["advantages"]), rtol=1e-6)
    after = gap(state.params)
    assert int(state.step) == 8
    assert after - before > 2.0, (before, after)


def test_every_inner_update_is_clipped_against_the_rollout_policy(params):
    """θ_old is the policy that drew the rollouts in all μ = 8 inner updates: every update after
    the first gets the first update's own terms as `old_terms` (not the previous update's), and
    the ratio it reports is θ_i against the rollout policy, whose drift grows past any one step."""
    tx = optax.adam(3e-3)
    jitted = jax.jit(rl.make_rl_step(MC, EBPO, tx))
    seen, returned = [], []

    def step(state, batch, key, on_policy):
        seen.append(np.asarray(batch["old_terms"]))
        out = jitted(state, batch, key, on_policy)
        returned.append(np.asarray(out[2]))  # θ_i's terms, computed before update i
        return out

    batch = make_batch()
    batch["old_terms"] = jnp.zeros((4, LIK.num_timesteps, L // BS))
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))
    state, inner = rl.run_inner_updates(step, state, batch, jax.random.key(3), 8)
    assert int(state.step) == 8 and len(seen) == 8
    for i in range(1, 8):
        np.testing.assert_array_equal(seen[i], returned[0], err_msg=f"update {i + 1}'s θ_old")

    def seq_log_ratio(new, old):  # EBPO's sequence-level log-ratio (ebpo_objective)
        return (new - old).mean(1).sum(-1)

    drift = [float(np.abs(seq_log_ratio(returned[i], returned[0])).max()) for i in range(8)]
    per_step = [float(np.abs(seq_log_ratio(returned[i], returned[i - 1])).max()) for i in range(1, 8)]
    assert drift[-1] > max(per_step), (drift, per_step)  # the drift outgrows every single step
    want = np.exp(seq_log_ratio(returned[7], returned[0]))
    np.testing.assert_allclose([inner[7]["ratio_min"], inner[7]["ratio_max"]], [want.min(), want.max()], rtol=1e-5)
