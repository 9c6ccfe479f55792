"""The prefix cache across requests (llada_jax.decode.prefix_cache) and the engine over it: the
radix tree against hand-worked lookups and LRU evictions; the engine with the cache gives the
same answers, statistics and log-probs as without it (and as `generate` alone) for prompts that
share whole blocks, reports the skipped prompt tokens, and stays exact when a tiny budget evicts
entries; the tighter prefix-read buckets leave the decoder's answers unchanged."""

import jax
import numpy as np
import pytest

from llada_jax import decode
from llada_jax.decode import engine, kvcache
from llada_jax.decode.prefix_cache import PrefixCache, block_bytes

B, GEN = 16, 32


def _kv(tag, nbytes_per_array=8):
    """A fake block K/V pytree whose values say which block it was made for."""
    x = np.full((nbytes_per_array // 4,), tag, np.float32)
    return {"dense": {"k": x, "v": x.copy()}}


def test_radix_tree_matches_whole_blocks_and_evicts_lru_leaves():
    b = 2
    cache = PrefixCache(b, budget_bytes=4 * 16)  # four blocks of 16 bytes
    a = [1, 2, 3, 4, 5, 6, 7]  # blocks (1,2) (3,4) (5,6); 7 is a partial block, never stored
    assert cache.match(a) == [] and cache.misses == 1
    assert cache.insert(a, 0, lambda j: _kv(10 + j)) == 3
    assert block_bytes(_kv(0)) == 16 and cache.nbytes == 48 and len(cache) == 3
    got = cache.match([1, 2, 3, 4, 9, 9])  # shares two whole blocks
    assert [int(kv["dense"]["k"][0]) for kv in got] == [10, 11] and cache.hits == 1
    assert cache.cached_blocks([1, 2, 3]) == 1 and cache.cached_blocks([2, 1]) == 0
    # A branch off the first block: one more block fits, the next one evicts the LRU leaf, (5,6)
    # (the (3,4) path was touched by the lookup above, after (5,6) was).
    assert cache.insert([1, 2, 8, 8, 9, 9], 1, lambda j: _kv(20 + j)) == 2
    assert cache.evictions == 1 and cache.nbytes == 64
    assert sorted(cache.keys()) == sorted([((1, 2),), ((1, 2), (3, 4)), ((1, 2), (8, 8)), ((1, 2), (8, 8), (9, 9))])
    assert cache.cached_blocks(a) == 2
    # Only leaves go, least recently used first, and never the path being extended.
    cache.match([1, 2, 3, 4])
    assert cache.insert([1, 2, 3, 4, 5, 6], 2, lambda j: _kv(30 + j)) == 1
    assert cache.cached_blocks([1, 2, 8, 8, 9, 9]) == 2  # (9,9) was the LRU leaf
    # A budget below one block stores nothing; a bad budget names the field.
    small = PrefixCache(b, budget_bytes=15)
    assert small.insert(a, 0, lambda j: _kv(j)) == 0 and len(small) == 0
    with pytest.raises(decode.OptionError, match="prefix_cache_bytes: expected an integer >= 0"):
        PrefixCache(b, budget_bytes=-1)
    with pytest.raises(ValueError, match="must be cached"):
        PrefixCache(b, 1 << 10).insert(a, 1, lambda j: _kv(j))


def _shared_prefix_requests(seed, n=6):
    """Prompts behind one 3-block system prompt (some end inside it, on a block boundary, or after it)."""
    rng = np.random.default_rng(seed)
    system = rng.integers(0, 510, size=3 * B).tolist()
    tails = [0, 5, B, 2 * B + 3, 7, 1]
    reqs = []
    for i in range(n):
        prompt = system[:2 * B + 3] if i == 5 else system + rng.integers(0, 510, size=tails[i]).tolist()
        reqs.append((prompt, dict(gen_length=GEN, block_length=B, preset=["S", "Q"][i % 2], max_post_steps=4)))
    return reqs


def _check_equal(got, want):
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.tokens == b.tokens, k
        np.testing.assert_array_equal(a.canvas, b.canvas)
        assert a.commit_steps == b.commit_steps, k
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5, err_msg=str(k))
        for stat in ("forwards", "steps", "cache_writes", "mbe_forwards", "num_generated"):
            assert getattr(a, stat) == getattr(b, stat), (k, stat)


def _engines(tiny_hf, budget, **kw):
    """The engine without a cache and one with a cache of `budget` bytes (one shape for every test
    here, so the compiled programs are shared through the persistent cache)."""
    config, params = tiny_hf
    plain = engine.Engine(params, config, slots=2, max_length=160, block_length=B)
    return plain, engine.Engine(params, config, slots=2, max_length=160, block_length=B,
                                prefix_cache_bytes=budget, prefix_growth=1.0, **kw)


def test_engine_with_prefix_cache_equals_without(tiny_hf):
    """Six requests behind one system prompt, two slots: with the cache, the later ones skip the
    shared whole blocks (cached_tokens) and every answer equals the engine's without a cache,
    and `generate`'s alone; two programs still serve every hit length. The cached engines here also
    read the prefix in per-block buckets (growth 1.0) where the plain one doubles: same answers."""
    config, params = tiny_hf
    reqs = _shared_prefix_requests(0)
    plain_engine, eng = _engines(tiny_hf, 1 << 20)
    plain = plain_engine.run(reqs)
    got = eng.run(reqs)
    _check_equal(got, plain)
    for (prompt, opts), a in zip(reqs, got):
        want = decode.generate(params, config, [prompt], **opts)
        assert a.tokens == want.tokens[0]
    assert all(r.cached_tokens == 0 for r in plain)
    # Slot 0 and slot 1 are admitted in one poll: the second already finds the first's 3 blocks.
    assert [r.cached_tokens for r in got] == [0, 3 * B, 3 * B, 3 * B, 3 * B, 2 * B]
    assert eng.compiled_programs() <= 2
    assert eng.prefix_cache.hits == 5 and eng.prefix_cache.misses == 1
    # The entries are the prefill's K/V of those blocks (what a request alone computes).
    blocks = eng.prefix_cache.match(reqs[3][0])
    assert len(blocks) == 5  # the system prompt's 3 blocks and request 3's own 2
    plain_engine.submit(*reqs[3])  # alone: a prefill of all its blocks, into slot 0
    plain_engine.poll()
    row = np.asarray(plain_engine._slots.state.cache["moe"]["k"][:, 0])
    for j, kv in enumerate(blocks):
        np.testing.assert_allclose(kv["moe"]["k"], row[:, j * B:(j + 1) * B], rtol=1e-5, atol=1e-5)


def test_prefix_cache_under_a_tiny_budget_evicts_lru_and_stays_exact(tiny_hf):
    """A budget of three blocks and prompts [s, a], [s, b], [s, c], [s, a] (+ a partial block):
    the third evicts (s, a), the least recently used leaf, and the fourth then finds only s and
    evicts (s, b); every answer equals the engine's without a cache."""
    config, _ = tiny_hf
    rng = np.random.default_rng(1)
    s, a, b, c = (rng.integers(0, 510, size=B).tolist() for _ in range(4))
    reqs = [(s + x + rng.integers(0, 510, size=5).tolist(), dict(gen_length=GEN, block_length=B, preset="S"))
            for x in (a, b, c, a)]
    one_block = B * sum(  # K and V of every layer of one block
        x.shape[0] * x.shape[3] * x.shape[4] * x.dtype.itemsize for x in jax.tree.leaves(kvcache.init_cache(config, 1, B)))
    plain, eng = _engines(tiny_hf, 3 * one_block)
    plain = plain.run(reqs)
    got = eng.run(reqs)
    _check_equal(got, plain)
    assert [r.cached_tokens for r in got] == [0, B, B, B]
    cache = eng.prefix_cache
    assert cache.evictions == 2 and cache.nbytes == 3 * one_block
    key = lambda blocks: tuple(tuple(x) for x in blocks)  # noqa: E731
    assert sorted(cache.keys()) == sorted([key([s]), key([s, c]), key([s, a])])


def test_tighter_prefix_buckets():
    assert kvcache.buckets(16) == (0, 1, 2, 4, 8, 16)
    assert kvcache.buckets(32, growth=1.25) == (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 18, 22, 27, 32)
    assert kvcache.buckets(6, growth=1.0) == (0, 1, 2, 3, 4, 5, 6)
    bounded = kvcache.buckets(64, growth=1.0, max_buckets=12)
    assert len(bounded) <= 12 and bounded[0] == 0 and bounded[-1] == 64
    assert all(b2 > b1 for b1, b2 in zip(bounded, bounded[1:]))
    with pytest.raises(decode.OptionError, match="prefix_growth: expected a number >= 1.0"):
        kvcache.buckets(8, growth=0.5)
    with pytest.raises(decode.OptionError, match="prefix_max_buckets"):
        kvcache.buckets(8, max_buckets=2)
