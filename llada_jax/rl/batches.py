"""Rollouts into the losses' batch layout (REFERENCE §6): `pack_rollouts` for the ELBO methods,
`pack_trajectory` for DiPO.

Batch layout (all losses): `tokens [B, L]` is prompt, completion, then EOS fill, laid out like the
decoder's canvas (`pack_rollouts`), L a multiple of the block size; `completion_mask [B, L]` marks
the scored tokens; `advantages [B]`; optional `sample_mask [B]` (False drops a sample) and
`example_ids [B]` (noise folding; default the row). Rows come in contiguous groups of G
completions of one prompt. `old_terms` / `ref_terms` hold θ_old's and the reference's
`policy_terms` for the same batch and key.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array
from llada_jax.rl.configs import Batch


def pack_rollouts(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], length: int, *,
                  pad_id: int, gen_length: Optional[int] = None, score_padding: bool = True) -> dict[str, np.ndarray]:
    """Host-side packing of rollouts into the ELBO methods' batch layout, like the decoder's canvas.

    Row i is `prompts[i] + completions[i]` then `pad_id` (EOS) up to `length`. `completion_mask`
    covers exactly what the policy generated: the completion and, with `score_padding` (LLaDA
    fills the canvas with EOS and SFT trains on that fill), its EOS fill up to `gen_length`
    tokens after the prompt, the length `generate` returned (required then). Positions past
    `P + gen_length` are layout padding, never scored. DiPO takes the decoder's whole trajectory
    instead: `pack_trajectory`.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"pack_rollouts: expected as many completions as prompts ({len(prompts)}), "
                         f"found {len(completions)}")
    if score_padding and gen_length is None:
        raise ValueError("pack_rollouts: gen_length: expected the generation length the rollouts were decoded "
                         "with (the EOS fill is scored up to it), found None")
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n_p, n_c = len(p), len(c)
        end = n_p + (gen_length if score_padding else n_c)
        if n_p + n_c > length or end > length or (score_padding and n_c > gen_length):
            raise ValueError(f"pack_rollouts: row {i}: expected completion <= gen_length={gen_length} and prompt + "
                             f"generation <= length={length}, found prompt {n_p}, completion {n_c}")
        tokens[i, :n_p], tokens[i, n_p:n_p + n_c] = p, c
        mask[i, n_p:end] = True
    return {"tokens": tokens, "completion_mask": mask}


def pack_trajectory(out, length: int, *, pad_id: int) -> dict[str, np.ndarray]:
    """DiPO's batch from a `decode.GenerateOutput` decoded with `record_trajectory=True`.

    tokens [B, L]: each row's final canvas up to its canvas length (everything the decoder wrote,
    past the answer's first EOS and past `P + gen_length` included), `pad_id` after.
    completion_mask [B, L]: the decoded positions (prompt end to canvas end).
    write_step / write_token [B, L, W]: every write of every position with its denoising step
    (-1 = empty slot), as the decoder recorded them. `length` must cover every canvas and be a
    multiple of the block size.
    """
    t = out.trajectory
    if t is None:
        raise ValueError("pack_trajectory: out.trajectory: expected the write record of "
                         "generate(..., record_trajectory=True), found None")
    n, canvas_len = out.canvas.shape
    longest = int(np.max(out.canvas_lengths))
    if length < longest:
        raise ValueError(f"pack_trajectory: length: expected >= the longest canvas ({longest}), found {length}")
    w = t.write_step.shape[-1]
    tokens = np.full((n, length), pad_id, np.int32)
    mask = np.zeros((n, length), bool)
    steps = np.full((n, length, w), -1, np.int32)
    written = np.full((n, length, w), pad_id, np.int32)
    for i in range(n):
        p, c = int(t.prompt_lengths[i]), int(out.canvas_lengths[i])
        tokens[i, :c] = out.canvas[i, :c]
        mask[i, p:c] = True
        steps[i, :c], written[i, :c] = t.write_step[i, :c], t.write_token[i, :c]
    return {"tokens": tokens, "completion_mask": mask, "write_step": steps, "write_token": written}


def batch_arrays(batch: Batch, block_size: int, required: Sequence[str] = ()) -> dict[str, Array]:
    """Checks shapes and fills the defaults (`sample_mask`, `example_ids`)."""
    for k in ("tokens", "completion_mask", *required):
        if k not in batch:
            raise KeyError(f"batch: expected a {k!r} entry, found keys {sorted(batch)}")
    tokens = jnp.asarray(batch["tokens"])
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"batch['tokens']: expected an integer array [B, L], found {tokens.dtype}{tokens.shape}")
    b, length = tokens.shape
    if length % block_size:
        raise ValueError(f"batch['tokens']: expected a length that is a multiple of block_size={block_size}, "
                         f"found {length}")
    out = dict(batch, tokens=tokens)
    out.setdefault("sample_mask", jnp.ones((b,), bool))
    out.setdefault("example_ids", jnp.arange(b, dtype=jnp.int32))
    shapes = {"completion_mask": (b, length), "advantages": (b,), "sample_mask": (b,), "example_ids": (b,)}
    if "write_step" in out:
        shapes["write_step"] = shapes["write_token"] = (b, length, jnp.shape(out["write_step"])[-1])
    for k, shape in shapes.items():
        if k in out and jnp.shape(out[k]) != shape:
            raise ValueError(f"batch[{k!r}]: expected shape {shape}, found {jnp.shape(out[k])}")
    return out
