"""Group rollouts for RL: G samples of each prompt on the decoding loop's `step`, each group's prompt
prefilled once, rows stopped at their first EOS and the batch shrunk as rows finish (REFERENCE §5, §6).

`generate` decodes N = P x G rows until the slowest one is done: every row takes part in every
forward, and each of a group's G rows prefills the same prompt. `generate_groups` returns what
`generate(rows, eos_early_stop=...)` returns for the same rows and key, row for row and token for
token (`tests/decode/test_rollouts.py`), with less work:

  * shared prefill (`prefill_groups`): the P distinct prompts go through `kvcache.prefill` once
    and each cache row is repeated G times (rows never read each other, so this is the cache G
    separate prefills write, bit for bit);
  * early stop: with `eos_early_stop` (RL's default) a row is DONE after the block that holds its
    first EOS. Without Multi-Block Editing a finished block never changes, so the answer up to the
    first EOS is the one a full decode gives; the canvas past the stop keeps the mask id and the
    trajectory holds the writes actually made (DiPO's exact record of this decode);
  * compaction: the loop runs in segments (one compiled `lax.while_loop` each) that end once the
    running rows fit the next smaller batch size; they (their canvas, cache rows, counters,
    sampling keys) are then gathered into it. The sizes go down in equal steps of about an eighth
    of the rows (`batch_sizes`), so forwards follow the live rows instead of the slowest one: a
    batch of RL completions that mostly run long (`bench/rl_step.py`'s: a quarter at the full
    length) computes 1.30x fewer row-forwards than the static batch this way, against 1.06x by
    halvings (the live rows' own forwards are 1.40x fewer). A few batch sizes, a few programs;
  * `on_finish(row, tokens)` gets each row's answer once it is done (a segment also ends every
    `steps_per_call` forwards when some row has finished), so a caller can score finished rows
    while the others decode.

Sampling keys are those of `generate`: row r (its index among the N rows) samples with
`fold_in(rng, r)` folded with its own forward count, and the keys travel with the rows when the
batch shrinks, so the draws do not depend on which rows share a forward.

A mesh of this process's devices: the rows' arrays follow the model's sharding constraints (batch
sizes are kept multiples of the mesh's batch ways while they shrink). On several processes each
decodes its own rows on its own devices (the RL loop: its prompts, on `hosts.process_blocks`'s
local block with a whole copy of the params, rows numbered by `row_offset`): no process waits on
another's compactions. A global batch over several processes is `generate`'s.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from llada_jax.decode import kvcache
from llada_jax.decode.generation import GenerateOutput, prepare_canvas, summarize
from llada_jax.decode.loop import DONE, DecodeState, init_state, row_keys_for, step
from llada_jax.decode.options import (DecodeSettings, check_int, check_options, check_prompts, fail, make_knobs,
                                      trajectory_capacity)
from llada_jax.model.config import ModelConfig

# Fields of `DecodeState` with one row per entry along axis 0 (the cache's rows are axis 1).
_ROW_FIELDS = ("canvas", "block", "phase", "post_steps", "steps", "cache_writes", "mbe_forwards", "commit_step",
               "logprob", "stale", "write_step", "write_token", "write_count")
# The fields a finished row contributes to the result.
_KEPT = ("canvas", "block", "phase", "steps", "cache_writes", "mbe_forwards", "commit_step", "logprob",
         "write_step", "write_token", "write_count")


def prefill_groups(params, config: ModelConfig, canvas, prompt_lens, *, group_size: int, block_length: int,
                   chunk_blocks: int = 8):
    """The KV cache of P prompts' full blocks, each row repeated `group_size` times:
    `{"dense"|"moe": {"k", "v": [layers, P * G, L, K, H]}}`, rows grouped by prompt (row p*G + g is
    prompt p), equal to `kvcache.prefill` of the P * G repeated rows."""
    p, length = canvas.shape
    b = block_length
    cache = kvcache.prefill(params, config, canvas, prompt_lens // b, kvcache.init_cache(config, p, length),
                            block_length=b, chunk_blocks=chunk_blocks, prefix_buckets=kvcache.buckets(length // b))
    return jax.tree.map(lambda c: jnp.repeat(c, group_size, axis=1), cache)


@functools.partial(jax.jit, static_argnames=("config", "settings", "group_size"))
def _start(params, canvas, prompt_lens, rng, row_offset, *, config, settings, group_size):
    """The loop state of the P * G rows after the shared prefill, and their sampling keys (rows
    numbered from `row_offset`)."""
    cache = prefill_groups(params, config, canvas, prompt_lens, group_size=group_size,
                           block_length=settings.block_length, chunk_blocks=settings.prefill_chunk_blocks)
    rows = jnp.repeat(canvas, group_size, axis=0)
    lens = jnp.repeat(prompt_lens, group_size, axis=0)
    state = init_state(params, rows, lens, config=config, settings=settings, cache=cache)
    return state, row_keys_for(rng, rows.shape[0], row_offset)


@functools.partial(jax.jit, static_argnames=("config", "settings"), donate_argnums=(1,))
def _segment(params, state: DecodeState, prompt_lens, num_blocks, knobs, row_keys, stop_at, report_after, *,
             config, settings) -> tuple[DecodeState, jax.Array]:
    """Loop iterations until at most `stop_at` rows run, or, after `report_after` iterations, a
    row that was running has finished. Returns the state and the iterations run."""
    running = state.phase != DONE
    body = functools.partial(step, params, prompt_lens=prompt_lens, num_blocks=num_blocks, knobs=knobs,
                             row_keys=row_keys, config=config, settings=settings)

    def cond(carry):
        i, st = carry
        live = st.phase != DONE
        return (live.sum() > stop_at) & ~((i >= report_after) & (running & ~live).any())

    n, state = jax.lax.while_loop(cond, lambda c: (c[0] + 1, body(c[1])), (jnp.int32(0), state))
    return state, n


@jax.jit
def _gather(state: DecodeState, prompt_lens, num_blocks, row_keys, index, pad):
    """Rows `index` of everything per row (the cache's axis 1); `pad` rows become DONE."""
    def take(x, axis=0):
        return None if x is None else jnp.take(x, index, axis=axis)

    state = state.replace(cache=jax.tree.map(lambda c: take(c, 1), state.cache),
                          **{f: take(getattr(state, f)) for f in _ROW_FIELDS})
    state = state.replace(phase=jnp.where(pad, DONE, state.phase))
    return state, take(prompt_lens), take(num_blocks), take(row_keys)


def batch_sizes(rows: int, min_rows: int = 1, levels: int = 8, min_step: int = 4) -> tuple[int, ...]:
    """The batch sizes the decode shrinks through: `rows`, then `rows` less one step at a time, at
    most `levels` sizes (each is a compiled program). The step is `rows // levels`, at least
    `min_step` rows (small batches gain little from finer steps and would compile more programs),
    rounded up to a multiple of `min_rows` (the mesh's batch ways), so every size is one where
    `rows` is."""
    for name, value in (("rows", rows), ("min_rows", min_rows), ("levels", levels), ("min_step", min_step)):
        check_int(name, value, 1)
    if rows % min_rows:
        fail("rows", f"a multiple of min_rows={min_rows}", rows)
    step = -(-max(rows // levels, min_step, min_rows) // min_rows) * min_rows
    return tuple(range(rows, 0, -step))[:levels]


def generate_groups(params, config: ModelConfig, prompts, *, group_size: int, gen_length: int,
                    block_length: int = 32, threshold: Optional[float] = None,
                    editing_threshold: Optional[float] = None, max_post_steps: int = 16,
                    eos_early_stop: bool = True, temperature: float = 0.0, top_k: Optional[int] = None,
                    top_p: Optional[float] = None, penalty_lambda: float = 0.0, mask_id: Optional[int] = None,
                    eos_id: Optional[int] = None, rng: Optional[jax.Array] = None, preset: Optional[str] = None,
                    llada20: Optional[bool] = None, record_trajectory: bool = False, compact: bool = True,
                    steps_per_call: int = 16, levels: int = 8,
                    on_finish: Optional[Callable[[int, list[int]], None]] = None,
                    mesh: Optional[jax.sharding.Mesh] = None, row_offset: int = 0) -> GenerateOutput:
    """`group_size` rollouts of each prompt: the `GenerateOutput` of `generate` over the rows
    `[p for p in prompts for _ in range(group_size)]` with the same keywords and `rng` (see the
    module docstring for what is shared and skipped). Multi-Block Editing is not offered.

    `compact`: shrink the batch as rows finish (through `levels` batch sizes; False keeps every
    row in every forward, as `generate`). `on_finish(row, tokens)`: called on the host with each
    row's answer (up to and including the first EOS) once it is done, in finishing order.
    `mesh`: a mesh of this process's devices to decode on (the params as sharded there; on
    several processes each decodes its own prompts on its own devices, e.g. on
    `hosts.process_blocks(...).local` with `hosts.process_local_copy` params). `row_offset`: the
    index of the first row among all rows (sampling keys are `generate`'s for rows `row_offset`,
    `row_offset + 1`, ...: a process decoding a slice of a global batch draws what one process
    decoding the whole batch draws for those rows); `on_finish` and the output count from 0.
    """
    opts = check_options(
        config, gen_length=gen_length, block_length=block_length, threshold=threshold,
        editing_threshold=editing_threshold, max_post_steps=max_post_steps, eos_early_stop=eos_early_stop,
        temperature=temperature, top_k=top_k, top_p=top_p, penalty_lambda=penalty_lambda, mask_id=mask_id,
        eos_id=eos_id, preset=preset, llada20=llada20)
    check_int("group_size", group_size, 1)
    check_int("steps_per_call", steps_per_call, 1)
    greedy = temperature == 0.0
    if not greedy and rng is None:
        fail("rng", "a PRNG key when temperature > 0", rng)
    ways = 1
    check_int("row_offset", row_offset, 0)
    if mesh is not None:
        others = sorted({d.process_index for d in mesh.devices.flat} - {jax.process_index()})
        if others:
            fail("mesh", f"a mesh of this process's devices (process {jax.process_index()}; a global batch over "
                 "several processes: decode.generate)", f"devices of processes {others}")
        from llada_jax.parallel import hosts

        ways = hosts.batch_ways(mesh)
    rows = check_prompts(prompts, config.vocab_size, opts["mask_id"])
    canvas, prompt_lens, canvas_lens = prepare_canvas(rows, config, gen_length=gen_length, block_length=block_length,
                                                      mask_id=opts["mask_id"])
    n = len(rows) * group_size
    settings = DecodeSettings(
        block_length=block_length, mask_id=opts["mask_id"], eos_id=opts["eos_id"], pad_id=config.pad_token_id,
        greedy=greedy, filter_top=not greedy and (top_k is not None or top_p is not None), use_cache=True,
        mbe_window=0,
        record_writes=trajectory_capacity(block_length, max_post_steps, 0) if record_trajectory else 0)
    all_prompt_lens = np.repeat(prompt_lens, group_size)
    all_canvas_lens = np.repeat(canvas_lens, group_size)
    sizes = batch_sizes(n, ways if n % ways == 0 else n, levels) if compact else (n,)
    # A segment returns early for a finished row only when someone is waiting to hear of it.
    report_after = steps_per_call if on_finish is not None else np.iinfo(np.int32).max

    context = contextlib.ExitStack()
    if mesh is not None:
        import flax.linen as nn

        from llada_jax.parallel import sharding

        context.enter_context(jax.set_mesh(mesh))
        context.enter_context(nn.logical_axis_rules(sharding.DEFAULT_RULES))
    with context:  # arrays made in here live on `mesh`, not on a caller's (a global mesh of several processes)
        knobs = make_knobs(config.vocab_size, threshold=opts["threshold"],
                           editing_threshold=opts["editing_threshold"], temperature=temperature, top_k=top_k,
                           top_p=top_p, penalty_lambda=penalty_lambda, max_post_steps=max_post_steps,
                           eos_early_stop=opts["eos_early_stop"], llada20=opts["llada20"])
        rng = jax.random.key(0) if rng is None else process_local_value(rng)
        state, row_keys = _start(params, jnp.asarray(canvas), jnp.asarray(prompt_lens), rng, jnp.int32(row_offset),
                                 config=config, settings=settings, group_size=group_size)
        lens = jnp.asarray(all_prompt_lens)
        blocks = jnp.asarray(all_canvas_lens // block_length)
        where = np.arange(n)  # batch position -> row (-1: padding)
        kept: dict[str, np.ndarray] = {}
        done = np.zeros(n, bool)
        level = 0
        while True:
            stop_at = sizes[level + 1] if level + 1 < len(sizes) else 0
            state, _ = _segment(params, state, lens, blocks, knobs, row_keys, jnp.int32(stop_at),
                                jnp.int32(report_after), config=config, settings=settings)
            phase = np.asarray(state.phase)
            new = np.flatnonzero((phase == DONE) & (where >= 0) & ~done[np.maximum(where, 0)])
            if new.size:
                host = {f: np.asarray(getattr(state, f))[new] for f in _KEPT if getattr(state, f) is not None}
                for f, v in host.items():
                    if f not in kept:
                        kept[f] = np.zeros((n,) + v.shape[1:], v.dtype)
                    kept[f][where[new]] = v
                done[where[new]] = True
                if on_finish is not None:
                    for i in new:
                        r = int(where[i])
                        on_finish(r, _answer(kept["canvas"][r], int(all_prompt_lens[r]), gen_length,
                                             settings.eos_id))
            live = np.flatnonzero((phase != DONE) & (where >= 0))
            if not live.size:
                break
            if level + 1 < len(sizes) and live.size <= sizes[level + 1]:
                while level + 1 < len(sizes) and live.size <= sizes[level + 1]:
                    level += 1
                size = sizes[level]
                index = np.concatenate([live, np.full(size - live.size, live[0])]).astype(np.int32)
                pad = np.arange(size) >= live.size
                state, lens, blocks, row_keys = _gather(state, lens, blocks, row_keys, jnp.asarray(index),
                                                        jnp.asarray(pad))
                where = np.where(pad, -1, where[index])
    final = DecodeState(cache=None, post_steps=None, stale=None, **{f: kept.get(f) for f in _KEPT})
    return summarize(final, all_prompt_lens, all_canvas_lens, gen_length, settings)


def process_local_value(x):
    """`x` as this process's own array: a global array every process holds whole (a replicated key
    on a mesh of several processes) becomes its local copy; anything else is returned as is."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return x
    if not x.sharding.is_fully_replicated:
        fail("rng", "a key every process holds whole", x.sharding)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(np.asarray(jax.random.key_data(x).addressable_data(0)),
                                        impl=jax.random.key_impl(x))
    return jnp.asarray(np.asarray(x.addressable_data(0)))


def _answer(canvas_row: np.ndarray, prompt_len: int, gen_length: int, eos_id: int) -> list[int]:
    """A row's generated tokens up to and including the first EOS (as `summarize` cuts them)."""
    gen = canvas_row[prompt_len:prompt_len + gen_length]
    eos = np.flatnonzero(gen == eos_id)
    return gen[:int(eos[0]) + 1 if eos.size else gen_length].tolist()
