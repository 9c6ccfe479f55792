"""The continuous-batching engine (llada_jax.decode.engine) against its oracle, `generate` run one
request at a time: token for token, with requests of random lengths and mixed knobs arriving
while others decode, and with a bounded number of compiled programs."""

import jax
import numpy as np
import pytest

from llada_jax import decode
from llada_jax.decode import engine

B, GEN = 16, 32


def _requests(n, seed, max_len=100):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = rng.integers(0, 510, size=int(rng.integers(1, max_len + 1))).tolist()
        opts = dict(gen_length=GEN, block_length=B, preset=["S", "Q", "no_edit"][i % 3],
                    eos_early_stop=bool(i % 2), max_post_steps=int(rng.integers(2, 17)))
        out.append((prompt, opts))
    return out


def _alone(tiny_hf, prompt, opts, **kw):
    config, params = tiny_hf
    return decode.generate(params, config, [prompt], **opts, **kw)


def test_engine_matches_one_by_one_with_arrivals(tiny_hf):
    """32 requests arrive over time (a few per poll) into 4 slots; each answer, its statistics and
    its streamed blocks equal what `generate` gives the request alone."""
    config, params = tiny_hf
    eng = engine.Engine(params, config, slots=4, max_length=160, block_length=B, steps_per_call=4)
    reqs = _requests(32, seed=0)
    streamed, results, ids = {}, {}, []
    arrivals = np.random.default_rng(1).integers(0, 4, size=64)
    pending = list(reqs)
    t = 0
    while pending or not eng.idle:
        for _ in range(int(arrivals[t % 64]) if t else 6):
            if pending:
                prompt, opts = pending.pop(0)
                k = len(ids)
                ids.append(eng.submit(prompt, opts, on_block=lambda toks, k=k: streamed.setdefault(k, []).extend(toks)))
        t += 1
        for r in eng.poll():
            results[r.id] = r
    assert eng.compiled_programs() <= 2  # one admit program, one run program, for every length
    for k, (prompt, opts) in enumerate(reqs):
        got, want = results[ids[k]], _alone(tiny_hf, prompt, opts)
        assert got.tokens == want.tokens[0], k
        assert streamed.get(k, []) == got.tokens, k
        np.testing.assert_array_equal(got.canvas, want.canvas[0, :want.canvas_lengths[0]])
        assert got.commit_steps == want.commit_steps[0], k
        np.testing.assert_allclose(got.logprobs, want.logprobs[0], rtol=1e-5, atol=1e-5, err_msg=str(k))
        for stat in ("forwards", "steps", "cache_writes", "mbe_forwards", "num_generated"):
            assert getattr(got, stat) == getattr(want, stat)[0], (k, stat)


def test_engine_mbe_matches_one_by_one(tiny_hf):
    """With a Multi-Block Editing window (surprisal windows; a request may turn it off or set its
    own edit-step cap and thresholds), still request-for-request."""
    config, params = tiny_hf
    eng = engine.Engine(params, config, slots=3, max_length=128, block_length=B, mbe_window=2)
    reqs = [(p, dict(o, mbe_window=2 if i % 3 else 0, mbe_max_steps=[5, 2][i % 2],
                     mbe_editing_threshold=[0.0, 0.3][i % 2], mbe_fraction=[0.25, 1.0][i % 2]))
            for i, (p, o) in enumerate(_requests(6, seed=2, max_len=60))]
    for (prompt, opts), got in zip(reqs, eng.run(reqs)):
        want = _alone(tiny_hf, prompt, opts)
        assert got.tokens == want.tokens[0]
        assert (got.forwards, got.mbe_forwards) == (want.forwards[0], want.mbe_forwards[0])


def test_cancel_frees_the_slot_for_the_next_request(tiny_hf):
    """One slot: a running request is cancelled after one call, the waiting one takes its slot
    and decodes exactly as alone; a cancelled request gets no Result and no more blocks."""
    config, params = tiny_hf
    eng = engine.Engine(params, config, slots=1, max_length=128, block_length=B, steps_per_call=2)
    (p1, o1), (p2, o2), (p3, o3) = _requests(3, seed=3, max_len=40)
    long = dict(o1, gen_length=64, threshold=1.0, editing_threshold=1.0)  # one token per forward
    streamed = []
    first = eng.submit(p1, long, on_block=streamed.extend)
    second = eng.submit(p2, o2)
    third = eng.submit(p3, o3)
    assert eng.poll() == [] and eng.forwards == 2
    assert eng.cancel(third) and eng.cancel(first)  # one waiting, one running
    assert not eng.cancel(first) and not eng.cancel(12345)
    results = []
    while not eng.idle:
        results += eng.poll()
    assert [r.id for r in results] == [second] and streamed == []
    want = _alone(tiny_hf, p2, o2)
    assert results[0].tokens == want.tokens[0] and results[0].forwards == want.forwards[0]
    # The cancelled request took no forward after its cancel (the prefill is no loop iteration).
    assert eng.forwards == 2 + want.forwards[0] - (len(p2) >= B)


@pytest.mark.parametrize("opts, field", [
    (dict(block_length=32), "block_length"),
    (dict(mbe_window=3), "mbe_window"),
    (dict(mbe_select="last"), "mbe_select"),
    (dict(temperature=0.5), "temperature"),
    (dict(gen_length=400), "gen_length"),
    (dict(threshold="high"), "threshold"),
])
def test_engine_rejects_bad_requests(tiny_hf, opts, field):
    config, params = tiny_hf
    eng = engine.Engine(params, config, slots=2, max_length=128, block_length=B)
    with pytest.raises(decode.OptionError, match=field):
        eng.submit([1, 2, 3], dict(dict(gen_length=GEN, preset="S"), **opts))


def test_quantized_engine_equals_quantized_generate(tiny_hf):
    """Weights stored int8 (model.quant): the engine's answers, statistics and log-probs equal
    `generate`'s on the same quantized weights. In fp32 compute: in bf16 the two programs' shapes
    differ (slots x max_length against a power-of-two canvas) and so does their rounding, which
    flips argmaxes of this random model with or without quantization."""
    from llada_jax.model import quant

    config, params = tiny_hf
    qparams = quant.quantize_params(params, "int8", block_size=16)
    eng = engine.Engine(qparams, config, slots=2, max_length=96, block_length=B)
    reqs = _requests(2, seed=5, max_len=40)
    for (prompt, opts), got in zip(reqs, eng.run(reqs)):
        want = decode.generate(qparams, config, [prompt], **opts)
        assert got.tokens == want.tokens[0]
        assert (got.forwards, got.steps) == (want.forwards[0], want.steps[0])
        np.testing.assert_allclose(got.logprobs, want.logprobs[0], rtol=1e-5, atol=1e-5)


def test_the_kv_cache_follows_the_compute_dtype(tiny_hf):
    config, params = tiny_hf
    for dtype in ("bfloat16", "float32"):
        eng = engine.Engine(params, config.replace(dtype=dtype), slots=2, max_length=96, block_length=B)
        assert {x.dtype for x in jax.tree.leaves(eng._slots.state.cache)} == {np.dtype(dtype)}


def test_engine_on_a_tensor_and_expert_mesh_equals_one_device(tiny_hf):
    """8 fake devices, tensor=2 x expert=4: weights sharded by the training rule table, slots over
    the batch axes; greedy answers equal the one-device engine's, token for token."""
    from llada_jax.model import abstract_params
    from llada_jax.parallel import sharding

    config, params = tiny_hf
    mesh = sharding.make_mesh(data=1, fsdp=1, tensor=2, expert=4)
    sharded = jax.device_put(params, sharding.param_shardings(abstract_params(config), mesh))
    assert sharded["moe_layers"]["moe"]["wi_gate"].sharding.spec[1] == "expert"  # [L, E, D, F]: experts split
    reqs = _requests(4, seed=7, max_len=40)
    one = engine.Engine(params, config, slots=4, max_length=96, block_length=B).run(reqs)
    eng = engine.Engine(sharded, config, slots=4, max_length=96, block_length=B, mesh=mesh)
    assert eng._slots.state.canvas.sharding.spec[0] == "expert"  # rows over the batch axes
    got = eng.run(reqs)
    for a, b in zip(got, one):
        assert a.tokens == b.tokens and a.forwards == b.forwards
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-4, atol=1e-4)
    with pytest.raises(decode.OptionError, match="slots: expected a multiple of the mesh's batch axes"):
        engine.Engine(sharded, config, slots=2, max_length=96, block_length=B, mesh=mesh)
