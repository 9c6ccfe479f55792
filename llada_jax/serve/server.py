"""An OpenAI-compatible HTTP front end for `llada_jax.decode.engine` (Starlette; `launch/serve.py` runs it).

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (the LLaDA2 chat template, or the
plain one with `"raw": true` for plain-text models such as the quickstart's), `GET /v1/models`,
`GET /health` (200, or 503 with the reason once the engine has failed). `"stream": true` sends
server-sent events, one per finished block (Draft-and-Edit finalises a block at a time; with
Multi-Block Editing a block is sent once no window can reopen it: with "last" windows when it
has left the window, with "surprisal" windows when the answer is done), then `data: [DONE]`;
a client that disconnects cancels its requests and frees their slots. Decoding knobs are extra
request fields: `mode` (S, Q, no_edit, llada20), `threshold`, `editing_threshold`,
`max_post_steps`, `mbe_window`, `mbe_max_steps`, `mbe_threshold`, `mbe_editing_threshold`,
`mbe_fraction`, `block_length`, `eos_early_stop`, `penalty_lambda`, `top_k`;
`max_tokens` is the generation length, `temperature` / `top_p` / `seed` as in OpenAI. OpenAI's
`stop` (text cut before the first stop sequence, finish_reason "stop"; a stream cancels the
request there), `n` (n engine requests, choice i seeded `seed + i`), `logprobs` (of the returned
tokens, as the decoder recorded them when it wrote each one; no alternatives) and `usage` (with
`prompt_tokens_details.cached_tokens`: the prompt tokens whose prefill the engine's prefix cache
skipped, 0 without one). Every response carries an
extra `llada` object (answer token ids, forwards, denoising steps, TPF; per choice in
`choices[i].llada`). A bad request gets HTTP 400 whose `error.param` names the field.

This is a thin adapter: one worker thread owns the engine (submit, poll, cancel) and hands
blocks and results to the event loop; concurrent requests share the engine's slots. The engine
never imports this module.
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

_KNOBS = ("threshold", "editing_threshold", "max_post_steps", "mbe_window", "mbe_max_steps", "mbe_threshold",
          "mbe_editing_threshold", "mbe_fraction", "block_length", "eos_early_stop",
          "penalty_lambda", "top_k", "top_p", "temperature")


MAX_N = 16  # choices per request (each takes a slot)


class BadRequest(Exception):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class Ticket:
    """A request handed to the worker; the worker fills in the engine's id (for `cancel`)."""

    def __init__(self):
        self.rid: Optional[int] = None
        self.cancelled = False


class EngineWorker:
    """Runs the engine in one thread; `submit` and `cancel` are called from the event loop."""

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

    def health(self) -> Optional[str]:
        """None while the worker can decode, else why not."""
        if self._broken is not None:
            return f"the engine failed: {type(self._broken).__name__}: {self._broken}"
        if not self._thread.is_alive():
            return "the engine thread has stopped"
        return None

    def submit(self, prompt, options, seed, on_block, on_done) -> Ticket:
        ticket = Ticket()
        why = self.health()
        if why is not None:
            on_done(RuntimeError(why))
            return ticket
        self._inbox.put(("submit", ticket, prompt, options, seed, on_block, on_done))
        return ticket

    def cancel(self, ticket: Ticket):
        """The client went away: free the request's slot (no more callbacks for it)."""
        if not ticket.cancelled:
            ticket.cancelled = True
            self._inbox.put(("cancel", ticket))

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
                    if item[0] == "cancel":
                        rid = item[1].rid
                        if rid is not None and callbacks.pop(rid, None) is not None:
                            self.engine.cancel(rid)
                        continue
                    _, ticket, prompt, options, seed, on_block, on_done = item
                    if ticket.cancelled:
                        continue
                    try:
                        ticket.rid = self.engine.submit(prompt, options, seed=seed, on_block=on_block)
                        callbacks[ticket.rid] = on_done
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


def _options(body: dict, default_max_tokens: int) -> tuple[dict[str, Any], int, int]:
    """Request JSON -> `generate` options, seed and n; raises BadRequest naming the field."""
    n = _number(body, "n", int, 1, MAX_N, default=1)
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
    return opts, seed, n


def _stops(body: dict) -> list[str]:
    """OpenAI `stop`: null, a string or a list of at most 4 non-empty strings."""
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not 1 <= len(stops) <= 4 or not all(isinstance(x, str) and x for x in stops):
        raise BadRequest("stop", f"stop: expected a non-empty string or a list of 1 to 4 of them, found {stop!r}")
    return stops


def _find_stop(text: str, stops: list[str]) -> Optional[int]:
    """Where the earliest stop sequence starts in `text`, or None."""
    found = [i for i in (text.find(x) for x in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop sequence."""
    return max((k for x in stops for k in range(min(len(x) - 1, len(text)), 0, -1) if text.endswith(x[:k])),
               default=0)


def _logprobs(body: dict, chat: bool, stream: bool) -> bool:
    """Whether the request asks for the returned tokens' log-probabilities (chat: `logprobs:
    true`; completions: `logprobs: 0`). Top alternatives are not recorded by the decoder."""
    if chat:
        want = body.get("logprobs") or False
        if not isinstance(want, bool):
            raise BadRequest("logprobs", f"logprobs: expected true or false, found {want!r}")
        top = body.get("top_logprobs")
        if top is not None and (isinstance(top, bool) or top != 0):
            raise BadRequest("top_logprobs", f"top_logprobs: expected 0 or null (alternatives are not recorded), "
                                             f"found {top!r}")
    else:
        k = body.get("logprobs")
        if k is not None and (isinstance(k, bool) or k != 0):
            raise BadRequest("logprobs", f"logprobs: expected 0 or null (the chosen tokens only; alternatives "
                                         f"are not recorded), found {k!r}")
        want = k is not None
    if want and stream:
        raise BadRequest("logprobs", "logprobs: expected none with stream=true (streamed blocks carry no "
                                     "log-probabilities), found a request for them")
    return want


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
            Route("/health", self.health, methods=["GET"]),
        ], lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        yield
        self.worker.close()

    # ------------------------------------------------------------------ endpoints
    async def health(self, request: Request):
        why = self.worker.health()
        if why is not None:
            return JSONResponse({"ok": False, "error": why}, status_code=503)
        return JSONResponse({"ok": True})

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
            options, seed, n = _options(body, self.default_max_tokens)
            stops = _stops(body)
            logprobs = _logprobs(body, chat, stream)
            prompt = self._prompt_ids(body, chat)
            prompt, options = self.worker.check(prompt, options)
        except BadRequest as err:
            return self._error(err.field, str(err))
        except decode.OptionError as err:
            field = {"gen_length": "max_tokens", "preset": "mode", "prompts[0]": "prompt"}.get(err.field, err.field)
            if field == "prompt + gen_length":
                field = "max_tokens"
            return self._error(field, str(err))

        # n choices = n engine requests, choice i with seed + i (distinct only with --sampling and
        # temperature > 0; greedy choices are copies). Events carry the choice index.
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(*event):
            loop.call_soon_threadsafe(events.put_nowait, event)

        tickets = [self.worker.submit(prompt, options, seed + i,
                                      on_block=lambda toks, i=i: put(i, "block", toks),
                                      on_done=lambda res, i=i: put(i, "done", res)) for i in range(n)]
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if stream:
            return StreamingResponse(self._sse(events, tickets, rid, created, chat, len(prompt), stops),
                                     media_type="text/event-stream")
        results: list = [None] * n
        try:
            while any(r is None for r in results):
                i, kind, payload = await events.get()
                if kind == "done":
                    results[i] = payload
        finally:  # cancelled (the server shutting down): free the slots
            for ticket, r in zip(tickets, results):
                if r is None:
                    self.worker.cancel(ticket)
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:
            return self._error(None, f"decoding failed: {failed}", status=500)
        choices = []
        for i, res in enumerate(results):
            text, finish, kept = self._cut(res.tokens, stops)
            choice = ({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                      if chat else {"index": i, "text": text, "finish_reason": finish, "logprobs": None})
            if logprobs:
                choice["logprobs"] = self._logprobs(res, kept, chat)
            choice["llada"] = self._stats(res)
            choices.append(choice)
        return JSONResponse({
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": self.model_name, "choices": choices,
            "usage": self._usage(len(prompt), [len(r.tokens) for r in results],
                                 max(r.cached_tokens for r in results)),
            "llada": self._stats(results[0])})

    # ------------------------------------------------------------------ helpers
    def _text(self, tokens: list[int]) -> str:
        return self.tok.decode([t for t in tokens if t != self.tok.eos_id], skip_special_tokens=True)

    def _finish(self, tokens: list[int]) -> str:
        return "stop" if tokens and tokens[-1] == self.tok.eos_id else "length"

    def _cut(self, tokens: list[int], stops: list[str]) -> tuple[str, str, int]:
        """The returned text, its finish_reason, and how many answer tokens it shows (the text is
        cut before the first stop sequence; EOS is not shown)."""
        text = self._text(tokens)
        shown = [t for t in tokens if t != self.tok.eos_id]
        at = _find_stop(text, stops)
        if at is None:
            return text, self._finish(tokens), len(shown)
        # Tokens that start before the cut (one may straddle it).
        kept = next((k for k in range(len(shown) + 1) if len(self._text(shown[:k])) >= at), len(shown))
        return text[:at], "stop", kept

    def _logprobs(self, res, kept: int, chat: bool) -> dict:
        """OpenAI `logprobs` of the first `kept` shown tokens (EOS is never shown)."""
        pairs = [(t, lp) for t, lp in zip(res.tokens, res.logprobs) if t != self.tok.eos_id][:kept]
        ids = [t for t, _ in pairs]
        pieces = [self.tok.decode([t], skip_special_tokens=True) for t in ids]
        if chat:
            return {"content": [{"token": piece, "logprob": lp, "bytes": list(piece.encode()), "top_logprobs": []}
                                for piece, (_, lp) in zip(pieces, pairs)], "refusal": None}
        offsets = [len(self._text(ids[:k])) for k in range(len(ids))]
        return {"tokens": pieces, "token_logprobs": [lp for _, lp in pairs], "top_logprobs": None,
                "text_offset": offsets}

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: list[int], cached_tokens: int = 0) -> dict:
        """OpenAI's usage; `cached_tokens`: prompt tokens whose prefill the prefix cache skipped
        (the most over the choices: n choices share one prompt, as one OpenAI request)."""
        total = sum(completion_tokens)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": total, "total_tokens": prompt_tokens + total,
                "prompt_tokens_details": {"cached_tokens": cached_tokens}}

    @staticmethod
    def _stats(res) -> dict:
        return {"tokens": res.tokens, "forwards": res.forwards, "steps": res.steps, "tpf": res.tpf,
                "mbe_forwards": res.mbe_forwards}

    async def _sse(self, events: asyncio.Queue, tickets: list, rid: str, created: int, chat: bool,
                   prompt_tokens: int, stops: list[str]):
        """One event per finished block and choice, a last one per choice with its finish_reason
        (the last of all with `usage`), then [DONE]. A choice that hits a stop sequence is cut
        there and its engine request cancelled; a client that goes away cancels every request."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        n = len(tickets)
        tokens: list[list[int]] = [[] for _ in range(n)]
        sent = [""] * n
        finished = [False] * n
        counts = [0] * n
        cached = [0]  # from the finished choices' results (a choice cut at a stop sends none)

        def chunk(i, delta: Optional[str], finish=None, extra=None, role=False):
            if chat:
                d = {} if delta is None else {"content": delta}
                if role:
                    d["role"] = "assistant"
                choice = {"index": i, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": i, "text": delta or "", "finish_reason": finish, "logprobs": None}
            data = {"id": rid, "object": obj, "created": created, "model": self.model_name, "choices": [choice]}
            if extra:
                data.update(extra)
            return f"data: {json.dumps(data)}\n\n"

        def finish(i, reason, res=None):
            finished[i] = True
            extra = {}
            if res is not None:
                extra["llada"] = self._stats(res)
            if all(finished):
                extra["usage"] = self._usage(prompt_tokens, counts, cached[0])
            return chunk(i, None, finish=reason, extra=extra)

        try:
            if chat:
                for i in range(n):
                    yield chunk(i, "", role=True)
            while not all(finished):
                i, kind, payload = await events.get()
                if finished[i]:
                    continue  # a choice cut at a stop sequence: its request was cancelled
                if isinstance(payload, Exception):
                    yield f"data: {json.dumps({'error': {'message': f'decoding failed: {payload}'}})}\n\n"
                    break
                if kind == "block":
                    tokens[i].extend(payload)
                    counts[i] = len(tokens[i])
                    text = self._text(tokens[i])
                    # A block may end inside a multi-byte character: hold back a trailing replacement char.
                    stable = text[:-1] if text.endswith("\ufffd") else text
                else:
                    tokens[i], counts[i] = list(payload.tokens), len(payload.tokens)
                    cached[0] = max(cached[0], payload.cached_tokens)
                    stable = text = self._text(payload.tokens)
                at = _find_stop(stable, stops)
                if at is not None:
                    stable = stable[:at]
                elif kind == "block":
                    stable = stable[:len(stable) - _held_back(stable, stops)]
                if len(stable) > len(sent[i]) and stable.startswith(sent[i]):
                    yield chunk(i, stable[len(sent[i]):])
                    sent[i] = stable
                elif kind == "done" and at is None and text != sent[i]:
                    yield chunk(i, text[len(sent[i]):] if text.startswith(sent[i]) else text)
                    sent[i] = text
                if at is not None:
                    if kind == "block":
                        self.worker.cancel(tickets[i])
                    yield finish(i, "stop", payload if kind == "done" else None)
                elif kind == "done":
                    yield finish(i, self._finish(payload.tokens), payload)
            yield "data: [DONE]\n\n"
        finally:  # also on a client disconnect (the response task is cancelled)
            for ticket, done in zip(tickets, finished):
                if not done:
                    self.worker.cancel(ticket)
