"""The host entry point of Draft-and-Edit decoding: `generate` (lists of prompts in, answers truncated
after the first EOS and per-row statistics out; on a mesh, every process decodes its rows) and
`summarize`, which turns a finished `DecodeState` into a `GenerateOutput`. Streaming: `on_block`
is called with each row's newly finished block from inside the jitted loop."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from llada_jax.decode.options import (MBE_DEFAULTS, check_options, check_prompts, DecodeSettings, fail, make_knobs,
                                      trajectory_capacity)
from llada_jax.decode.loop import canvas_bucket, decode, DecodeState
from llada_jax.model.config import ModelConfig

class Trajectory(NamedTuple):
    """Every write the decoder made (`generate(..., record_trajectory=True)`), for DiPO.

    write_step [N, L, W]: for each canvas position, the row's denoising-step index (0-based, the
    step counter of `steps`) of each write in order, -1 for an unused slot; a Multi-Block Editing
    write carries the last denoising step before it. write_token [N, L, W]: the token written.
    write_count [N, L]: writes per position. A position's value before step s is its last write
    at a step < s (the mask id if none; prompt positions are never written). Together with the
    final `canvas` (positions past the first EOS and past `P + gen_length` included) this is the
    exact context of every decision.
    """

    write_step: np.ndarray
    write_token: np.ndarray
    write_count: np.ndarray
    prompt_lengths: np.ndarray


class GenerateOutput(NamedTuple):
    """What `generate` returns, one entry per prompt.

    tokens: generated ids up to and including the first EOS (all `gen_length` if none), as the
      reference returns them. commit_steps: for each of those tokens, the row's denoising-step
      index (0-based) at which it was last written (a token edited by MBE gets the last step of
      the block whose end triggered the edit). canvas: [N, L] final canvases; positions past a
      row's own canvas length, or after an early stop, hold the mask id. forwards = steps +
      cache_writes + mbe_forwards, every model forward the row took part in; steps is the
      number of denoising forwards, comparable to the uncached reference's forward count.
      tpf = generated tokens excluding EOS/pad / forwards. logprobs: for each of `tokens`, its
      log-probability under the model's distribution (softmax of the raw logits, before penalty,
      temperature and top-k/top-p) at the forward that last wrote it, the step of `commit_steps`.
    """

    tokens: list[list[int]]
    commit_steps: list[list[int]]
    canvas: np.ndarray
    canvas_lengths: np.ndarray
    forwards: np.ndarray
    steps: np.ndarray
    cache_writes: np.ndarray
    mbe_forwards: np.ndarray
    num_generated: np.ndarray
    tpf: np.ndarray
    trajectory: Optional[Trajectory] = None
    logprobs: Optional[list[list[float]]] = None

def generate(params, config: ModelConfig, prompts, *, gen_length: int, block_length: int = 32,
             threshold: Optional[float] = None, editing_threshold: Optional[float] = None,
             max_post_steps: int = 16, eos_early_stop: bool = False, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, penalty_lambda: float = 0.0,
             mask_id: Optional[int] = None, eos_id: Optional[int] = None, rng: Optional[jax.Array] = None,
             use_cache: bool = True, mbe_window: int = 0, preset: Optional[str] = None,
             llada20: Optional[bool] = None, on_block: Optional[Callable] = None,
             record_trajectory: bool = False, mbe_attention: str = "bidirectional",
             mbe_select: str = "surprisal", mbe_max_steps: int = MBE_DEFAULTS["mbe_max_steps"],
             mbe_threshold: float = MBE_DEFAULTS["mbe_threshold"],
             mbe_editing_threshold: float = MBE_DEFAULTS["mbe_editing_threshold"],
             mbe_fraction: float = MBE_DEFAULTS["mbe_fraction"],
             mesh: Optional[jax.sharding.Mesh] = None) -> GenerateOutput:
    """Draft-and-Edit generation for a batch of prompts (REFERENCE §5).

    `preset` ("S", "Q", "no_edit", "llada20") fills `threshold`, `editing_threshold` and
    `llada20`; explicit arguments override it. `threshold` is in [0, 1]; `editing_threshold`
    is >= 0 and any value >= 1 disables editing (p > 1 never holds). `llada20=True` runs the
    LLaDA2.0 loop: no editing, a block ends as soon as it has no masks, and decoding stops after
    a block whose generated part holds an EOS. Prompts may have different lengths; greedy
    decoding gives each the tokens it would get alone. `mbe_window > 0` turns on Multi-Block
    Editing: after each block, a window of that many blocks (the new one and history blocks
    chosen by `mbe_select`: "surprisal", the most uncertain `mbe_fraction` of the history, or
    "last") is reopened for at most `mbe_max_steps` edit forwards with its own thresholds
    `mbe_threshold` (w_mask) and `mbe_editing_threshold` (w_edit); its blocks attend to each other
    as `mbe_attention` says ("bidirectional" or "block_causal", see `decode.loop`). Sampling (temperature > 0) needs `rng`; step keys
    are `fold_in(fold_in(rng, row), forwards so far)`. `on_block` streams finished blocks to a
    host function (see `decode`). `record_trajectory` also returns every write of every position
    with its step (`GenerateOutput.trajectory`, what DiPO needs).

    `mesh`: decode on a device mesh, rows split over its batch axes (`hosts.global_batch`; a
    row count those axes do not divide is an error) and `params` as sharded there. With several
    processes, `prompts` are this process's rows of the global batch, the canvas width is agreed
    across processes, rows are numbered globally (so sampling keys match a one-process run) and
    the output holds this process's rows.
    """
    opts = check_options(
        config, gen_length=gen_length, block_length=block_length, threshold=threshold,
        editing_threshold=editing_threshold, max_post_steps=max_post_steps, eos_early_stop=eos_early_stop,
        temperature=temperature, top_k=top_k, top_p=top_p, penalty_lambda=penalty_lambda, mask_id=mask_id,
        eos_id=eos_id, mbe_window=mbe_window, preset=preset, llada20=llada20, mbe_attention=mbe_attention,
        mbe_select=mbe_select, mbe_max_steps=mbe_max_steps, mbe_threshold=mbe_threshold,
        mbe_editing_threshold=mbe_editing_threshold, mbe_fraction=mbe_fraction)
    mask_id, eos_id, vocab = opts["mask_id"], opts["eos_id"], config.vocab_size
    threshold, editing_threshold, llada20 = opts["threshold"], opts["editing_threshold"], opts["llada20"]
    greedy = temperature == 0.0
    if not greedy and rng is None:
        fail("rng", "a PRNG key when temperature > 0", rng)
    rows = check_prompts(prompts, vocab, mask_id)
    canvas, prompt_lens, canvas_lens = prepare_canvas(rows, config, gen_length=gen_length,
                                                      block_length=block_length, mask_id=mask_id, mesh=mesh)

    settings = DecodeSettings(
        block_length=block_length, mask_id=int(mask_id), eos_id=int(eos_id), pad_id=config.pad_token_id,
        greedy=greedy, filter_top=not greedy and (top_k is not None or top_p is not None),
        use_cache=use_cache, mbe_window=mbe_window, mbe_attention=mbe_attention, mbe_select=mbe_select,
        record_writes=trajectory_capacity(block_length, max_post_steps, mbe_window, mbe_max_steps=mbe_max_steps,
                                          mbe_select=mbe_select, num_blocks=canvas.shape[1] // block_length)
        if record_trajectory else 0)
    knobs = make_knobs(vocab, threshold=threshold, editing_threshold=editing_threshold, temperature=temperature,
                       top_k=top_k, top_p=top_p, penalty_lambda=penalty_lambda, max_post_steps=max_post_steps,
                       eos_early_stop=eos_early_stop, llada20=llada20, mbe_max_steps=mbe_max_steps,
                       mbe_threshold=mbe_threshold, mbe_editing_threshold=mbe_editing_threshold,
                       mbe_fraction=mbe_fraction)
    rng = jax.random.key(0) if rng is None else rng
    if mesh is None:
        state = decode(params, jnp.asarray(canvas), jnp.asarray(prompt_lens), jnp.asarray(canvas_lens), knobs, rng,
                       config=config, settings=settings, on_block=on_block)
        return summarize(state, prompt_lens, canvas_lens, gen_length, settings)
    import flax.linen as nn

    from llada_jax.parallel import hosts, sharding

    arrays = hosts.global_batch(mesh, {"canvas": canvas, "prompt_lens": prompt_lens, "canvas_lens": canvas_lens},
                                what="prompts (rows)")
    args = (params, arrays["canvas"], arrays["prompt_lens"], arrays["canvas_lens"], knobs, rng)
    key = (config, settings, on_block, mesh, jax.tree_util.tree_structure(args),
           tuple((x.shape, x.dtype, x.sharding) for x in jax.tree_util.tree_leaves(args)))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        if key not in _COMPILED_ON_MESH:  # compiled once per shape; processes start it together
            _COMPILED_ON_MESH[key] = hosts.compile_together(decode, *args, name=f"decode/{len(_COMPILED_ON_MESH)}",
                                                            config=config, settings=settings, on_block=on_block)
        state = _COMPILED_ON_MESH[key](*args)
    # This process's rows of every per-row field (the cache stays on device and is dropped).
    rows = arrays["canvas"].shape[0]
    state = state.replace(cache=None, **{
        f.name: hosts.host_local(getattr(state, f.name), mesh) for f in dataclasses.fields(state)
        if f.name != "cache" and getattr(getattr(state, f.name), "ndim", 0) >= 1
        and getattr(state, f.name).shape[0] == rows})
    return summarize(state, prompt_lens, canvas_lens, gen_length, settings)


def prepare_canvas(rows: list[list[int]], config: ModelConfig, *, gen_length: int, block_length: int, mask_id: int,
                   mesh: Optional[jax.sharding.Mesh] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(canvas [N, L], prompt_lens [N], canvas_lens [N])` of checked prompt rows: each row's prompt
    then mask ids; L is a power of two of blocks covering the longest row (on a mesh, of every
    process), so prompts of many lengths share a few compiled programs."""
    prompt_lens = np.array([len(r) for r in rows], np.int32)
    canvas_lens = np.array([math.ceil((p + gen_length) / block_length) * block_length for p in prompt_lens],
                           np.int32)
    length = int(canvas_lens.max())
    if mesh is not None:  # static shapes and settings must agree on every process
        from llada_jax.parallel import hosts

        length = int(hosts.allgather(np.array([length], np.int64)).max())
    if length > config.max_position_embeddings:
        fail("canvas length ceil((prompt + gen_length) / block_length) * block_length",
              f"<= max_position_embeddings={config.max_position_embeddings}", length)
    # The compiled canvas is a power of two of blocks; rows never read past their own length.
    length = block_length * canvas_bucket(length // block_length, config.max_position_embeddings // block_length)
    canvas = np.full((len(rows), length), mask_id, np.int32)
    for i, row in enumerate(rows):
        canvas[i, :len(row)] = row
    return canvas, prompt_lens, canvas_lens


_COMPILED_ON_MESH: dict = {}  # `generate(mesh=...)`'s programs, by static settings and argument layout


def summarize(state: DecodeState, prompt_lens, canvas_lens, gen_length: int,
              settings: DecodeSettings) -> GenerateOutput:
    """Host-side result of `decode`: answers truncated after the first EOS, and statistics."""
    width = int(np.max(canvas_lens))  # the compiled canvas may be longer (a bucket)
    trajectory = None
    if state.write_step is not None:
        count = np.asarray(state.write_count)[:, :width]
        if count.max(initial=0) > settings.record_writes:
            raise RuntimeError(f"decode: a position was written {int(count.max())} times, more than the "
                               f"trajectory capacity {settings.record_writes}")
        trajectory = Trajectory(write_step=np.asarray(state.write_step)[:, :width],
                                write_token=np.asarray(state.write_token)[:, :width],
                                write_count=count, prompt_lengths=np.asarray(prompt_lens))
    canvas, commit = np.asarray(state.canvas)[:, :width], np.asarray(state.commit_step)[:, :width]
    logprob = np.asarray(state.logprob)[:, :width]
    forwards = np.asarray(state.forwards)
    tokens, commit_steps, logprobs, generated = [], [], [], []
    for r, p in enumerate(np.asarray(prompt_lens)):
        gen = canvas[r, p:p + gen_length]
        eos = np.flatnonzero(gen == settings.eos_id)
        end = int(eos[0]) + 1 if eos.size else gen_length
        tokens.append(gen[:end].tolist())
        commit_steps.append(commit[r, p:p + end].tolist())
        logprobs.append(logprob[r, p:p + end].tolist())
        generated.append(int(np.isin(gen[:end], [settings.eos_id, settings.pad_id, settings.mask_id],
                                     invert=True).sum()))
    generated = np.array(generated, np.int32)
    return GenerateOutput(
        tokens=tokens, commit_steps=commit_steps, canvas=canvas, canvas_lengths=np.asarray(canvas_lens),
        forwards=forwards, steps=np.asarray(state.steps), cache_writes=np.asarray(state.cache_writes),
        mbe_forwards=np.asarray(state.mbe_forwards), num_generated=generated,
        tpf=generated / np.maximum(forwards, 1), trajectory=trajectory, logprobs=logprobs)
