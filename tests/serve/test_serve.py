"""The OpenAI-compatible server (llada_jax.serve.server, launch/serve.py) driven by the official
`openai` client over 127.0.0.1: answers equal `generate` one request at a time, also for 8
concurrent clients sharing the engine; streaming sends finished blocks; bad fields get HTTP 400."""

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from llada_jax import decode  # noqa: E402
from llada_jax.decode import engine
from llada_jax.serve import server
from llada_jax.data.tokenizer import build_task_tokenizer  # noqa: E402

B = 16


@pytest.fixture(scope="module")
def served(tiny_hf):
    config, params = tiny_hf
    tok = build_task_tokenizer()
    eng = engine.Engine(params, config, slots=4, max_length=128, block_length=B, steps_per_call=4,
                        mask_id=tok.mask_id, eos_id=tok.eos_id)
    api = server.App(eng, tok, model_name="tiny", default_max_tokens=32)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(api.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    yield client, tok
    srv.should_exit = True
    thread.join(timeout=30)


def _alone(tiny_hf, prompt, **kw):
    config, params = tiny_hf
    kw = dict(dict(gen_length=32, block_length=B, preset="Q", eos_early_stop=True), **kw)
    return decode.generate(params, config, [prompt], **kw).tokens[0]


def test_completions_and_chat_equal_generate(served, tiny_hf):
    client, tok = served
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
    client, _ = served
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
])
def test_bad_request_names_the_field(served, extra, field):
    client, _ = served
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       extra_body=extra)
    assert err.value.status_code == 400
    assert err.value.body["param"] == field, err.value.body


def test_concurrent_clients_equal_one_by_one(served, tiny_hf):
    """8 clients at once on 4 slots: every answer equals `generate` for that prompt alone."""
    client, tok = served
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
