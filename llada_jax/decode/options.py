"""Decoding options (REFERENCE §5): mode presets, the static settings that pick a compiled program,
the traced per-row knobs, and their validation (`OptionError` names the field, the expected and
the found value)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from llada_jax.model.config import ModelConfig

# Mode presets (REFERENCE §5, model card). `no_edit` is LLaDA2.0-style thresholds on the 2.1
# loop (one post-fill forward per block); `llada20` is the LLaDA2.0 loop itself.
PRESETS: dict[str, dict[str, Any]] = {
    "S": dict(threshold=0.5, editing_threshold=0.0),
    "Q": dict(threshold=0.7, editing_threshold=0.5),
    "no_edit": dict(threshold=0.95, editing_threshold=1.0),
    "llada20": dict(threshold=0.95, editing_threshold=1.0, llada20=True),
}


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """The static part of a decoding run: everything that changes the compiled program."""

    block_length: int
    mask_id: int
    eos_id: int
    pad_id: int
    greedy: bool
    filter_top: bool  # sampled decoding with top-k and/or top-p filtering
    use_cache: bool
    mbe_window: int
    mbe_attention: str = "bidirectional"  # or "block_causal" (see the module docstring)
    # How a Multi-Block Editing window picks its history blocks: "surprisal" (the most uncertain
    # blocks, `Knobs.mbe_fraction`) or "last" (the blocks just before the new one).
    mbe_select: str = "surprisal"
    prefill_chunk_blocks: int = 8  # blocks per prefill forward
    # How far a cached forward reads the prefix: buckets of blocks, each at most `prefix_growth`
    # times the one before (`kvcache.buckets`), at most `prefix_max_buckets` compiled branches.
    prefix_growth: float = 2.0
    prefix_max_buckets: int = 64
    # Capacity of the per-position write record (0 = off): DiPO's exact trajectory. A position can
    # be written at most once per step of its block (B + max_post_steps steps) and once per MBE
    # proposal while in the window, so `trajectory_capacity` sets it to that bound.
    record_writes: int = 0


MBE_ATTENTION = ("bidirectional", "block_causal")
MBE_SELECT = ("surprisal", "last")
# Multi-Block Editing defaults ("Beyond Block Boundaries", REFERENCE §5): at most 5 edit steps per
# window, its own thresholds w_mask 0.5 and w_edit 0.0, history blocks from the most uncertain 25%.
MBE_DEFAULTS = dict(mbe_max_steps=5, mbe_threshold=0.5, mbe_editing_threshold=0.0, mbe_fraction=0.25)


@flax.struct.dataclass
class Knobs:
    """The traced part of a decoding run: S, Q and no-edit share one compiled program.

    Every field is a scalar (all rows) or an [N] array (one value per row, as the engine's slots).
    """

    threshold: Float[Array, ""]
    editing_threshold: Float[Array, ""]
    temperature: Float[Array, ""]
    top_k: Int[Array, ""]  # vocab size = off
    top_p: Float[Array, ""]  # 1.0 = off
    penalty_lambda: Float[Array, ""]
    max_post_steps: Int[Array, ""]
    eos_early_stop: Bool[Array, ""]
    llada20: Bool[Array, ""]
    mbe: Any = True  # this row uses Multi-Block Editing (when the program has a window)
    mbe_max_steps: Any = MBE_DEFAULTS["mbe_max_steps"]  # edit forwards per window at most
    mbe_threshold: Any = MBE_DEFAULTS["mbe_threshold"]  # w_mask: fills a masked window position
    mbe_editing_threshold: Any = MBE_DEFAULTS["mbe_editing_threshold"]  # w_edit: edits a window token
    mbe_fraction: Any = MBE_DEFAULTS["mbe_fraction"]  # "surprisal" windows: the uncertain share of history


class OptionError(ValueError):
    """A bad decoding option or prompt; `field` names it (the server answers HTTP 400 with it)."""

    def __init__(self, field: str, expected: str, found):
        super().__init__(f"generate: {field}: expected {expected}, found {found!r}")
        self.field = field


def fail(field, expected, found):
    raise OptionError(field, expected, found)


def check_int(field: str, value, lo: int, hi: Optional[int] = None) -> None:
    """`value` is an integer (not a bool) in [lo, hi), or `OptionError` names `field`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo \
            or (hi is not None and value >= hi):
        fail(field, f"an integer in [{lo}, {hi})" if hi is not None else f"an integer >= {lo}", value)


def _as_prompt_list(prompts) -> list[list[int]]:
    if isinstance(prompts, (np.ndarray, jax.Array)):
        arr = np.asarray(prompts)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            fail("prompts", "a list of token-id lists or an integer array [N, P]",
                  f"array of shape {arr.shape} and dtype {arr.dtype}")
        return [list(map(int, row)) for row in arr]
    if not isinstance(prompts, Sequence) or isinstance(prompts, (str, bytes)) or not prompts:
        fail("prompts", "a non-empty list of token-id lists", prompts)
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (int, np.integer)):
            fail("prompts", "a list of token-id lists (one list per prompt)", f"a flat list at index {i}")
        row = [int(t) for t in np.asarray(p).reshape(-1)]
        if not row:
            fail(f"prompts[{i}]", "at least one token", p)
        out.append(row)
    return out


def check_options(config: ModelConfig, *, gen_length: int, block_length: int = 32,
                  threshold: Optional[float] = None, editing_threshold: Optional[float] = None,
                  max_post_steps: int = 16, eos_early_stop: bool = False, temperature: float = 0.0,
                  top_k: Optional[int] = None, top_p: Optional[float] = None, penalty_lambda: float = 0.0,
                  mask_id: Optional[int] = None, eos_id: Optional[int] = None, mbe_window: int = 0,
                  preset: Optional[str] = None, llada20: Optional[bool] = None,
                  mbe_attention: str = "bidirectional", mbe_select: str = "surprisal",
                  mbe_max_steps: int = MBE_DEFAULTS["mbe_max_steps"],
                  mbe_threshold: float = MBE_DEFAULTS["mbe_threshold"],
                  mbe_editing_threshold: float = MBE_DEFAULTS["mbe_editing_threshold"],
                  mbe_fraction: float = MBE_DEFAULTS["mbe_fraction"]) -> dict[str, Any]:
    """The decoding options of `generate` checked and resolved (preset applied, ids defaulted);
    raises `OptionError` naming the field, the expected and the found value."""
    if preset is not None:
        if preset not in PRESETS:
            fail("preset", f"one of {sorted(PRESETS)}", preset)
        chosen = PRESETS[preset]
        threshold = chosen["threshold"] if threshold is None else threshold
        editing_threshold = chosen["editing_threshold"] if editing_threshold is None else editing_threshold
        llada20 = chosen.get("llada20", False) if llada20 is None else llada20
    llada20 = bool(llada20)
    if threshold is None or editing_threshold is None:
        fail("threshold/editing_threshold", "values, or a preset", (threshold, editing_threshold))
    mask_id = config.mask_token_id if mask_id is None else mask_id
    eos_id = config.eos_token_id if eos_id is None else eos_id
    vocab = config.vocab_size

    for field, value in (("threshold", threshold), ("editing_threshold", editing_threshold),
                         ("temperature", temperature), ("penalty_lambda", penalty_lambda), ("top_p", top_p),
                         ("mbe_threshold", mbe_threshold), ("mbe_editing_threshold", mbe_editing_threshold),
                         ("mbe_fraction", mbe_fraction)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.integer,
                                                                                      np.floating))):
            fail(field, "a number", value)
    for field, value in (("eos_early_stop", eos_early_stop), ("llada20", llada20)):
        if not isinstance(value, (bool, np.bool_)):
            fail(field, "true or false", value)
    check_int("gen_length", gen_length, 1)
    check_int("block_length", block_length, 1)
    check_int("max_post_steps", max_post_steps, 0)
    check_int("mbe_window", mbe_window, 0)
    if mbe_attention not in MBE_ATTENTION:
        fail("mbe_attention", f"one of {MBE_ATTENTION}", mbe_attention)
    if mbe_select not in MBE_SELECT:
        fail("mbe_select", f"one of {MBE_SELECT}", mbe_select)
    check_int("mbe_max_steps", mbe_max_steps, 1)
    if not 0.0 <= mbe_threshold <= 1.0:
        fail("mbe_threshold", "a value in [0, 1]", mbe_threshold)
    if not mbe_editing_threshold >= 0.0:
        fail("mbe_editing_threshold", "a value >= 0 (>= 1 disables MBE edits)", mbe_editing_threshold)
    if not 0.0 <= mbe_fraction <= 1.0:
        fail("mbe_fraction", "a share of the history blocks in [0, 1]", mbe_fraction)
    check_int("mask_id", mask_id, 0, vocab)
    check_int("eos_id", eos_id, 0, vocab)
    if mask_id == eos_id:
        fail("eos_id", f"an id different from mask_id={mask_id}", eos_id)
    if not 0.0 <= threshold <= 1.0:
        fail("threshold", "a value in [0, 1]", threshold)
    if not editing_threshold >= 0.0:  # also rejects NaN
        fail("editing_threshold", "a value >= 0 (>= 1 disables editing)", editing_threshold)
    if not temperature >= 0.0:
        fail("temperature", "a value >= 0", temperature)
    if top_k is not None:
        check_int("top_k", top_k, 1, vocab + 1)
    if top_p is not None and not 0.0 < top_p <= 1.0:
        fail("top_p", "a value in (0, 1]", top_p)
    if not penalty_lambda >= 0.0:
        fail("penalty_lambda", "a value >= 0", penalty_lambda)
    return dict(gen_length=gen_length, block_length=block_length, threshold=float(threshold),
                editing_threshold=float(editing_threshold), max_post_steps=int(max_post_steps),
                eos_early_stop=bool(eos_early_stop), temperature=float(temperature), top_k=top_k, top_p=top_p,
                penalty_lambda=float(penalty_lambda), mask_id=int(mask_id), eos_id=int(eos_id),
                mbe_window=int(mbe_window), llada20=llada20, mbe_attention=mbe_attention, mbe_select=mbe_select,
                mbe_max_steps=int(mbe_max_steps), mbe_threshold=float(mbe_threshold),
                mbe_editing_threshold=float(mbe_editing_threshold), mbe_fraction=float(mbe_fraction))


def check_prompts(prompts, vocab: int, mask_id: int) -> list[list[int]]:
    """Prompts as lists of ids, each non-empty and free of out-of-range ids and the mask id."""
    rows = _as_prompt_list(prompts)
    for i, row in enumerate(rows):
        bad = [t for t in row if not 0 <= t < vocab or t == mask_id]
        if bad:
            fail(f"prompts[{i}]", f"token ids in [0, {vocab}) other than mask_id={mask_id}", bad[:5])
    return rows


def trajectory_capacity(block_length: int, max_post_steps: int, mbe_window: int, *, mbe_max_steps: int = 1,
                        mbe_select: str = "last", num_blocks: int = 0) -> int:
    """Most writes one position can receive: once per denoising step of its block (at most B steps
    that fill masks, then at most max_post_steps more) and once per MBE proposal over it: at most
    `mbe_max_steps` per window, in the windows of the `mbe_window` blocks from its own ("last"),
    or of any later block of the `num_blocks` canvas ("surprisal")."""
    if not mbe_window:
        return block_length + max_post_steps + 1
    windows = mbe_window if mbe_select == "last" else max(num_blocks, 1)
    return block_length + max_post_steps + 1 + mbe_max_steps * windows


def make_knobs(vocab: int, *, threshold, editing_threshold, temperature=0.0, top_k=None, top_p=None,
               penalty_lambda=0.0, max_post_steps=16, eos_early_stop=False, llada20=False, mbe=True,
               mbe_max_steps=MBE_DEFAULTS["mbe_max_steps"], mbe_threshold=MBE_DEFAULTS["mbe_threshold"],
               mbe_editing_threshold=MBE_DEFAULTS["mbe_editing_threshold"],
               mbe_fraction=MBE_DEFAULTS["mbe_fraction"]) -> Knobs:
    """Knobs from plain values (scalars, or one value per row); `None` top-k / top-p = off."""
    def arr(x, dtype):
        return jnp.asarray(np.asarray(x, dtype))
    top_k = vocab if top_k is None else top_k
    top_p = 1.0 if top_p is None else top_p
    return Knobs(
        threshold=arr(threshold, np.float32), editing_threshold=arr(editing_threshold, np.float32),
        temperature=arr(temperature, np.float32), top_k=arr(top_k, np.int32), top_p=arr(top_p, np.float32),
        penalty_lambda=arr(penalty_lambda, np.float32), max_post_steps=arr(max_post_steps, np.int32),
        eos_early_stop=arr(eos_early_stop, np.bool_), llada20=arr(llada20, np.bool_), mbe=arr(mbe, np.bool_),
        mbe_max_steps=arr(mbe_max_steps, np.int32), mbe_threshold=arr(mbe_threshold, np.float32),
        mbe_editing_threshold=arr(mbe_editing_threshold, np.float32), mbe_fraction=arr(mbe_fraction, np.float32))
