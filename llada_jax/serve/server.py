"""An OpenAI-compatible HTTP front end for `llada_jax.decode.engine` (Starlette; `launch/serve.py` runs it).

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (the LLaDA2 chat template, or the
plain one with `"raw": true` for plain-text models such as the quickstart's), `GET /v1/models`,
`GET /health`. `"stream": true` sends server-sent events, one per finished block (Draft-and-Edit
finalises a block at a time; with Multi-Block Editing a block is sent once it has left the
editing window), then `data: [DONE]`. Decoding knobs are extra request fields: `mode` (S, Q,
no_edit, llada20), `threshold`, `editing_threshold`, `max_post_steps`, `mbe_window`,
`block_length`, `eos_early_stop`, `penalty_lambda`, `top_k`; `max_tokens` is the generation length,
`temperature` / `top_p` / `seed` as in OpenAI. Every response carries an extra `llada` object
(answer token ids, forwards, denoising steps, TPF). A bad request gets HTTP 400 whose
`error.param` names the field.

This is a thin adapter: one worker thread owns the engine (submit, poll) and hands blocks and
results to the event loop; concurrent requests share the engine's slots. The engine never
imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
import uuid
from typing import Any, Optional

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from llada_jax import decode
from llada_jax.decode.engine import Engine
from llada_jax.data.tokenizer import Tokenizer, TokenizerError

_KNOBS = ("threshold", "editing_threshold", "max_post_steps", "mbe_window", "block_length", "eos_early_stop",
          "penalty_lambda", "top_k", "top_p", "temperature")


class BadRequest(Exception):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class EngineWorker:
    """Runs the engine in one thread; `submit` is called from the event loop."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._broken: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._loop, name="llada-engine", daemon=True)
        self._thread.start()

    def check(self, prompt, options):
        with self._lock:  # check reads only static engine fields, but keep it simple
            return self.engine.check(prompt, options)

    def submit(self, prompt, options, seed, on_block, on_done):
        if self._broken is not None:
            on_done(RuntimeError(f"the engine failed earlier: {self._broken}"))
            return
        self._inbox.put((prompt, options, seed, on_block, on_done))

    def close(self):
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout=30)

    def _loop(self):
        callbacks = {}
        while not self._stop.is_set():
            block = self.engine.idle
            try:
                while True:
                    item = self._inbox.get(block=block, timeout=0.5 if block else None)
                    block = False
                    if item is None:
                        return
                    prompt, options, seed, on_block, on_done = item
                    try:
                        rid = self.engine.submit(prompt, options, seed=seed, on_block=on_block)
                        callbacks[rid] = on_done
                    except Exception as err:  # noqa: BLE001 - delivered to the waiting request
                        on_done(err)
            except queue.Empty:
                pass
            if self.engine.idle:
                continue
            try:
                results = self.engine.poll()
            except Exception as err:  # noqa: BLE001 - the donated state is gone: fail everyone, stop
                self._broken = err
                for cb in callbacks.values():
                    cb(err)
                return
            for r in results:
                callbacks.pop(r.id)(r)


def _number(body, field, kind, lo=None, hi=None, default=None):
    value = body.get(field, default)
    if value is None:
        return None
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is int and isinstance(value, float) and value.is_integer():
        value, ok = int(value), True
    if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
        raise BadRequest(field, f"{field}: expected {'an integer' if kind is int else 'a number'}{rng}, "
                                f"found {value!r}")
    return value


def _options(body: dict, default_max_tokens: int) -> tuple[dict[str, Any], int]:
    """Request JSON -> `generate` options and seed; raises BadRequest naming the field."""
    if _number(body, "n", int, 1, 1, default=1) != 1:
        raise BadRequest("n", "n: expected 1")
    mode = body.get("mode", "Q")
    if mode not in decode.PRESETS:
        raise BadRequest("mode", f"mode: expected one of {sorted(decode.PRESETS)}, found {mode!r}")
    opts: dict[str, Any] = {"preset": mode, "gen_length": _number(body, "max_tokens", int, 1,
                                                                 default=default_max_tokens)}
    if "max_completion_tokens" in body:
        opts["gen_length"] = _number(body, "max_completion_tokens", int, 1)
    for field in _KNOBS:
        if field in body and body[field] is not None:
            opts[field] = body[field]
    opts.setdefault("eos_early_stop", True)
    seed = _number(body, "seed", int, default=0)
    return opts, seed


class App:
    """The Starlette application around one `EngineWorker` and a tokenizer."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, *, model_name: str = "llada",
                 default_max_tokens: int = 256):
        self.worker = EngineWorker(engine)
        self.tok = tokenizer
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens
        self.app = Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", lambda r: JSONResponse({"ok": True}), methods=["GET"]),
        ], lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        yield
        self.worker.close()

    # ------------------------------------------------------------------ endpoints
    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                         "owned_by": "llada_jax", "created": 0}]})

    async def completions(self, request: Request):
        return await self._handle(request, chat=False)

    async def chat(self, request: Request):
        return await self._handle(request, chat=True)

    @staticmethod
    def _error(field: Optional[str], message: str, status: int = 400):
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": field,
                                       "code": None}}, status_code=status)

    def _prompt_ids(self, body: dict, chat: bool) -> list[int]:
        raw = body.get("raw", False)
        if not isinstance(raw, bool):
            raise BadRequest("raw", f"raw: expected true or false, found {raw!r}")
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise BadRequest("messages", "messages: expected a non-empty list of {role, content} objects")
            for i, m in enumerate(messages):
                if not isinstance(m, dict):
                    raise BadRequest("messages", f"messages[{i}]: expected an object")
                if isinstance(m.get("content"), list):  # OpenAI content parts: keep the text ones
                    m["content"] = "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))
            try:
                return self.tok.encode_prompt(messages, template="plain" if raw else "chat")
            except TokenizerError as err:
                raise BadRequest("messages", str(err)) from None
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return prompt
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("prompt", "prompt: expected a non-empty string (or a list of token ids)")
        return self.tok.encode(prompt)

    async def _handle(self, request: Request, chat: bool):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return self._error(None, "the request body is not JSON")
        if not isinstance(body, dict):
            return self._error(None, "the request body must be a JSON object")
        try:
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise BadRequest("stream", f"stream: expected true or false, found {stream!r}")
            options, seed = _options(body, self.default_max_tokens)
            prompt = self._prompt_ids(body, chat)
            prompt, options = self.worker.check(prompt, options)
        except BadRequest as err:
            return self._error(err.field, str(err))
        except decode.OptionError as err:
            field = {"gen_length": "max_tokens", "preset": "mode", "prompts[0]": "prompt"}.get(err.field, err.field)
            if field == "prompt + gen_length":
                field = "max_tokens"
            return self._error(field, str(err))

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        self.worker.submit(prompt, options, seed,
                           on_block=lambda toks: loop.call_soon_threadsafe(events.put_nowait, ("block", toks)),
                           on_done=lambda res: loop.call_soon_threadsafe(events.put_nowait, ("done", res)))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if stream:
            return StreamingResponse(self._sse(events, rid, created, chat, len(prompt)),
                                     media_type="text/event-stream")
        while True:
            kind, payload = await events.get()
            if kind == "done":
                break
        if isinstance(payload, Exception):
            return self._error(None, f"decoding failed: {payload}", status=500)
        text = self._text(payload.tokens)
        finish = self._finish(payload.tokens)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                  if chat else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
        return JSONResponse({
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": self.model_name, "choices": [choice], "usage": self._usage(len(prompt), payload),
            "llada": self._stats(payload)})

    # ------------------------------------------------------------------ helpers
    def _text(self, tokens: list[int]) -> str:
        return self.tok.decode([t for t in tokens if t != self.tok.eos_id], skip_special_tokens=True)

    def _finish(self, tokens: list[int]) -> str:
        return "stop" if tokens and tokens[-1] == self.tok.eos_id else "length"

    @staticmethod
    def _usage(prompt_tokens: int, res) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": len(res.tokens),
                "total_tokens": prompt_tokens + len(res.tokens)}

    @staticmethod
    def _stats(res) -> dict:
        return {"tokens": res.tokens, "forwards": res.forwards, "steps": res.steps, "tpf": res.tpf,
                "mbe_forwards": res.mbe_forwards}

    async def _sse(self, events: asyncio.Queue, rid: str, created: int, chat: bool, prompt_tokens: int):
        obj = "chat.completion.chunk" if chat else "text_completion"
        tokens: list[int] = []
        sent = ""

        def chunk(delta: Optional[str], finish=None, extra=None):
            if chat:
                d = {} if delta is None else {"content": delta}
                if first:
                    d["role"] = "assistant"
                choice = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            data = {"id": rid, "object": obj, "created": created, "model": self.model_name, "choices": [choice]}
            if extra:
                data.update(extra)
            return f"data: {json.dumps(data)}\n\n"

        first = chat
        if chat:
            yield chunk("")
            first = False
        while True:
            kind, payload = await events.get()
            if kind == "block":
                tokens.extend(payload)
                text = self._text(tokens)
                # A block may end inside a multi-byte character: hold back a trailing replacement char.
                stable = text[:-1] if text.endswith("\ufffd") else text
                if len(stable) > len(sent) and stable.startswith(sent):
                    yield chunk(stable[len(sent):])
                    sent = stable
                continue
            if isinstance(payload, Exception):
                yield f"data: {json.dumps({'error': {'message': f'decoding failed: {payload}'}})}\n\n"
                break
            text = self._text(payload.tokens)
            if text != sent:
                yield chunk(text[len(sent):] if text.startswith(sent) else text)
            yield chunk(None, finish=self._finish(payload.tokens),
                        extra={"usage": self._usage(prompt_tokens, payload), "llada": self._stats(payload)})
            break
        yield "data: [DONE]\n\n"
