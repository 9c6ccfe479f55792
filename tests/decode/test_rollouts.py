"""Group rollouts (llada_jax.decode.rollouts) against their oracle, `generate` over the repeated rows:
the shared prefill writes the cache of separate prefills bit for bit, and the rollouts (greedy,
sampled with the same keys, with DiPO's write record) are `generate`'s row for row while the batch
shrinks as rows stop at their EOS. Same shapes as test_decoding.py (16-token blocks, 48 new tokens,
80-token canvases), so the programs are few."""

import jax
import numpy as np
import pytest

from helpers import assert_close_to_scale

from llada_jax import decode
from llada_jax.decode import kvcache, rollouts

B, GEN, G = 16, 48, 3


@pytest.fixture(scope="module")
def prompts(fixture_dir):
    import json
    import os

    with open(os.path.join(fixture_dir, "generate.json")) as f:
        runs = json.load(f)["runs"]
    fixture = sorted({r["prompt_index"]: r["prompt"] for r in runs}.items())
    rng = np.random.default_rng(3)
    # The fixture's prompts (P = 5, 16, 21: with and without a full prompt block) and a random one.
    return [p for _, p in fixture] + [rng.integers(0, 510, size=30).tolist()]


def test_shared_prefill_equals_separate_prefills(tiny_hf, prompts):
    """Each of a group's G cache rows is the prompt's own prefill bit for bit (the P distinct
    prompts through `kvcache.prefill`, repeated), and that equals the P x G separate prefills of
    the repeated rows to fp32 rounding: XLA:CPU's matmuls round differently for a different
    number of rows (measured: 4.5e-6 at most on values of magnitude ~3), which is why the
    rollouts' test compares decoded tokens, where it does not show."""
    config, params = tiny_hf
    canvas, lens, _ = decode.generation.prepare_canvas(prompts, config, gen_length=GEN, block_length=B, mask_id=511)

    def prefill(p, c, n):
        return kvcache.prefill(p, config, c, n // B, kvcache.init_cache(config, c.shape[0], c.shape[1]),
                               block_length=B, chunk_blocks=8, prefix_buckets=kvcache.buckets(c.shape[1] // B))

    shared = jax.jit(lambda p, c, n: rollouts.prefill_groups(p, config, c, n, group_size=G, block_length=B))(
        params, canvas, lens)
    distinct = jax.jit(prefill)(params, canvas, lens)
    separate = jax.jit(prefill)(params, np.repeat(canvas, G, axis=0), np.repeat(lens, G))
    leaves = jax.tree_util.tree_leaves
    assert len(leaves(shared)) == len(leaves(separate)) == 4
    for a, d, s in zip(leaves(shared), leaves(distinct), leaves(separate)):
        a, d, s = np.asarray(a), np.asarray(d), np.asarray(s)
        assert a.shape == s.shape and a.shape[1] == len(prompts) * G
        np.testing.assert_array_equal(a, np.repeat(d, G, axis=1))
        assert_close_to_scale(a, s, rel=1e-6)
        assert np.abs(a).max() > 0


def _same(got, want, rows):
    assert got.tokens == want.tokens
    assert got.commit_steps == want.commit_steps
    np.testing.assert_array_equal(got.canvas, want.canvas)
    np.testing.assert_array_equal(got.canvas_lengths, want.canvas_lengths)
    for stat in ("forwards", "steps", "cache_writes", "mbe_forwards", "num_generated"):
        np.testing.assert_array_equal(getattr(got, stat), getattr(want, stat), err_msg=stat)
    for a, b in zip(got.logprobs, want.logprobs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert len(got.tokens) == rows


def test_batch_sizes_step_down_evenly_and_check_their_arguments():
    assert rollouts.batch_sizes(128) == (128, 112, 96, 80, 64, 48, 32, 16)
    assert rollouts.batch_sizes(64) == (64, 56, 48, 40, 32, 24, 16, 8)
    assert rollouts.batch_sizes(256, min_rows=8) == (256, 224, 192, 160, 128, 96, 64, 32)
    assert rollouts.batch_sizes(96, min_rows=16) == (96, 80, 64, 48, 32, 16)  # steps of whole mesh ways
    assert rollouts.batch_sizes(96, min_rows=16, levels=4) == (96, 64, 32)  # 96 // 4 rounded up to ways
    assert rollouts.batch_sizes(12) == (12, 8, 4)  # at least `min_step` rows a step
    assert rollouts.batch_sizes(3) == (3,)
    with pytest.raises(decode.OptionError, match="rows: expected a multiple of min_rows=8, found 12"):
        rollouts.batch_sizes(12, min_rows=8)
    with pytest.raises(decode.OptionError, match="levels: expected an integer >= 1, found 0"):
        rollouts.batch_sizes(12, levels=0)


@pytest.mark.parametrize("sampled", [False, True])
def test_group_rollouts_equal_generate(tiny_hf, prompts, sampled, monkeypatch):
    """G rollouts of each prompt, early-stopped and compacted, equal `generate` over the repeated
    rows with eos_early_stop (everything) and without it (the answers); `on_finish` reports each
    row once, with its answer; DiPO's write record (sampled) is the same record. Every segment of
    the loop runs in the smallest batch size that holds the rows still running when it starts."""
    config, params = tiny_hf
    rows = [p for p in prompts for _ in range(G)]
    kw = dict(gen_length=GEN, block_length=B, preset="S")
    if sampled:
        kw.update(temperature=1.0, rng=jax.random.key(7), record_trajectory=True)
    segments = []  # (batch size, rows running at the start)
    segment = rollouts._segment

    def recording_segment(params, state, *args, **kwargs):
        segments.append((state.phase.shape[0], int((np.asarray(state.phase) != rollouts.DONE).sum())))
        return segment(params, state, *args, **kwargs)

    monkeypatch.setattr(rollouts, "_segment", recording_segment)
    finished = []
    got = rollouts.generate_groups(params, config, prompts, group_size=G, steps_per_call=2,
                                   on_finish=lambda r, toks: finished.append((r, toks)), **kw)
    sizes = rollouts.batch_sizes(len(rows))
    assert sizes == (12, 8, 4)
    assert all(size == min(s for s in sizes if s >= live) for size, live in segments), segments
    assert len({size for size, _ in segments}) >= 2, segments
    want = decode.generate(params, config, rows, eos_early_stop=True, **kw)
    _same(got, want, len(rows))
    assert sorted(r for r, _ in finished) == list(range(len(rows)))
    assert all(toks == got.tokens[r] for r, toks in finished)
    full = decode.generate(params, config, rows, eos_early_stop=False, **kw)
    assert got.tokens == full.tokens
    # Rows stopped at different blocks (what the compaction is for), and sampled rows of a group differ.
    undecoded = [int((got.canvas[i, :n] == config.mask_token_id).sum()) for i, n in enumerate(got.canvas_lengths)]
    assert len(set(undecoded)) > 1 and min(undecoded) < max(undecoded) - B // 2, undecoded
    if sampled:
        assert len({tuple(t) for t in got.tokens}) > len(prompts)
        for f in ("write_step", "write_token", "write_count", "prompt_lengths"):
            np.testing.assert_array_equal(getattr(got.trajectory, f), getattr(want.trajectory, f), err_msg=f)
    else:
        assert all(got.tokens[i] == got.tokens[i - i % G] for i in range(len(rows)))


def test_bad_group_options_name_the_field(tiny_hf):
    config, params = tiny_hf
    with pytest.raises(decode.OptionError, match="group_size: expected an integer >= 1, found 0"):
        rollouts.generate_groups(params, config, [[1, 2]], group_size=0, gen_length=GEN, block_length=B, preset="S")
    with pytest.raises(decode.OptionError, match="rng: expected a PRNG key"):
        rollouts.generate_groups(params, config, [[1, 2]], group_size=2, gen_length=GEN, block_length=B, preset="S",
                                 temperature=1.0)


def test_a_slice_of_the_rows_from_its_row_offset_draws_what_the_whole_batch_draws(tiny_hf, prompts):
    """A process decoding its slice of a global batch (the RL loop on several processes: its own
    prompts on its own devices) passes the index of its first row: its sampled rollouts are
    those rows of one decode of every row."""
    config, params = tiny_hf
    kw = dict(gen_length=GEN, block_length=B, preset="S", temperature=1.0, rng=jax.random.key(7))
    whole = rollouts.generate_groups(params, config, prompts, group_size=G, **kw)
    part = rollouts.generate_groups(params, config, prompts[2:], group_size=G, row_offset=2 * G, **kw)
    assert part.tokens == whole.tokens[2 * G:]
    np.testing.assert_array_equal(part.canvas, whole.canvas[2 * G:, :part.canvas.shape[1]])
    from_zero = rollouts.generate_groups(params, config, prompts[2:], group_size=G, **kw)
    assert from_zero.tokens != part.tokens  # the offset is what lines the draws up
    with pytest.raises(decode.OptionError, match="row_offset: expected an integer >= 0, found -1"):
        rollouts.generate_groups(params, config, prompts, group_size=G, row_offset=-1, **kw)
