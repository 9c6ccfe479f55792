"""Noising and the block-diffusion loss (REFERENCE §2–4) against slow oracles and hand computations.

The model is the official tiny fixture (`tiny_hf`): loading it is faster than compiling an init.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import assert_close_to_scale
from llada_jax.model import masks
from llada_jax.train import objectives
from llada_jax.model.config import ConfigError, get_config
from llada_jax.model import forward
from llada_jax.train.objectives import ObjectiveConfig

MC = get_config("tiny")
L = 32
PROMPT = 8
_fwd = jax.jit(forward, static_argnums=1)
_logprobs = jax.jit(objectives.per_token_logprobs, static_argnames=("model_config", "block_size", "mdlm"))
_logits = jax.jit(objectives.denoiser_logits, static_argnames=("model_config", "block_size", "mdlm"))
_noise = jax.jit(objectives.noise, static_argnames="config")


@pytest.fixture(scope="module")
def params(tiny_hf):
    config, params = tiny_hf
    assert config == MC, "the fixture and the tiny preset diverged"
    return params


def make_batch(b=2, length=L, prompt=PROMPT, seed=1, vocab=MC.vocab_size - 2):
    tokens = jax.random.randint(jax.random.key(seed), (b, length), 0, vocab)
    loss_mask = jnp.broadcast_to(jnp.arange(length) >= prompt, (b, length))
    return {"tokens": tokens, "loss_mask": loss_mask}


def oracle_logits(params, x_t, x_0, block_size):
    """The slow obvious way: for each block b, a forward over [clean blocks < b, noisy block b]
    under the block-causal mask, positions arange. Each input is padded to L with keys that no
    query attends, so that one compiled forward serves every block."""
    n, length = x_t.shape
    out = []
    for start in range(0, length, block_size):
        end = min(start + block_size, length)
        tokens = jnp.concatenate([x_0[:, :start], x_t[:, start:end], jnp.zeros((n, length - end), x_t.dtype)], 1)
        mask = masks.block_causal(length, block_size) & (jnp.arange(length) < end)[None, :]
        out.append(_fwd(params, MC, tokens, jnp.arange(length), mask)[:, start:end])
    return jnp.concatenate(out, axis=1)


def logprobs_of(logits, targets):
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    return np.take_along_axis(logp, np.asarray(targets)[..., None], axis=-1)[..., 0]


# ------------------------------------------------------------------------- one forward == oracle
@pytest.mark.parametrize("block_size", [8, 6])  # 6: the last block is partial
def test_composite_logprobs_match_per_block_oracle(params, block_size):
    cfg = ObjectiveConfig.for_model(MC, block_size=block_size)
    nb = _noise(make_batch(), jax.random.key(2), config=cfg)
    fast = _logprobs(params, MC, nb.x_t, nb.x_0, block_size=block_size)
    slow = logprobs_of(oracle_logits(params, nb.x_t, nb.x_0, block_size), nb.x_0)
    assert_close_to_scale(fast, slow, rel=1e-5)


def test_loss_fn_matches_oracle(params):
    cfg = ObjectiveConfig.for_model(MC, block_size=8, p_edit=0.3, keep_weight=0.25, mtf=True, lambda_mtf=0.5)
    batch, key = make_batch(), jax.random.key(3)
    loss, m = jax.jit(objectives.loss_fn, static_argnums=(1, 2))(params, MC, cfg, batch, key)

    nb = _noise(batch, key, config=cfg)
    logits = np.array(oracle_logits(params, nb.x_t, nb.x_0, 8))
    logp = logprobs_of(logits, nb.x_0)
    masked, edited, kept = (np.asarray(a) for a in (nb.masked, nb.edited, nb.kept))
    t = np.asarray(nb.t)[:, None]
    m2t = np.sum(np.where(masked, -logp / t, 0)) / np.sum(nb.loss_mask)
    t2t = (np.sum(-logp[edited]) + 0.25 * np.sum(-logp[kept])) / (edited.sum() + 0.25 * kept.sum())
    # MTF: fill the masks with the oracle's own argmax draft (never the mask id), score the wrong drafts.
    logits[..., MC.mask_token_id] = -np.inf
    x_draft = np.where(masked, logits.argmax(-1), np.asarray(nb.x_t))
    wrong = masked & (x_draft != np.asarray(nb.x_0))
    mtf = -np.sum(logprobs_of(oracle_logits(params, jnp.asarray(x_draft), nb.x_0, 8), nb.x_0)[wrong]) / wrong.sum()

    assert edited.sum() > 0 and kept.sum() > 0 and wrong.sum() > 0
    np.testing.assert_allclose(m["m2t_loss"], m2t, rtol=1e-5)
    np.testing.assert_allclose(m["t2t_loss"], t2t, rtol=1e-5)
    np.testing.assert_allclose(m["mtf_loss"], mtf, rtol=1e-5)
    np.testing.assert_allclose(loss, m2t + t2t + 0.5 * mtf, rtol=1e-5)
    assert m["num_masked"] == masked.sum() and m["num_edited"] == edited.sum() and m["num_kept"] == kept.sum()
    assert m["num_draft_wrong"] == wrong.sum()


def test_mdlm_is_a_bidirectional_forward_on_x_t(params):
    cfg = ObjectiveConfig.for_model(MC, block_size=8)
    nb = _noise(make_batch(), jax.random.key(4), config=cfg)
    want = logprobs_of(_fwd(params, MC, nb.x_t, jnp.arange(L), masks.bidirectional(L)), nb.x_0)
    for block_size, mdlm in ((8, True), (L, False)):
        got = _logprobs(params, MC, nb.x_t, nb.x_0, block_size=block_size, mdlm=mdlm)
        assert_close_to_scale(got, want, rel=1e-5)
    block_diffusion = _logprobs(params, MC, nb.x_t, nb.x_0, block_size=8)
    assert np.abs(block_diffusion - want).max() > 1e-2  # the flag really changes the attention


# ------------------------------------------------------------------------- noising
def test_complementary_masking_partitions_the_response():
    b, length = 256, 64
    prompt = jnp.arange(b) % 24  # varying prompt lengths
    pad_from = length - jnp.arange(b) % 8  # and some padding at the end
    pos = jnp.arange(length)[None, :]
    loss_mask = (pos >= prompt[:, None]) & (pos < pad_from[:, None])
    tokens = jax.random.randint(jax.random.key(5), (b, length), 0, 500)
    cfg = ObjectiveConfig.for_model(MC, t_min=0.3, t_max=0.8)
    nb = _noise({"tokens": tokens, "loss_mask": loss_mask}, jax.random.key(6), config=cfg)

    first, second = np.asarray(nb.masked[:b]), np.asarray(nb.masked[b:])
    np.testing.assert_array_equal(first ^ second, loss_mask)  # each response token masked exactly once
    assert not np.any(first & second)
    np.testing.assert_array_equal(np.asarray(nb.x_t) == MC.mask_token_id, np.asarray(nb.masked))
    outside = ~np.tile(np.asarray(loss_mask), (2, 1))
    np.testing.assert_array_equal(np.asarray(nb.x_t)[outside], np.asarray(nb.x_0)[outside])  # prompt, pad intact
    t = np.asarray(nb.t[:b])
    assert np.all((t >= 0.3) & (t <= 0.8))
    np.testing.assert_allclose(nb.t[b:], 1 - t, rtol=1e-6)
    n = np.asarray(loss_mask).sum(1)
    z = (first.sum(1) - t * n) / np.sqrt(n * t * (1 - t))  # per-row binomial z-score
    assert np.abs(z).max() < 5
    rate = first.sum() / n.sum()
    assert abs(rate - 0.55) < 4 * (0.5 / np.sqrt(12)) / np.sqrt(b)  # E[t] = 0.55, 4 sigma over rows


def test_noise_is_a_function_of_key_and_example_id():
    cfg = ObjectiveConfig.for_model(MC, p_edit=0.3)
    batch = make_batch(b=2)
    key = jax.random.key(7)
    swapped = {k: v[::-1] for k, v in batch.items()}
    a = _noise({**batch, "example_ids": jnp.array([11, 42])}, key, config=cfg)
    b = _noise({**swapped, "example_ids": jnp.array([42, 11])}, key, config=cfg)
    c = _noise({**batch, "example_ids": jnp.array([12, 43])}, key, config=cfg)
    order = jnp.array([1, 0, 3, 2])  # rows of `b` in `a`'s order (originals, then complements)
    for f in ("x_t", "masked", "edited", "t"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f)[order])
    assert np.any(a.x_t != c.x_t)


def test_t2t_perturbs_only_visible_response_tokens_into_non_specials():
    extra = tuple(range(400))  # most of the vocabulary is special: a careless sampler would hit them
    cfg = ObjectiveConfig.for_model(MC, p_edit=0.5, extra_special_ids=extra)
    batch = make_batch(b=64, vocab=MC.vocab_size)  # originals include specials (EOS, mask id)
    nb = _noise(batch, jax.random.key(8), config=cfg)
    x_t, x_0 = np.asarray(nb.x_t), np.asarray(nb.x_0)
    edited, kept, masked = np.asarray(nb.edited), np.asarray(nb.kept), np.asarray(nb.masked)
    visible = np.asarray(nb.loss_mask) & ~masked
    assert not np.any(edited & ~visible)
    np.testing.assert_array_equal(kept, visible & ~edited)
    assert not np.any(np.isin(x_t[edited], cfg.special_ids))
    assert np.all(x_t[edited] != x_0[edited])
    np.testing.assert_array_equal(x_t[~edited & ~masked], x_0[~edited & ~masked])
    assert abs(edited.sum() / visible.sum() - 0.5) < 0.05

    # The replacement is uniform over the allowed ids other than the original.
    original = jnp.full((40000,), 450, jnp.int32)
    draws = np.asarray(objectives.sample_non_special(jax.random.key(9), original, cfg.special_ids, MC.vocab_size))
    allowed = np.setdiff1d(np.arange(400, 510), [450])
    counts = np.bincount(draws, minlength=MC.vocab_size)
    assert counts.sum() == counts[allowed].sum()
    expected = len(draws) / len(allowed)
    assert np.abs(counts[allowed] - expected).max() < 5 * np.sqrt(expected)

    # Exhaustively on a small vocabulary: specials at both ends and in runs, every original.
    specials, vocab = (0, 1, 5, 6, 11), 12
    original = jnp.repeat(jnp.arange(vocab, dtype=jnp.int32), 500)
    draws = np.asarray(objectives.sample_non_special(jax.random.key(10), original, specials, vocab))
    for o in range(vocab):
        assert set(draws[np.asarray(original) == o]) == set(range(vocab)) - set(specials) - {o}, o


def test_weightings_match_hand_computed_values():
    logp = jnp.array([[-1.0, -2.0, -3.0, -9.0], [-0.5, -9.0, -9.0, -4.0]])
    masked = jnp.array([[True, True, False, False], [False, False, False, True]])
    loss_mask = jnp.array([[True, True, True, True], [True, False, True, True]])
    t = jnp.array([0.5, 0.25])
    elbo = objectives.m2t_loss(logp, masked, t, loss_mask, "elbo")
    mean = objectives.m2t_loss(logp, masked, t, loss_mask, "token_mean")
    np.testing.assert_allclose(elbo, ((1 + 2) / 0.5 + 4 / 0.25) / 7, rtol=1e-6)  # per response token
    np.testing.assert_allclose(mean, (1 + 2 + 4) / 3, rtol=1e-6)
    edited = jnp.array([[False, False, True, False], [False] * 4])
    kept = jnp.array([[False] * 4, [True, False, False, False]])
    np.testing.assert_allclose(objectives.t2t_loss(logp, edited, kept, 0.2), (3 + 0.2 * 0.5) / 1.2, rtol=1e-6)
    np.testing.assert_allclose(objectives.t2t_loss(logp, edited, kept, 0.0), 3.0, rtol=1e-6)


def test_cap_loss_is_entropy_of_correct_masked_predictions():
    probs = jnp.array([[[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.25, 0.25]]])
    targets = jnp.array([[0, 0, 0]])  # right, wrong, right
    masked = jnp.array([[True, True, False]])  # the third is right but not masked
    entropy = -np.sum(np.asarray(probs[0, 0]) * np.log(probs[0, 0]))
    np.testing.assert_allclose(objectives.cap_loss(jnp.log(probs), targets, masked), entropy, rtol=1e-6)


def test_document_mask_prevents_cross_document_attention(params):
    doc_ids = jnp.where(jnp.arange(L) < 12, 0, 1)[None]  # boundary inside the second block of 8
    cfg = ObjectiveConfig.for_model(MC, block_size=8)
    nb = _noise(make_batch(b=1), jax.random.key(10), config=cfg)
    x_0 = jnp.where(doc_ids == 0, (nb.x_0 + 1) % 500, nb.x_0)  # change document 0 only
    x_t = jnp.where(doc_ids == 0, (nb.x_t + 1) % 500, nb.x_t)
    doc1 = np.asarray(doc_ids[0] == 1)
    one_doc = jnp.zeros((2, L), jnp.int32)  # a single document: no restriction
    for mdlm in (False, True):  # document 0 comes first: in MDLM document 1 would see it
        for ids, leaks in ((one_doc, True), (jnp.tile(doc_ids, (2, 1)), False)):
            a = _logits(params, MC, nb.x_t, nb.x_0, block_size=8, doc_ids=ids, mdlm=mdlm)[:, doc1]
            b = _logits(params, MC, x_t, x_0, block_size=8, doc_ids=ids, mdlm=mdlm)[:, doc1]
            assert (np.abs(a - b).max() > 1e-3) == leaks, (mdlm, leaks)


def test_document_positions_restart_at_each_document():
    doc_ids = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1] * 8, [5, 5, 0, 0, 7, 7, 7, 7]])
    oracle = []
    for row in np.asarray(doc_ids):
        pos, run = [], 0
        for i, d in enumerate(row):
            run = 0 if i == 0 or d != row[i - 1] else run + 1
            pos.append(run)
        oracle.append(pos)
    np.testing.assert_array_equal(masks.document_positions(doc_ids), oracle)
    np.testing.assert_array_equal(masks.document_positions(doc_ids)[1], np.arange(8))  # SFT: one id per row


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_documents_match_each_document_alone(params, dtype):
    """Oracle: each packed document's logits equal those of the document run alone (positions from
    0, no neighbours), under the bidirectional (MDLM) and the block-diffusion mask. Documents start
    on block boundaries so that a document alone has the same blocks. RoPE is relative, so in fp32
    the restart changes only rounding; in bf16 the rotations are rounded at their absolute
    position, and only restarted positions make the packed row equal the documents alone."""
    block, length = 8, 64
    spans = [(0, 16), (16, 48), (48, 56)]  # three documents, then one block of padding (id 0)
    doc_ids = np.zeros((1, length), np.int32)
    for i, (a, b) in enumerate(spans):
        doc_ids[0, a:b] = i + 1
    rng = np.random.default_rng(3)
    x_0 = rng.integers(0, 500, (1, length)).astype(np.int32)
    x_t = np.where(rng.random((1, length)) < 0.5, MC.mask_token_id, x_0).astype(np.int32)
    mc = MC.replace(dtype=dtype)
    for mdlm in (True, False):
        if dtype == "bfloat16" and not mdlm:
            continue  # bf16 composite: the [x_t ; x_0] rows differ in length, so the matmuls round differently
        packed = np.asarray(_logits(params, mc, x_t, x_0, block_size=block, doc_ids=doc_ids, mdlm=mdlm), np.float32)
        for a, b in spans:
            alone = _logits(params, mc, x_t[:, a:b], x_0[:, a:b], block_size=block, mdlm=mdlm)
            where = f"document {a}:{b}, mdlm={mdlm}, {dtype}"
            if dtype == "bfloat16":  # the same bf16 ops on the same rows: exactly equal
                np.testing.assert_array_equal(packed[:, a:b], np.asarray(alone, np.float32), err_msg=where)
            else:
                assert_close_to_scale(packed[:, a:b], alone, rel=1e-4, err_msg=where)


# ------------------------------------------------------------------------- training
def test_a_few_adam_steps_reduce_the_loss(params):
    cfg = ObjectiveConfig.for_model(MC, block_size=8)
    data = make_batch(b=4, seed=11)  # a toy dataset, seen again every step
    opt = optax.adam(3e-3)

    @jax.jit
    def step(p, state, key):
        (loss, _), grads = jax.value_and_grad(objectives.loss_fn, has_aux=True)(p, MC, cfg, data, key)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    p, state, losses = params, opt.init(params), []
    for i in range(30):
        p, state, loss = step(p, state, jax.random.fold_in(jax.random.key(12), i))
        losses.append(float(loss))
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.6 * first, losses


# ------------------------------------------------------------------------- schedule, config
def test_block_size_schedule():
    s = objectives.wsd_block_schedule(256, warmup_steps=50, stable_steps=100, decay_steps=31)
    assert s.stages == ((10, 1), (10, 4), (10, 32), (10, 64), (10, 128), (100, 256), (10, 128), (10, 64), (11, 32))
    assert s.sizes == (1, 4, 32, 64, 128, 256)
    got = [objectives.block_size_at(i, s) for i in (0, 9, 10, 49, 50, 149, 150, 170, 180, 10**6)]
    assert got == [1, 1, 4, 128, 256, 256, 128, 32, 32, 32]
    assert ObjectiveConfig.for_model(MC, block_size=256).is_mdlm(256)  # the stable phase is MDLM
    np.testing.assert_array_equal(objectives.per_block_sums(jnp.arange(10.0)[None], 4), [[6.0, 22.0, 17.0]])
    with pytest.raises(ConfigError, match="warmup_sizes"):
        objectives.wsd_block_schedule(32, 10, 10, 10, warmup_sizes=(1, 4, 32))


@pytest.mark.parametrize("overrides, field", [
    ({"t_max": 1.0}, "t_min/t_max"),
    ({"weighting": "mean"}, "weighting"),
    ({"extra_special_ids": [600]}, "extra_special_ids"),
    ({"p_edit": 1.0}, "p_edit"),
    ({"block_size": 0}, "block_size"),
])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=f"ObjectiveConfig.{field}: expected .* found"):
        ObjectiveConfig.for_model(MC, **overrides)


def test_loss_fn_rejects_an_objective_for_another_model(params):
    cfg = ObjectiveConfig.for_model(get_config("small"))
    with pytest.raises(ConfigError, match="vocab_size"):
        objectives.loss_fn(params, MC, cfg, make_batch(), jax.random.key(0))
