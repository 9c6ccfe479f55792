"""A decoding engine with continuous batching over the Draft-and-Edit loop (REFERENCE §5).

`generate` decodes a batch until its slowest row is done: rows that finish early keep taking
part in every forward. The engine keeps a fixed number of *slots* (rows of one device state:
canvas, KV cache, counters, per-slot knobs and sampling keys) and refills a slot as soon as its
row is DONE: the next waiting request is written into that slot and its prompt prefilled into
the slot's cache rows, while the other slots carry on. Each call of the compiled `run` does up
to `steps_per_call` loop iterations of `decode.step` (one model forward each) and returns
early when a row finishes, so a freed slot waits at most one call.

Compiled programs: `admit` (one request into one slot, its chunked prefill) and `run`, both
with the slot state donated (updated in place), at fixed shapes (slots x `max_length`), so any
mix of prompt lengths runs on these two programs. Greedy results equal `generate` one request
at a time, token for token: rows never read each other, and a row's step keys are
`fold_in(fold_in(key(seed), 0), forwards)`, those of a one-prompt `generate(rng=key(seed))`.

Streaming: `Request.on_block(tokens)` gets each block's generated tokens once they can no
longer change (after the block, or with Multi-Block Editing once it has left the window), up to
`gen_length` and through the first EOS. `cancel(id)` drops a waiting or running request (a
client that went away) and frees its slot for the next `poll`. The engine is single-threaded;
`launch/serve.py` runs it in a worker thread and only calls `submit`, `poll` and `cancel` from there.

Prefix cache (`prefix_cache_bytes` > 0, `llada_jax.decode.prefix_cache`): before a prefill the
engine looks the prompt's whole blocks up in a radix tree of blocks cached from earlier
requests, copies the matched blocks' K/V into the slot's cache rows and prefills only the rest
(`Result.cached_tokens` says how many prompt tokens were skipped); after it, the prompt's new
whole blocks go into the tree (LRU-evicted under the byte budget). A block's K/V depend only on
the blocks up to it, so a hit changes no output; the per-row statistics stay those of
`generate` (the prefill still counts as the row's first cache write).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import Array, Int

from llada_jax.decode import kvcache
from llada_jax.decode import options as decode_options
from llada_jax.decode.loop import DENOISE, DONE, DecodeState, mbe_fields, prefix_buckets, step as decode_step
from llada_jax.decode.prefix_cache import PrefixCache
from llada_jax.model.config import ModelConfig


@dataclasses.dataclass
class Request:
    """One decoding request: prompt ids and `decode.check_options` values (per-slot knobs)."""

    prompt: list[int]
    options: dict[str, Any]
    seed: int = 0
    on_block: Optional[Callable[[list[int]], None]] = None
    id: int = -1


@dataclasses.dataclass
class Result:
    """What a finished request gets: the fields of one `GenerateOutput` row."""

    id: int
    tokens: list[int]
    commit_steps: list[int]
    logprobs: list[float]  # per token, as `GenerateOutput.logprobs`
    canvas: np.ndarray
    forwards: int
    steps: int
    cache_writes: int
    mbe_forwards: int
    num_generated: int
    tpf: float
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (their prefill skipped)


@flax.struct.dataclass
class Slots:
    """The device state of all slots (donated to every compiled call)."""

    state: DecodeState
    prompt_lens: Int[Array, "S"]
    num_blocks: Int[Array, "S"]
    knobs: decode_options.Knobs
    row_keys: jax.Array


def _slot_shardings(slots: Slots, mesh) -> Slots:
    """Rows (slots) over the mesh's batch axes, the KV cache's heads over `tensor` as in the forward."""
    from llada_jax.parallel import sharding

    n = slots.prompt_lens.shape[0]

    def one(x):
        shape = x.shape
        if len(shape) == 5:  # cache [layers, N, S, K, H]
            names = (None, "act_batch", None, "act_kv_heads", None)
        elif len(shape) >= 1 and shape[0] == n:
            names = ("act_batch",) + (None,) * (len(shape) - 1)
        else:
            names = (None,) * len(shape)
        return sharding.logical_sharding(names, shape, mesh)

    return jax.tree.map(one, slots)


def _admit(params, slots: Slots, slot, canvas_row, prompt_len, num_blocks, knob_row, key_row, prefix_kv=None,
           hit_blocks=0, *, config, settings):
    """One request into `slot`: its canvas, knobs and keys, and its prompt's K/V. With a prefix-cache
    hit, `prefix_kv` ({group: {"k", "v": [layers, L, K, H]}}) holds the K/V of the first
    `hit_blocks` blocks (the rest is ignored) and the prefill starts after them."""
    b = settings.block_length
    st = slots.state

    def put(a, v):
        return a.at[slot].set(v)

    row_cache = jax.tree.map(lambda c: jax.lax.dynamic_slice_in_dim(c, slot, 1, axis=1), st.cache)
    if prefix_kv is not None:
        hit = jnp.arange(canvas_row.shape[0]) < hit_blocks * b  # [L]
        row_cache = jax.tree.map(lambda c, p: jnp.where(hit[None, None, :, None, None], p[:, None].astype(c.dtype), c),
                                 row_cache, prefix_kv)
    row_cache = kvcache.prefill(params, config, canvas_row[None], (prompt_len // b)[None], row_cache,
                                block_length=b, chunk_blocks=settings.prefill_chunk_blocks,
                                prefix_buckets=prefix_buckets(settings, canvas_row.shape[0] // b),
                                skip_blocks=hit_blocks)
    cache = jax.tree.map(lambda c, r: jax.lax.dynamic_update_slice_in_dim(c, r, slot, axis=1), st.cache, row_cache)
    st = st.replace(
        canvas=put(st.canvas, canvas_row), block=put(st.block, prompt_len // b),
        phase=put(st.phase, DENOISE), post_steps=put(st.post_steps, 0), steps=put(st.steps, 0),
        cache_writes=put(st.cache_writes, (prompt_len >= b).astype(jnp.int32)), mbe_forwards=put(st.mbe_forwards, 0),
        commit_step=put(st.commit_step, -1), logprob=put(st.logprob, 0.0), stale=put(st.stale, False), cache=cache)
    if st.mbe_steps is not None:  # a fresh Multi-Block Editing session state
        st = st.replace(mbe_steps=put(st.mbe_steps, 0), dirty_from=put(st.dirty_from, canvas_row.shape[0] // b),
                        cursor=put(st.cursor, 0), resume=put(st.resume, False))
    return Slots(state=st, prompt_lens=put(slots.prompt_lens, prompt_len), num_blocks=put(slots.num_blocks, num_blocks),
                 knobs=jax.tree.map(put, slots.knobs, knob_row), row_keys=put(slots.row_keys, key_row))


def _row_kv(cache, slot):
    """One slot's cache rows, {group: {"k", "v": [layers, L, K, H]}} (read back into the prefix cache)."""
    return jax.tree.map(lambda c: jax.lax.dynamic_index_in_dim(c, slot, axis=1, keepdims=False), cache)


def _run(params, slots: Slots, max_steps, *, config, settings):
    """Up to `max_steps` loop iterations; stops early once a row that was running is DONE."""
    running = slots.state.phase != DONE
    step = functools.partial(decode_step, params, prompt_lens=slots.prompt_lens, num_blocks=slots.num_blocks,
                             knobs=slots.knobs, row_keys=slots.row_keys, config=config, settings=settings)

    def cond(carry):
        i, st = carry
        done = st.phase == DONE
        return (i < max_steps) & ~(running & done).any() & ~done.all()

    def body(carry):
        i, st = carry
        return i + 1, step(st)

    n, state = jax.lax.while_loop(cond, body, (jnp.int32(0), slots.state))
    return slots.replace(state=state), n


class Engine:
    """Continuous batching: `submit` requests, call `poll` until `idle`; see the module docstring.

    Static per engine (they shape the compiled programs): `slots`, `max_length` (canvas tokens per
    slot, a multiple of `block_length`), `block_length`, `mbe_window` / `mbe_attention` /
    `mbe_select` (a request may turn MBE off, not change the window; its `mbe_max_steps`,
    `mbe_threshold`, `mbe_editing_threshold` and `mbe_fraction` are per-request knobs), `sampling`
    (compile in temperature / top-k / top-p; greedy rows stay exact either way), `prefix_growth` /
    `prefix_max_buckets` (the cached step's prefix-read buckets, `kvcache.buckets`). Everything
    else is a per-request knob.

    `prefix_cache_bytes` > 0 keeps a prefix cache of whole prompt blocks across requests, at
    most that many bytes of host memory (see the module docstring; 0: none).
    """

    def __init__(self, params, config: ModelConfig, *, slots: int = 8, max_length: int = 512,
                 block_length: int = 32, mbe_window: int = 0, mbe_attention: str = "bidirectional",
                 mbe_select: str = "surprisal", sampling: bool = False, steps_per_call: int = 8,
                 mask_id: Optional[int] = None, eos_id: Optional[int] = None, mesh: Optional[jax.sharding.Mesh] = None,
                 prefix_cache_bytes: int = 0, prefix_growth: float = 2.0, prefix_max_buckets: int = 64):
        if max_length % block_length or max_length > config.max_position_embeddings:
            decode_options.fail("max_length", f"a multiple of block_length={block_length} <= "
                           f"max_position_embeddings={config.max_position_embeddings}", max_length)
        self.mesh = mesh
        if mesh is not None:
            from llada_jax.parallel import hosts

            ways = hosts.batch_ways(mesh)
            if slots % ways:
                decode_options.fail("slots", f"a multiple of the mesh's batch axes (data x fsdp x expert = {ways})",
                                    slots)
        self.params, self.config = params, config
        self.num_slots, self.max_length, self.steps_per_call = slots, max_length, steps_per_call
        self.mask_id = config.mask_token_id if mask_id is None else mask_id
        self.eos_id = config.eos_token_id if eos_id is None else eos_id
        self.settings = decode_options.DecodeSettings(
            block_length=block_length, mask_id=self.mask_id, eos_id=self.eos_id, pad_id=config.pad_token_id,
            greedy=not sampling, filter_top=sampling, use_cache=True, mbe_window=mbe_window,
            mbe_attention=mbe_attention, mbe_select=mbe_select, prefix_growth=prefix_growth,
            prefix_max_buckets=prefix_max_buckets)
        prefix_buckets(self.settings, max_length // block_length)  # a bad growth / bound fails here
        self.prefix_cache = PrefixCache(block_length, prefix_cache_bytes) if prefix_cache_bytes else None
        statics = dict(config=config, settings=self.settings)
        self._slots = self._empty_slots()
        out = {}
        if mesh is not None:  # the slot state keeps its layout across calls (no re-layout, no recompile)
            shardings = _slot_shardings(self._slots, mesh)
            self._slots = jax.device_put(self._slots, shardings)
            out = dict(admit=dict(out_shardings=shardings),
                       run=dict(out_shardings=(shardings, NamedSharding(mesh, PartitionSpec()))))
        self._admit_fn = jax.jit(functools.partial(_admit, **statics), donate_argnums=(1,), **out.get("admit", {}))
        self._run_fn = jax.jit(functools.partial(_run, **statics), donate_argnums=(1,), **out.get("run", {}))
        self._row_kv_fn = jax.jit(_row_kv)
        # What a miss passes as `prefix_kv` (ignored there): on the device once, never copied again.
        self._no_prefix = None
        if self.prefix_cache is not None:
            self._no_prefix = jax.tree.map(lambda c: jnp.zeros((c.shape[0],) + c.shape[2:], c.dtype),
                                           self._slots.state.cache)
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: dict[int, Request] = {}  # slot -> request
        self._emitted: dict[int, int] = {}  # slot -> blocks already streamed
        self._cached: dict[int, int] = {}  # slot -> prompt tokens taken from the prefix cache
        self._next_id = 0
        self.forwards = 0  # engine-level loop iterations (one batched forward each)

    def _empty_slots(self) -> Slots:
        n, length = self.num_slots, self.max_length
        state = DecodeState(
            canvas=jnp.full((n, length), self.mask_id, jnp.int32), block=jnp.zeros((n,), jnp.int32),
            phase=jnp.full((n,), DONE, jnp.int32), post_steps=jnp.zeros((n,), jnp.int32),
            steps=jnp.zeros((n,), jnp.int32), cache_writes=jnp.zeros((n,), jnp.int32),
            mbe_forwards=jnp.zeros((n,), jnp.int32), commit_step=jnp.full((n, length), -1, jnp.int32),
            logprob=jnp.zeros((n, length), jnp.float32),
            stale=jnp.zeros((n,), bool), cache=kvcache.init_cache(self.config, n, length),
            **(mbe_fields(n, min(self.settings.mbe_window, length // self.settings.block_length), length,
                          self.settings.block_length) if self.settings.mbe_window else {}))
        knobs = decode_options.make_knobs(self.config.vocab_size, threshold=np.zeros(n), editing_threshold=np.zeros(n),
                                    temperature=np.zeros(n), top_k=np.full(n, self.config.vocab_size),
                                    top_p=np.ones(n), penalty_lambda=np.zeros(n), max_post_steps=np.zeros(n),
                                    eos_early_stop=np.zeros(n, bool), llada20=np.zeros(n, bool), mbe=np.ones(n, bool),
                                    mbe_max_steps=np.ones(n, np.int32), mbe_threshold=np.zeros(n),
                                    mbe_editing_threshold=np.zeros(n), mbe_fraction=np.zeros(n))
        keys = jax.vmap(jax.random.key)(jnp.arange(n))
        return Slots(state=state, prompt_lens=jnp.zeros((n,), jnp.int32), num_blocks=jnp.ones((n,), jnp.int32),
                     knobs=knobs, row_keys=keys)

    def _on_mesh(self):
        """The mesh and the rule table the model's sharding constraints read (nothing without a mesh)."""
        if self.mesh is None:
            return contextlib.nullcontext()
        import flax.linen as nn

        from llada_jax.parallel import sharding

        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(sharding.DEFAULT_RULES))
        return stack

    # ------------------------------------------------------------------ requests
    def check(self, prompt, options: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
        """Validates one request against `decode.check_options` and this engine's shapes;
        raises `decode_options.OptionError` naming the field."""
        opts = {k: v for k, v in options.items() if k not in ("mask_id", "eos_id")}  # the engine's own
        opts.setdefault("block_length", self.settings.block_length)
        mbe = opts.pop("mbe_window", None)
        opts = decode_options.check_options(self.config, **opts, mbe_window=0 if mbe is None else mbe,
                                      mask_id=self.mask_id, eos_id=self.eos_id)
        if opts["block_length"] != self.settings.block_length:
            decode_options.fail("block_length", f"{self.settings.block_length} (this engine's)", opts["block_length"])
        if opts["mbe_window"] not in (0, self.settings.mbe_window):
            decode_options.fail("mbe_window", f"0 or {self.settings.mbe_window} (this engine's)", opts["mbe_window"])
        if opts["temperature"] > 0 and self.settings.greedy:
            decode_options.fail("temperature", "0 (this engine decodes greedily; start it with sampling)",
                           opts["temperature"])
        if opts["mbe_attention"] != self.settings.mbe_attention:
            decode_options.fail("mbe_attention", f"{self.settings.mbe_attention!r} (this engine's)", opts["mbe_attention"])
        if opts["mbe_select"] != self.settings.mbe_select:
            decode_options.fail("mbe_select", f"{self.settings.mbe_select!r} (this engine's)", opts["mbe_select"])
        [row] = decode_options.check_prompts([prompt], self.config.vocab_size, self.mask_id)
        need = math.ceil((len(row) + opts["gen_length"]) / self.settings.block_length) * self.settings.block_length
        if need > self.max_length:
            decode_options.fail("prompt + gen_length", f"a canvas of at most max_length={self.max_length} tokens", need)
        return row, opts

    def submit(self, prompt, options: dict[str, Any], *, seed: int = 0,
               on_block: Optional[Callable[[list[int]], None]] = None) -> int:
        """Queues a request (ids, options as `generate`'s keywords); returns its id."""
        row, opts = self.check(prompt, options)
        req = Request(prompt=row, options=opts, seed=seed, on_block=on_block, id=self._next_id)
        self._next_id += 1
        self._waiting.append(req)
        return req.id

    def cancel(self, request_id: int) -> bool:
        """Drops a waiting or running request (a client went away): its slot is free for the next
        `poll`, and it never gets a Result nor another `on_block`. False if it is not queued or
        running (unknown, or already returned by `poll`)."""
        for req in self._waiting:
            if req.id == request_id:
                self._waiting.remove(req)
                return True
        for slot, req in self._active.items():
            if req.id == request_id:
                # DONE rows never change and `_run` stops for rows that finish, not for rows that
                # start out DONE, so the others decode on unaffected; `_admit` resets the row.
                st = self._slots.state
                self._slots = self._slots.replace(state=st.replace(phase=st.phase.at[slot].set(DONE)))
                del self._active[slot], self._emitted[slot], self._cached[slot]
                return True
        return False

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._active

    def _admit(self, slot: int, req: Request):
        b, o = self.settings.block_length, req.options
        p = len(req.prompt)
        canvas = np.full((self.max_length,), self.mask_id, np.int32)
        canvas[:p] = req.prompt
        knobs = decode_options.make_knobs(
            self.config.vocab_size, threshold=o["threshold"], editing_threshold=o["editing_threshold"],
            temperature=o["temperature"], top_k=o["top_k"], top_p=o["top_p"], penalty_lambda=o["penalty_lambda"],
            max_post_steps=o["max_post_steps"], eos_early_stop=o["eos_early_stop"], llada20=o["llada20"],
            mbe=o["mbe_window"] > 0, mbe_max_steps=o["mbe_max_steps"], mbe_threshold=o["mbe_threshold"],
            mbe_editing_threshold=o["mbe_editing_threshold"], mbe_fraction=o["mbe_fraction"])
        key = jax.random.fold_in(jax.random.key(req.seed), 0)
        canvas_len = math.ceil((p + o["gen_length"]) / b) * b
        extra, hit = (), 0
        if self.prefix_cache is not None:
            blocks = self.prefix_cache.match(req.prompt)
            hit = len(blocks)
            extra = (self._prefix_row(blocks) if hit else self._no_prefix, jnp.int32(hit))
        with self._on_mesh():
            self._slots = self._admit_fn(self.params, self._slots, jnp.int32(slot), jnp.asarray(canvas),
                                         jnp.int32(p), jnp.int32(canvas_len // b), knobs, key, *extra)
            if self.prefix_cache is not None and p // b > hit:
                row = jax.device_get(self._row_kv_fn(self._slots.state.cache, jnp.int32(slot)))
                # copies, so that an entry never keeps the whole row alive
                self.prefix_cache.insert(req.prompt, hit, lambda j: jax.tree.map(
                    lambda x: np.array(x[:, j * b:(j + 1) * b]), row))
        self._active[slot] = req
        self._emitted[slot] = p // b
        self._cached[slot] = hit * b

    def _prefix_row(self, blocks: list) -> Any:
        """The K/V of the matched blocks laid out as one slot row ({group: {"k", "v": [layers, L, K, H]}})."""
        b = self.settings.block_length

        def row(template, *parts):
            out = np.zeros(template.shape, parts[0].dtype)
            for j, part in enumerate(parts):
                out[:, j * b:(j + 1) * b] = part
            return out

        # placed as the miss's buffer, so that hits and misses share one compiled admit
        return jax.device_put(jax.tree.map(row, self._no_prefix, *blocks))  # the template's shape only

    def clear_prefix_cache(self):
        """Drops the prefix cache (call it after changing `params`: its K/V belong to the old ones)."""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    def poll(self) -> list[Result]:
        """Fills free slots, runs one compiled call, streams final blocks; returns finished requests."""
        free = [s for s in range(self.num_slots) if s not in self._active]
        while free and self._waiting:
            self._admit(free.pop(0), self._waiting.popleft())
        if not self._active:
            return []
        with self._on_mesh():
            self._slots, n = self._run_fn(self.params, self._slots, jnp.int32(self.steps_per_call))
        self.forwards += int(n)
        st = self._slots.state
        phase, block = np.asarray(st.phase), np.asarray(st.block)
        canvas = None
        results = []
        w = self.settings.mbe_window
        for slot, req in list(self._active.items()):
            done = phase[slot] == DONE
            if done:
                final = block[slot] + 1
            elif w and req.options["mbe_window"]:
                # A "last" window may still reopen the w - 1 blocks before the current one; a
                # "surprisal" window any generated block, so those stream when the row is done.
                final = block[slot] - (w - 1) if self.settings.mbe_select == "last" else 0
            else:
                final = block[slot]
            if req.on_block is not None and final > self._emitted[slot]:
                canvas = np.asarray(st.canvas) if canvas is None else canvas
                self._stream(slot, req, canvas[slot], final)
            if done:
                canvas = np.asarray(st.canvas) if canvas is None else canvas
                results.append(self._result(slot, req, canvas[slot]))
                del self._active[slot], self._emitted[slot], self._cached[slot]
        return results

    def _answer(self, req: Request, row: np.ndarray) -> list[int]:
        p = len(req.prompt)
        gen = row[p:p + req.options["gen_length"]]
        eos = np.flatnonzero(gen == self.eos_id)
        return gen[:int(eos[0]) + 1 if eos.size else len(gen)].tolist()

    def _stream(self, slot: int, req: Request, row: np.ndarray, final_blocks: int):
        b, p = self.settings.block_length, len(req.prompt)
        answer = self._answer(req, row)
        lo = max(self._emitted[slot] * b - p, 0)
        hi = min(final_blocks * b - p, len(answer))
        if hi > lo:
            req.on_block(answer[lo:hi])
        self._emitted[slot] = max(final_blocks, self._emitted[slot])

    def _result(self, slot: int, req: Request, row: np.ndarray) -> Result:
        st = self._slots.state
        tokens = self._answer(req, row)
        p = len(req.prompt)
        b = self.settings.block_length
        canvas_len = math.ceil((p + req.options["gen_length"]) / b) * b
        commit = np.asarray(st.commit_step[slot])
        forwards = int(st.forwards[slot])
        generated = int(np.isin(tokens, [self.eos_id, self.config.pad_token_id, self.mask_id], invert=True).sum())
        logprob = np.asarray(st.logprob[slot])
        return Result(id=req.id, tokens=tokens, commit_steps=commit[p:p + len(tokens)].tolist(),
                      logprobs=logprob[p:p + len(tokens)].tolist(),
                      canvas=row[:canvas_len].copy(), forwards=forwards, steps=int(st.steps[slot]),
                      cache_writes=int(st.cache_writes[slot]), mbe_forwards=int(st.mbe_forwards[slot]),
                      num_generated=generated, tpf=generated / max(forwards, 1), cached_tokens=self._cached[slot])

    def run(self, requests: list[tuple[list[int], dict[str, Any]]]) -> list[Result]:
        """Convenience: submit all, poll until idle, results in submission order."""
        ids = [self.submit(p, o) for p, o in requests]
        out = {}
        while not self.idle:
            for r in self.poll():
                out[r.id] = r
        return [out[i] for i in ids]

    def compiled_programs(self) -> int:
        """Programs compiled so far by this engine's two jitted functions (for tests)."""
        return self._admit_fn._cache_size() + self._run_fn._cache_size()
