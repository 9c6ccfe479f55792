"""The OpenAI-compatible server (llada_jax.serve.server, launch/serve.py) driven by the official
`openai` client over 127.0.0.1: answers equal `generate` one request at a time, also for 8
concurrent clients sharing the engine; streaming sends finished blocks; a client that disconnects
frees its slot; `stop`, `n`, `logprobs` and `usage` as OpenAI defines them (`cached_tokens` from
the prefix cache on a repeated prompt); /health turns 503 when
the engine fails; bad fields get HTTP 400; the launcher serves the README's quickstart command."""

import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from helpers import xla_flags
from llada_jax import decode  # noqa: E402
from llada_jax.decode import engine
from llada_jax.serve import server
from llada_jax.data.tokenizer import build_task_tokenizer  # noqa: E402

B = 16


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(api):
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(api.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    return client, srv, thread


@pytest.fixture(scope="module")
def served(tiny_hf):
    config, params = tiny_hf
    tok = build_task_tokenizer()
    # With a prefix cache: every equality to `generate` below also holds through it.
    eng = engine.Engine(params, config, slots=4, max_length=128, block_length=B, steps_per_call=4,
                        mask_id=tok.mask_id, eos_id=tok.eos_id, prefix_cache_bytes=1 << 20)
    api = server.App(eng, tok, model_name="tiny", default_max_tokens=32)
    client, srv, thread = _serve(api)
    yield client, tok, api
    srv.should_exit = True
    thread.join(timeout=30)


def _alone(tiny_hf, prompt, **kw):
    config, params = tiny_hf
    kw = dict(dict(gen_length=32, block_length=B, preset="Q", eos_early_stop=True), **kw)
    return decode.generate(params, config, [prompt], **kw).tokens[0]


def test_completions_and_chat_equal_generate(served, tiny_hf):
    client, tok, _ = served
    resp = client.completions.create(model="tiny", prompt="12+34=", max_tokens=32, extra_body={"mode": "S"})
    llada = resp.model_extra["llada"]
    assert llada["tokens"] == _alone(tiny_hf, tok.encode("12+34="), preset="S")
    assert resp.choices[0].text == tok.decode([t for t in llada["tokens"] if t != tok.eos_id],
                                              skip_special_tokens=True)
    assert resp.usage.completion_tokens == len(llada["tokens"])

    messages = [{"role": "user", "content": "What is 7+8?"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=48,
                                          extra_body={"threshold": 0.6, "max_post_steps": 4})
    want = _alone(tiny_hf, tok.encode_chat(messages, add_generation_prompt=True), gen_length=48, threshold=0.6,
                  max_post_steps=4)
    assert chat.model_extra["llada"]["tokens"] == want
    assert chat.choices[0].message.role == "assistant"
    raw = client.chat.completions.create(model="tiny", messages=messages, max_tokens=32, extra_body={"raw": True})
    assert raw.model_extra["llada"]["tokens"] == _alone(tiny_hf, tok.encode("What is 7+8?"))


def test_streaming_sends_blocks_that_add_up(served):
    client, _, _ = served
    messages = [{"role": "user", "content": "Tell me a story"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=64,
                                           extra_body={"mode": "S", "eos_early_stop": False})
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=64, stream=True,
                                                 extra_body={"mode": "S", "eos_early_stop": False}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(deltas) >= 2  # several blocks, sent as they finished
    assert "".join(deltas) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    streamed = list(client.completions.create(model="tiny", prompt="abc", max_tokens=32, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == client.completions.create(
        model="tiny", prompt="abc", max_tokens=32).choices[0].text


@pytest.mark.parametrize("extra, field", [
    ({"threshold": 2.0}, "threshold"),
    ({"mode": "fast"}, "mode"),
    ({"block_length": 32}, "block_length"),
    ({"max_tokens": 500}, "max_tokens"),
    ({"raw": "yes"}, "raw"),
    ({"n": 0}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"logprobs": True, "top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "stream": True}, "logprobs"),
])
def test_bad_request_names_the_field(served, extra, field):
    client, _, _ = served
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       extra_body=extra)
    assert err.value.status_code == 400
    assert err.value.body["param"] == field, err.value.body


def test_concurrent_clients_equal_one_by_one(served, tiny_hf):
    """8 clients at once on 4 slots: every answer equals `generate` for that prompt alone."""
    client, tok, _ = served
    rng = np.random.default_rng(0)
    prompts = ["".join(map(str, rng.integers(0, 10, size=int(rng.integers(2, 60))))) for _ in range(8)]
    modes = ["S", "Q"] * 4

    def ask(i):
        r = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=32, extra_body={"mode": modes[i]})
        return r.model_extra["llada"]["tokens"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    for i, got in enumerate(answers):
        assert got == _alone(tiny_hf, tok.encode(prompts[i]), preset=modes[i]), i


def _wait(predicate, seconds=120):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_stream_disconnect_frees_the_slot(served, tiny_hf):
    """A client reads one block of a long stream and hangs up: the engine drops the request
    (far fewer forwards than the whole answer needs) and the next request is served as alone."""
    client, tok, api = served
    config, params = tiny_hf
    eng = api.worker.engine
    slow = dict(mode="Q", threshold=1.0, editing_threshold=1.0, eos_early_stop=False)  # one token per forward
    prompt = tok.encode("abc")
    whole = decode.generate(params, config, [prompt], gen_length=112, block_length=B, threshold=1.0,
                            editing_threshold=1.0)
    loop_forwards = int(whole.forwards[0]) - (len(prompt) >= B)  # the prefill is no engine loop iteration
    _wait(lambda: eng.idle)
    before = eng.forwards
    stream = client.completions.create(model="tiny", prompt="abc", max_tokens=112, stream=True, extra_body=slow)
    next(iter(stream))  # the first finished block
    stream.close()
    _wait(lambda: eng.idle)
    assert eng.forwards - before < loop_forwards - 3 * B, (eng.forwards - before, loop_forwards)
    resp = client.completions.create(model="tiny", prompt="12+34=", max_tokens=32, extra_body={"mode": "S"})
    assert resp.model_extra["llada"]["tokens"] == _alone(tiny_hf, tok.encode("12+34="), preset="S")


def test_stop_sequences_cut_the_text(served):
    client, _, _ = served
    kw = dict(model="tiny", prompt="12+34=", max_tokens=48, extra_body={"mode": "S", "eos_early_stop": False})
    full = client.completions.create(**kw).choices[0].text
    assert len(full) >= 8, full
    stop = full[5:7]
    want = full[:full.find(stop)]
    for given in (stop, [f"{full}|never", stop]):
        resp = client.completions.create(**kw, stop=given)
        assert (resp.choices[0].text, resp.choices[0].finish_reason) == (want, "stop"), given
    chunks = list(client.completions.create(**kw, stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"
    unmatched = client.completions.create(**kw, stop="never in this text")
    assert unmatched.choices[0].text == full and unmatched.choices[0].finish_reason != "stop"


def test_logprobs_are_the_decoders(served, tiny_hf):
    """`logprobs` of the returned tokens are those `generate` records (EOS not shown), for
    completions (`logprobs=0`) and chat (`logprobs=true`), and the token strings add up to the text."""
    client, tok, _ = served
    config, params = tiny_hf
    resp = client.completions.create(model="tiny", prompt="12+34=", max_tokens=32, logprobs=0,
                                     extra_body={"mode": "Q"})
    want = decode.generate(params, config, [tok.encode("12+34=")], gen_length=32, block_length=B, preset="Q",
                           eos_early_stop=True)
    shown = [lp for t, lp in zip(want.tokens[0], want.logprobs[0]) if t != tok.eos_id]
    lp = resp.choices[0].logprobs
    np.testing.assert_allclose(lp.token_logprobs, shown, rtol=1e-5, atol=1e-5)
    assert "".join(lp.tokens) == resp.choices[0].text
    assert lp.text_offset == [len("".join(lp.tokens[:k])) for k in range(len(lp.tokens))]
    messages = [{"role": "user", "content": "What is 7+8?"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=32, logprobs=True)
    want = decode.generate(params, config, [tok.encode_chat(messages, add_generation_prompt=True)], gen_length=32,
                           block_length=B, preset="Q", eos_early_stop=True)
    content = chat.choices[0].logprobs.content
    np.testing.assert_allclose([c.logprob for c in content],
                               [lp for t, lp in zip(want.tokens[0], want.logprobs[0]) if t != tok.eos_id],
                               rtol=1e-5, atol=1e-5)
    assert "".join(c.token for c in content) == chat.choices[0].message.content


def test_n_greedy_copies_and_full_usage(served):
    """On a greedy engine, n=2 gives two equal choices; usage counts both."""
    client, tok, _ = served
    resp = client.completions.create(model="tiny", prompt="12+34=", max_tokens=32, n=2, extra_body={"mode": "S"})
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.choices[0].text == resp.choices[1].text
    tokens = [c.model_extra["llada"]["tokens"] for c in resp.choices]
    u = resp.usage
    assert u.completion_tokens == len(tokens[0]) + len(tokens[1])
    assert u.prompt_tokens == len(tok.encode("12+34=")) and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens == 0


def test_a_repeated_prompt_reports_cached_tokens(served, tiny_hf):
    """The second time a prompt comes, its whole blocks come from the prefix cache: usage says how
    many prompt tokens (streamed too), and the answer is the same, and `generate`'s."""
    client, tok, api = served
    prompt = "31+42=73,58+19=77,26+63=89,40+47=87,15+"
    ids = tok.encode(prompt)
    whole = len(ids) // B * B
    assert whole >= 2 * B
    kw = dict(model="tiny", prompt=prompt, max_tokens=32, extra_body={"mode": "S"})
    first = client.completions.create(**kw)
    second = client.completions.create(**kw)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == whole
    want = _alone(tiny_hf, ids, preset="S")
    assert first.model_extra["llada"]["tokens"] == second.model_extra["llada"]["tokens"] == want
    chunks = list(client.completions.create(**kw, stream=True))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == whole
    assert "".join(c.choices[0].text for c in chunks if c.choices) == second.choices[0].text


@pytest.fixture(scope="module")
def served_sampling(tiny_hf):
    config, params = tiny_hf
    tok = build_task_tokenizer()
    eng = engine.Engine(params, config, slots=2, max_length=64, block_length=B, steps_per_call=4, sampling=True,
                        mask_id=tok.mask_id, eos_id=tok.eos_id)
    client, srv, thread = _serve(server.App(eng, tok, model_name="tiny", default_max_tokens=32))
    yield client
    srv.should_exit = True
    thread.join(timeout=30)


def test_n_samples_each_choice_its_own_seed(served_sampling):
    """With --sampling, n=2 choices are distinct draws: choice i is the n=1 answer with seed + i,
    streamed or not."""
    client = served_sampling
    kw = dict(model="tiny", prompt="12+34=", max_tokens=32, temperature=1.0, extra_body={"mode": "S"})
    both = client.completions.create(**kw, n=2, seed=7)
    alone = [client.completions.create(**kw, seed=s).model_extra["llada"]["tokens"] for s in (7, 8)]
    assert [c.model_extra["llada"]["tokens"] for c in both.choices] == alone
    assert alone[0] != alone[1]
    chunks = list(client.completions.create(**kw, n=2, seed=7, stream=True))
    for i in (0, 1):
        text = "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i)
        assert text == both.choices[i].text, i


def test_health_is_503_after_an_engine_failure(tiny_hf):
    from starlette.testclient import TestClient

    config, params = tiny_hf
    tok = build_task_tokenizer()
    eng = engine.Engine(params, config, slots=1, max_length=64, block_length=B, mask_id=tok.mask_id,
                        eos_id=tok.eos_id)

    def broken_poll():
        raise RuntimeError("injected device failure")

    eng.poll = broken_poll
    api = server.App(eng, tok, model_name="tiny")
    try:
        web = TestClient(api.app)
        assert web.get("/health").status_code == 200
        resp = web.post("/v1/completions", json={"prompt": "1+1=", "max_tokens": 8})
        assert resp.status_code == 500 and "injected device failure" in resp.json()["error"]["message"]
        health = web.get("/health")
        assert health.status_code == 503 and "injected device failure" in health.json()["error"]
        again = web.post("/v1/completions", json={"prompt": "1+1=", "max_tokens": 8})
        assert again.status_code == 500
    finally:
        api.worker.close()


def test_launcher_serves_the_readme_quickstart_command(fixture_dir, tmp_path):
    """launch/serve.py with --block_length=5 --max_length=64 (the README's quickstart command; 64
    is not whole blocks of 5): the canvas is rounded up to 65 and a chat request is answered."""
    tok_path = tmp_path / "tokenizer.json"
    build_task_tokenizer().save(tok_path)
    port = _free_port()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "launch/serve.py", f"--checkpoint={fixture_dir}",
                             f"--tokenizer={tok_path}", "--block_length=5", "--max_length=64", f"--port={port}",
                             "--slots=2", "--moe_impl=dense"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        printed = []
        for line in proc.stdout:  # until the launcher says it serves (or exits)
            printed.append(line)
            if line.startswith("serving"):
                break
        assert "(2 slots of 65 tokens) in float32" in printed[-1], "".join(printed)  # the fixture's torch_dtype
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        _wait(lambda: _port_open(port), seconds=60)
        chat = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "07+3512+4955+6680+09"}],
                                              max_tokens=20, extra_body={"mode": "S", "raw": True})
        assert chat.choices[0].finish_reason in ("stop", "length") and chat.model_extra["llada"]["tokens"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _port_open(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_mbe_knobs_pass_through_to_the_engine_options():
    """The Multi-Block Editing fields of a request reach the engine's options unchanged."""
    body = {"mode": "S", "mbe_window": 2, "mbe_max_steps": 3, "mbe_threshold": 0.6, "mbe_editing_threshold": 0.2,
            "mbe_fraction": 0.5}
    opts, _, _ = server._options(body, 32)
    assert {k: opts[k] for k in body if k != "mode"} == {k: v for k, v in body.items() if k != "mode"}
