"""Draft-and-Edit decoding (llada_jax.decode) against the official generate() fixture and its
own oracles: the uncached path (full recompute each step), one-prompt-at-a-time runs, and
direct checks of the Multi-Block Editing window op and of the token chooser.

Compiles are the cost here, so most tests share one shape: a batch of 3 prompts on an 80-token
canvas with 16-token blocks (the fixture's three prompts, or random ones of the same bucket).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_close_to_scale
from llada_jax import decode, model
from llada_jax.decode import loop as decode_loop
from llada_jax.model import masks

B, GEN = 16, 48
FIXTURE_PRESET = {"Q": "Q", "S": "S", "noedit": "no_edit", "S_eos_early_stop": "S", "llada20_t095": "llada20"}


@pytest.fixture(scope="module")
def fixture_runs(fixture_dir):
    with open(os.path.join(fixture_dir, "generate.json")) as f:
        data = json.load(f)
    assert (data["block_length"], data["gen_length"]) == (B, GEN)
    return data["runs"]


def _run(tiny_hf, prompts, **kw):
    config, params = tiny_hf
    kw.setdefault("gen_length", GEN)
    kw.setdefault("block_length", B)
    return decode.generate(params, config, prompts, **kw)


def _random_prompts(lengths, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 510, size=n).tolist() for n in lengths]  # no mask (511) / EOS (510)


def test_forward_cached_matches_forward(tiny_hf):
    """Prefill then block-by-block chunks against the cache give the uncached block-causal logits,
    also when rows write at different cache indices in one call."""
    config, params = tiny_hf
    tokens = jax.random.randint(jax.random.key(0), (2, 64), 0, config.vocab_size)
    full = jax.jit(lambda t: model.forward(params, config, t, mask=masks.block_causal(64, B)))(tokens)
    key_block = jnp.arange(64) // B

    @jax.jit
    def step(cache, pos, mask, toks, start):
        return model.forward_cached(params, config, toks, pos, mask, cache, start)

    def chunk(cache, start, size):  # start: [2] per-row chunk start
        pos = start[:, None] + jnp.arange(size)
        mask = key_block[None, None, :] <= (pos // B)[:, :, None]  # [2, size, 64]
        return step(cache, pos, mask, jnp.take_along_axis(tokens, pos, axis=1), start)

    cache = model.init_cache(config, 2, 64)
    for start in (0, 16, 32):
        logits, cache = chunk(cache, jnp.array([start, start]), B)
        assert_close_to_scale(logits, full[:, start:start + B], rel=1e-4)
    # Row 0 rewrites block 1 (same tokens), row 1 decodes block 3.
    logits, cache = chunk(cache, jnp.array([16, 48]), B)
    assert_close_to_scale(logits[0], full[0, 16:32], rel=1e-4)
    assert_close_to_scale(logits[1], full[1, 48:64], rel=1e-4)


@pytest.mark.parametrize("use_cache", [True, False])
def test_fixture_parity(tiny_hf, fixture_runs, use_cache):
    """Every run of the official generate(): same output tokens, same final canvas, and as many
    denoising forwards as the reference made (it recomputes the window each step, no cache).
    The three prompts (P = 5, 16, 21) run as one batch, so this also checks batching."""
    for setting, preset in FIXTURE_PRESET.items():
        runs = sorted((r for r in fixture_runs if r["setting"] == setting), key=lambda r: r["prompt_index"])
        assert len(runs) == 3
        out = _run(tiny_hf, [r["prompt"] for r in runs], preset=preset, use_cache=use_cache,
                   eos_early_stop=runs[0]["kwargs"]["eos_early_stop"])
        for i, r in enumerate(runs):
            where = f"{setting} prompt {i} cache={use_cache}"
            assert out.tokens[i] == r["output"], where
            assert out.canvas[i, :out.canvas_lengths[i]].tolist() == r["final_canvas"], where
            assert out.steps[i] == r["num_forward_calls"], where
            assert out.mbe_forwards[i] == 0, where
            assert out.forwards[i] == out.steps[i] + out.cache_writes[i], where
            if use_cache:
                # Prefill once if the prompt has a full block, then at most one commit per
                # finished block that is followed by another.
                blocks = len(set(r["trace_blocks"]))
                prefill = len(r["prompt"]) >= B
                assert prefill <= out.cache_writes[i] <= prefill + blocks - 1, where
            else:
                assert out.cache_writes[i] == 0, where
            steps = np.array(out.commit_steps[i])
            assert len(steps) == len(r["output"]) and (steps >= 0).all() and (steps < out.steps[i]).all()
            n_gen = sum(t != 510 for t in r["output"])
            assert out.num_generated[i] == n_gen and np.isclose(out.tpf[i], n_gen / out.forwards[i])


def test_commit_steps_follow_blocks(tiny_hf, fixture_runs):
    """Without edits, every token of a block is committed after every token of earlier blocks."""
    prompts = [r["prompt"] for r in sorted(fixture_runs, key=lambda r: r["prompt_index"])[::5]]
    out = _run(tiny_hf, prompts, preset="no_edit")
    for p, steps in zip(prompts, out.commit_steps):
        steps = np.array(steps)
        assert len(steps) == GEN  # no EOS in these answers
        blocks = (len(p) + np.arange(GEN)) // B
        ids = np.unique(blocks)
        firsts = np.array([steps[blocks == k].min() for k in ids])
        lasts = np.array([steps[blocks == k].max() for k in ids])
        assert (lasts[:-1] < firsts[1:]).all(), steps


@pytest.mark.parametrize("preset", ["S", "Q", "no_edit"])
def test_cached_matches_uncached_random_prompts(tiny_hf, preset):
    prompts = _random_prompts([7, 20, 30], seed=1)
    cached = _run(tiny_hf, prompts, preset=preset)
    uncached = _run(tiny_hf, prompts, preset=preset, use_cache=False)
    assert cached.tokens == uncached.tokens
    np.testing.assert_array_equal(cached.canvas, uncached.canvas)
    np.testing.assert_array_equal(cached.steps, uncached.steps)
    np.testing.assert_array_equal(cached.commit_steps[2], uncached.commit_steps[2])
    assert (cached.forwards > uncached.forwards).any()  # the cache's prefill and commits are counted


@pytest.mark.parametrize("eos_early_stop", [True, False])
def test_batched_matches_one_by_one(tiny_hf, fixture_runs, eos_early_stop):
    """Ragged prompts in one batch give each row what it gets alone: tokens, canvas and its own
    forward counts, also when rows stop at different blocks. (Rows without a full prompt block
    next to rows with one are covered by the fixture test, whose batch has P = 5, 16, 21.)
    The prompt lengths share one solo bucket (1, 80) so that the solo runs compile once."""
    prompt2 = next(r["prompt"] for r in fixture_runs if r["prompt_index"] == 2)
    prompts = [prompt2] + _random_prompts([30, 18], seed=3)
    batched = _run(tiny_hf, prompts, preset="S", eos_early_stop=eos_early_stop)
    for i, p in enumerate(prompts):
        alone = _run(tiny_hf, [p], preset="S", eos_early_stop=eos_early_stop)
        assert batched.tokens[i] == alone.tokens[0], i
        np.testing.assert_array_equal(batched.canvas[i], alone.canvas[0])
        np.testing.assert_array_equal(batched.commit_steps[i], alone.commit_steps[0])
        for stat in ("forwards", "steps", "cache_writes"):
            assert getattr(batched, stat)[i] == getattr(alone, stat)[0], (i, stat)
    undecoded = (batched.canvas == 511).sum(1).tolist()
    # With eos_early_stop the rows stop after blocks 3, 2 and 4 (the last) of 1..4.
    assert undecoded == ([16, 32, 0] if eos_early_stop else [0, 0, 0])


def test_mbe_cached_matches_uncached_and_counts(tiny_hf, fixture_runs):
    fixture_prompts = [r["prompt"] for r in sorted(fixture_runs, key=lambda r: r["prompt_index"])[::5]]
    assert [len(p) for p in fixture_prompts] == [5, 16, 21]
    # The described form (surprisal windows, at most 5 edit steps, w_mask 0.5 / w_edit 0.0).
    cached = _run(tiny_hf, fixture_prompts, preset="S", mbe_window=2)
    uncached = _run(tiny_hf, fixture_prompts, preset="S", mbe_window=2, use_cache=False)
    plain = _run(tiny_hf, fixture_prompts, preset="S")
    assert cached.tokens == uncached.tokens
    np.testing.assert_array_equal(cached.canvas, uncached.canvas)
    np.testing.assert_array_equal(cached.steps, uncached.steps)
    np.testing.assert_array_equal(cached.mbe_forwards, uncached.mbe_forwards)
    # One to mbe_max_steps = 5 window forwards per decoded block (no early stop here), all counted.
    decoded_blocks = cached.canvas_lengths // B - np.array([len(p) for p in fixture_prompts]) // B
    assert (cached.mbe_forwards >= decoded_blocks).all() and (cached.mbe_forwards <= 5 * decoded_blocks).all()
    assert (cached.mbe_forwards > decoded_blocks).any()  # some window took more than one edit step
    np.testing.assert_array_equal(uncached.forwards, uncached.steps + uncached.mbe_forwards)
    np.testing.assert_array_equal(cached.forwards, cached.steps + cached.mbe_forwards + cached.cache_writes)
    assert not (cached.canvas == plain.canvas).all()  # MBE edited something in S mode
    for i, p in enumerate(fixture_prompts):
        assert cached.canvas[i, :len(p)].tolist() == p


def test_mbe_window_op_edits_only_editable_positions(tiny_hf, fixture_runs):
    """One window forward on a corrupted canvas: a PROPOSE row may change only non-prompt tokens
    of its window (the last 2 finished blocks); an idle row does not change at all."""
    config, params = tiny_hf
    run = next(r for r in fixture_runs if r["setting"] == "S" and r["prompt_index"] == 2)  # P = 21
    canvas = np.array([run["final_canvas"]] * 2, np.int32)  # [2, 80]
    rng = np.random.default_rng(0)
    canvas[:, :64] = rng.integers(0, 510, size=(2, 64))
    prompt_lens = jnp.array([21, 21])
    settings = decode.DecodeSettings(block_length=B, mask_id=511, eos_id=510, pad_id=510, greedy=True,
                                       filter_top=False, use_cache=False, mbe_window=2, mbe_select="last")
    knobs = decode.Knobs(threshold=jnp.float32(0.5), editing_threshold=jnp.float32(0.0),
                           temperature=jnp.float32(0), top_k=jnp.int32(512), top_p=jnp.float32(1),
                           penalty_lambda=jnp.float32(0), max_post_steps=jnp.int32(16),
                           eos_early_stop=jnp.bool_(False), llada20=jnp.bool_(False), mbe_max_steps=jnp.int32(1))
    zeros = jnp.zeros((2,), jnp.int32)
    state = decode.DecodeState(
        canvas=jnp.asarray(canvas), block=jnp.array([3, 3]), phase=jnp.array([decode.PROPOSE, decode.DENOISE]),
        post_steps=zeros, steps=jnp.array([40, 40]), cache_writes=zeros, mbe_forwards=zeros,
        commit_step=jnp.full(canvas.shape, -1, jnp.int32), logprob=jnp.zeros(canvas.shape, jnp.float32),
        stale=jnp.zeros((2,), bool), cache=None, **decode_loop.mbe_fields(2, 2, 80, B))
    op = jax.jit(lambda st: decode_loop._window_op(params, decode.row_keys_for(jax.random.key(0), 2), prompt_lens,
                                                jnp.array([5, 5]), knobs, st, config=config, settings=settings))
    after = op(state)
    changed = np.flatnonzero(np.asarray(after.canvas[0]) != canvas[0])
    assert changed.size > 0 and changed.min() >= 32 and changed.max() < 64, changed
    np.testing.assert_array_equal(after.canvas[1], canvas[1])
    assert (np.asarray(after.commit_step[0])[changed] == 39).all()
    assert after.mbe_forwards.tolist() == [1, 0]
    assert after.phase.tolist() == [decode.DENOISE, decode.DENOISE] and after.block.tolist() == [4, 3]


def test_sampling_top_k_1_equals_greedy(tiny_hf, fixture_runs):
    """top_k=1 makes the draw the argmax with probability 1, which is greedy decoding with both
    thresholds at 0 (every masked position filled, every disagreement edited)."""
    prompts = [r["prompt"] for r in sorted(fixture_runs, key=lambda r: r["prompt_index"])[::5]]
    greedy = _run(tiny_hf, prompts, threshold=0.0, editing_threshold=0.0)
    sampled = _run(tiny_hf, prompts, threshold=0.7, editing_threshold=0.5, temperature=1.0, top_k=1,
                   rng=jax.random.key(5))
    assert sampled.tokens == greedy.tokens
    np.testing.assert_array_equal(sampled.steps, greedy.steps)


def test_sampling_is_keyed(tiny_hf):
    prompts = _random_prompts([7, 20, 30], seed=2)
    kw = dict(preset="Q", temperature=1.0, top_k=50, top_p=0.95)
    a = _run(tiny_hf, prompts, rng=jax.random.key(1), **kw)
    b = _run(tiny_hf, prompts, rng=jax.random.key(1), **kw)
    c = _run(tiny_hf, prompts, rng=jax.random.key(2), **kw)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    assert all(0 <= t < 511 for row in a.tokens for t in row)


def test_choose_tokens_penalty_and_filters():
    settings = decode.DecodeSettings(block_length=2, mask_id=3, eos_id=2, pad_id=2, greedy=True,
                                       filter_top=False, use_cache=True, mbe_window=0)
    knobs = decode.Knobs(threshold=jnp.float32(0.5), editing_threshold=jnp.float32(0.0),
                           temperature=jnp.float32(0), top_k=jnp.int32(4), top_p=jnp.float32(1),
                           penalty_lambda=jnp.float32(2.0), max_post_steps=jnp.int32(16),
                           eos_early_stop=jnp.bool_(False), llada20=jnp.bool_(False))
    logits = jnp.array([[[3.0, 2.0, 0.0, 9.0], [3.0, 2.0, 0.0, 9.0]]])  # [1, 2, 4]; id 3 is the mask
    tok, p = decode.choose_tokens(logits, jnp.array([[0, -1]]), None, knobs, settings)
    # Position 0: token 0 is the previous token, its logit drops to 1 and token 1 wins; the mask
    # id is never chosen even with the largest logit, but its mass stays in the confidence.
    assert tok.tolist() == [[1, 0]]
    np.testing.assert_allclose(p[0, 0], jax.nn.softmax(jnp.array([1.0, 2.0, 0.0, 9.0]))[1], rtol=1e-6)
    np.testing.assert_allclose(p[0, 1], jax.nn.softmax(logits[0, 1])[0], rtol=1e-6)


def test_penalty_reduces_repeats(tiny_hf, fixture_runs):
    prompts = [r["prompt"] for r in sorted(fixture_runs, key=lambda r: r["prompt_index"])[::5]]

    def repeats(out):
        return sum(int(np.sum(np.diff(t) == 0)) for t in out.tokens)

    base = _run(tiny_hf, prompts, preset="no_edit")
    penalised = _run(tiny_hf, prompts, preset="no_edit", penalty_lambda=100.0)
    assert repeats(penalised) < repeats(base) / 2


@pytest.mark.parametrize("kwargs, field", [
    (dict(threshold=1.5), "threshold"),
    (dict(threshold=-0.1), "threshold"),
    (dict(editing_threshold=-0.5), "editing_threshold"),
    (dict(editing_threshold=float("nan")), "editing_threshold"),
    (dict(block_length=0), "block_length"),
    (dict(gen_length=0), "gen_length"),
    (dict(gen_length=5000), "max_position_embeddings"),
    (dict(mask_id=512), "mask_id"),
    (dict(eos_id=-1), "eos_id"),
    (dict(eos_id=511), "eos_id"),
    (dict(prompts=[]), "prompts"),
    (dict(prompts=[[1, 2], []]), r"prompts\[1\]"),
    (dict(prompts=[1, 2, 3]), "prompts"),
    (dict(prompts=[[1, 511]]), r"prompts\[0\]"),
    (dict(prompts=[[1, 600]]), r"prompts\[0\]"),
    (dict(preset="fast"), "preset"),
    (dict(preset=None), "threshold"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=1.0), "rng"),
    (dict(top_p=0.0, temperature=1.0, rng=jax.random.key(0)), "top_p"),
    (dict(top_k=0, temperature=1.0, rng=jax.random.key(0)), "top_k"),
    (dict(max_post_steps=-1), "max_post_steps"),
    (dict(mbe_window=-2), "mbe_window"),
    (dict(mbe_window=2, mbe_select="first"), "mbe_select"),
    (dict(mbe_window=2, mbe_max_steps=0), "mbe_max_steps"),
    (dict(mbe_window=2, mbe_threshold=1.5), "mbe_threshold"),
    (dict(mbe_window=2, mbe_editing_threshold=-0.1), "mbe_editing_threshold"),
    (dict(mbe_window=2, mbe_fraction=2.0), "mbe_fraction"),
])
def test_invalid_settings_raise(tiny_hf, kwargs, field):
    kwargs = {"prompts": [[1, 2, 3]], "preset": "Q", **kwargs}
    with pytest.raises(ValueError, match=field):
        _run(tiny_hf, **kwargs)


def test_varied_prompt_lengths_compile_few_programs(tiny_hf):
    """20 prompts of random lengths in [1, 200], one `generate` call each: the canvas is bucketed
    to a power of two of blocks and the prefill is chunked, so at most 3 programs are compiled
    (canvases of 3..15 blocks fall in the buckets 4, 8, 16)."""
    lengths = np.random.default_rng(7).integers(1, 201, size=20)
    before = decode.decode._cache_size()
    for i, n in enumerate(lengths):
        out = _run(tiny_hf, _random_prompts([int(n)], seed=100 + i), preset="S", gen_length=32)
        assert len(out.tokens[0]) <= 32 and out.canvas.shape[1] == out.canvas_lengths[0]
    assert decode.decode._cache_size() - before <= 3


def test_trajectory_cached_matches_uncached(tiny_hf, fixture_runs):
    """The write record (DiPO's trajectory) is the same on both paths, and replaying each
    position's last write gives the final canvas."""
    prompts = [r["prompt"] for r in sorted(fixture_runs, key=lambda r: r["prompt_index"])[::5]]
    cached = _run(tiny_hf, prompts, preset="Q", record_trajectory=True)
    uncached = _run(tiny_hf, prompts, preset="Q", record_trajectory=True, use_cache=False)
    for field in ("write_step", "write_token", "write_count"):
        np.testing.assert_array_equal(getattr(cached.trajectory, field), getattr(uncached.trajectory, field))
    t = cached.trajectory
    last = np.take_along_axis(t.write_token, np.maximum(t.write_count - 1, 0)[..., None], axis=-1)[..., 0]
    written = t.write_count > 0
    np.testing.assert_array_equal(last[written], cached.canvas[written])


@pytest.mark.parametrize("preset,select", [("S", "last"), ("Q", "surprisal")])
def test_mbe_block_causal_variant_cached_matches_uncached(tiny_hf, fixture_runs, preset, select):
    """REFERENCE §5's block-causal window (kept as an option), with "last" or "surprisal"
    windows: cached == uncached, with the same denoising and MBE forwards."""
    prompts = [r["prompt"] for r in sorted(fixture_runs, key=lambda r: r["prompt_index"])[::5]]
    kw = dict(preset=preset, mbe_window=2, mbe_attention="block_causal", mbe_select=select)
    cached, uncached = _run(tiny_hf, prompts, **kw), _run(tiny_hf, prompts, **kw, use_cache=False)
    assert cached.tokens == uncached.tokens
    np.testing.assert_array_equal(cached.canvas, uncached.canvas)
    np.testing.assert_array_equal(cached.forwards - cached.cache_writes, uncached.forwards)


def test_logprobs_equal_an_uncached_forward_at_the_commit_step(tiny_hf, fixture_runs):
    """Each answer token's recorded log-probability is log softmax of a plain block-causal forward
    over the canvas as it stood before the step that wrote it (rebuilt from the write record: each
    position's last write at an earlier step), at that token; Q mode, so edits are included."""
    config, params = tiny_hf
    prompts = [r["prompt"] for r in sorted(fixture_runs, key=lambda r: r["prompt_index"])[::5]]
    out = _run(tiny_hf, prompts, preset="Q", record_trajectory=True)
    t = out.trajectory
    forward = jax.jit(lambda c: jax.nn.log_softmax(model.forward(params, config, c, mask=masks.block_causal(
        c.shape[1], B)), axis=-1))
    checked = 0
    for r, prompt in enumerate(prompts):
        p = len(prompt)
        assert len(out.logprobs[r]) == len(out.tokens[r])
        for s in sorted(set(out.commit_steps[r])):
            before = out.canvas[r].copy()
            before[p:] = 511  # mask id
            for pos in range(p, before.shape[0]):
                earlier = [w for w in range(t.write_count[r, pos]) if t.write_step[r, pos, w] < s]
                if earlier:
                    before[pos] = t.write_token[r, pos, earlier[-1]]
            logp = np.asarray(forward(jnp.asarray(before[None])))[0]
            for i in np.flatnonzero(np.array(out.commit_steps[r]) == s):
                want = logp[p + i, out.tokens[r][i]]
                np.testing.assert_allclose(out.logprobs[r][i], want, rtol=1e-5, atol=1e-5, err_msg=(r, i, s))
                checked += 1
    assert checked == sum(map(len, out.tokens))
    assert all(lp <= 0 for row in out.logprobs for lp in row) and min(min(row) for row in out.logprobs) < -0.1


def test_mbe_surprisal_window_takes_the_most_uncertain_history_blocks():
    """`choose_window`: the watermark keeps ceil(mbe_fraction x history) blocks, the window the most
    uncertain of them (by mean -log p of their generated tokens), the new block last; "last" takes
    the blocks just before it; prompt-only blocks are never reopened."""
    n, nb = 2, 8
    logprob = np.zeros((n, nb * B), np.float32)
    for blk, lp in ((1, -0.5), (2, -3.0), (3, -2.0), (4, -0.1), (5, -9.0)):  # block 5 is not history yet
        logprob[:, blk * B:(blk + 1) * B] = lp
    state = decode.DecodeState(
        canvas=jnp.zeros((n, nb * B), jnp.int32), block=jnp.array([5, 5]), phase=jnp.zeros((n,), jnp.int32),
        post_steps=None, steps=None, cache_writes=None, mbe_forwards=None, commit_step=None,
        logprob=jnp.asarray(logprob), stale=None, cache=None)
    prompt_lens = jnp.array([20, 40])  # row 1: blocks 0-1 are prompt, block 2 holds its first answer tokens

    def window(select, width, fraction):
        settings = decode.DecodeSettings(block_length=B, mask_id=511, eos_id=510, pad_id=510, greedy=True,
                                         filter_top=False, use_cache=True, mbe_window=width, mbe_select=select)
        knobs = decode.make_knobs(512, threshold=0.5, editing_threshold=0.0, mbe_fraction=fraction)
        w, ok = decode_loop.choose_window(state, prompt_lens, knobs, settings, width)
        return [sorted(set(np.asarray(w[r])[np.asarray(ok[r])].tolist())) for r in range(n)]

    # history: row 0 blocks 1-4 (4 blocks: the top 25% is 1 block), row 1 blocks 2-4 (3: 1 block)
    assert window("surprisal", 2, 0.25) == [[2, 5], [2, 5]]
    assert window("surprisal", 3, 0.25) == [[2, 5], [2, 5]]  # the watermark admits only one
    assert window("surprisal", 3, 0.5) == [[2, 3, 5], [2, 3, 5]]
    assert window("surprisal", 3, 0.0) == [[5], [5]]  # nothing above the watermark: the new block alone
    assert window("last", 3, 0.25) == [[3, 4, 5], [3, 4, 5]]
    assert window("last", 5, 0.25) == [[1, 2, 3, 4, 5], [2, 3, 4, 5]]


def test_mbe_kv_of_unchanged_history_blocks_is_kept_bit_for_bit(tiny_hf, fixture_runs):
    """Step by step through a cached S-mode decode with surprisal windows (3 blocks): at the end of
    every window, the K/V of each history block before the first one an edit changed are the
    bits they held when the window opened (a window that changed nothing writes no history K/V),
    and the final cache equals a fresh block-causal prefill of the final canvas."""
    config, params = tiny_hf
    prompts = [r["prompt"] for r in sorted(fixture_runs, key=lambda r: r["prompt_index"])[::5]]
    n, length = 3, 80
    canvas = np.full((n, length), 511, np.int32)
    for i, p in enumerate(prompts):
        canvas[i, :len(p)] = p
    prompt_lens = jnp.array([len(p) for p in prompts])
    settings = decode.DecodeSettings(block_length=B, mask_id=511, eos_id=510, pad_id=510, greedy=True,
                                     filter_top=False, use_cache=True, mbe_window=3)
    knobs = decode.make_knobs(512, threshold=0.5, editing_threshold=0.0)
    num_blocks = jnp.full((n,), length // B)
    state = decode.init_state(params, jnp.asarray(canvas), prompt_lens, config=config, settings=settings)
    step = jax.jit(lambda st: decode.step(params, st, prompt_lens, num_blocks, knobs,
                                          decode.row_keys_for(jax.random.key(0), n), config=config,
                                          settings=settings))

    def kv(st):
        return np.concatenate([np.asarray(st.cache[g][x]) for g in st.cache for x in ("k", "v")], axis=0)

    from llada_jax.decode import kvcache
    prefill = jax.jit(lambda c, nbk: kvcache.prefill(params, config, c, nbk, kvcache.init_cache(config, n, length),
                                                     block_length=B, chunk_blocks=8,
                                                     prefix_buckets=kvcache.buckets(length // B)))
    opened = {}  # row -> (block, canvas, kv) when its window opened
    checked = kept_blocks = 0
    while (np.asarray(state.phase) != decode.DONE).any():
        before = state
        state = step(state)
        for r in range(n):
            ph0, ph1 = int(before.phase[r]), int(state.phase[r])
            if ph1 == decode.PROPOSE and ph0 == decode.DENOISE:
                opened[r] = (int(state.block[r]), np.asarray(state.canvas[r]), kv(state)[:, r])
            if r in opened and ph1 in (decode.DENOISE, decode.DONE) and ph0 != decode.DENOISE:
                blk, canvas0, kv0 = opened.pop(r)
                diff = np.flatnonzero(np.asarray(state.canvas[r]) != canvas0)
                first_changed = int(diff.min()) // B if diff.size else blk
                upto = first_changed * B  # every block before the first changed one
                np.testing.assert_array_equal(kv(state)[:, r, :upto], kv0[:, :upto], err_msg=f"row {r} block {blk}")
                checked += 1
                kept_blocks += first_changed - int(prompt_lens[r]) // B
                if ph1 == decode.DENOISE:  # going on: the cache up to the new block is clean again
                    fresh = prefill(state.canvas, jnp.full((n,), blk + 1))
                    for g in fresh:
                        for x in ("k", "v"):
                            assert_close_to_scale(state.cache[g][x][:, r, :(blk + 1) * B],
                                                  fresh[g][x][:, r, :(blk + 1) * B], rel=1e-4)
    assert checked >= 6 and kept_blocks > 0, (checked, kept_blocks)
