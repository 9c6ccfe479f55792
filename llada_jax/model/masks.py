"""Every attention mask the project uses, in one place (REFERENCE §3).

Masks are boolean, True where query i may attend key j (row = query, column = key), shaped
`[T, T]` here; `forward` accepts `[B or 1, T, T]`. Builders take static Python ints so the
masks are constants under `jit`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int


def _check(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, found {value!r}")


def bidirectional(length: int) -> Bool[Array, "T T"]:
    """Full attention (MDLM, or block diffusion with one block)."""
    _check("length", length)
    return jnp.ones((length, length), dtype=bool)


def block_causal(length: int, block_size: int) -> Bool[Array, "T T"]:
    """Inference mask: query i sees key j iff block(j) <= block(i).

    Bidirectional inside a block, causal across blocks; a finished block's K/V never change,
    which is what makes the block KV cache exact.
    """
    _check("length", length)
    _check("block_size", block_size)
    b = jnp.arange(length) // block_size
    return b[None, :] <= b[:, None]


def composite(length: int, block_size: int) -> tuple[Bool[Array, "2L 2L"], Int[Array, "2L"]]:
    """Training mask over `[x_t ; x_0]` (BD3-LM / dFactory `block_diffusion_mask`).

    Returns `(mask [2L, 2L], positions [2L])` with positions `concat(arange(L), arange(L))`.
      x_t -> x_t : same block (the noisy block itself)
      x_t -> x_0 : strictly earlier clean blocks
      x_0 -> x_0 : block causal
      x_0 -> x_t : never
    """
    _check("length", length)
    _check("block_size", block_size)
    idx = jnp.arange(2 * length)
    is_clean = idx >= length
    blk = (idx % length) // block_size
    q_clean, k_clean = is_clean[:, None], is_clean[None, :]
    q_blk, k_blk = blk[:, None], blk[None, :]
    noisy_noisy = ~q_clean & ~k_clean & (q_blk == k_blk)
    noisy_clean = ~q_clean & k_clean & (q_blk > k_blk)
    clean_clean = q_clean & k_clean & (q_blk >= k_blk)
    positions = jnp.concatenate([jnp.arange(length), jnp.arange(length)])
    return noisy_noisy | noisy_clean | clean_clean, positions


def composite_mbe(length: int, block_size: int, window: int,
                  clean_sees_noisy: bool = True) -> tuple[Bool[Array, "2L 2L"], Int[Array, "2L"]]:
    """The Multi-Block Editing training mask over `[x_t ; x_0]`: `composite` plus cross-block links.

    "Beyond Block Boundaries" (REFERENCE §5, via a secondary summary) adds two kinds of links to
    the composite mask; within a window of K = `window` blocks (block b and the K - 1 after it):
      x_t -> x_t : blocks b .. b+K-1 (the noisy block sees the noisy future of its window)
      x_0 -> x_t : blocks b+1 .. b+K-1 with `clean_sees_noisy` (clean history sees the noisy
                   blocks after it, as a reopened history block sees the newer blocks at decoding)
      x_t -> x_0, x_0 -> x_0 : as `composite`
    No noisy block sees a clean copy of its own or a later block, so no target leaks. Built block
    by block, the slow obvious way: the dense oracle of `AttentionMask.composite(window=...)`.
    `window=1` is `composite`.
    """
    _check("length", length)
    _check("block_size", block_size)
    _check("window", window)
    base, positions = composite(length, block_size)
    mask = np.array(base)
    num_blocks = -(-length // block_size)
    for b in range(num_blocks):
        rows = slice(b * block_size, min((b + 1) * block_size, length))
        for f in range(b + 1, min(b + window, num_blocks)):
            cols = slice(f * block_size, min((f + 1) * block_size, length))
            mask[rows, cols] = True  # noisy b -> noisy f
            if clean_sees_noisy:
                mask[length + rows.start:length + rows.stop, cols] = True  # clean b -> noisy f
    return jnp.asarray(mask), positions


def document(doc_ids: Int[Array, "... T"]) -> Bool[Array, "... T T"]:
    """Same-document mask for packed sequences: and it with any mask above.

    For the composite input pass `concat([doc_ids, doc_ids], -1)`.
    """
    return doc_ids[..., :, None] == doc_ids[..., None, :]


def document_positions(doc_ids: Int[Array, "B T"]) -> Int[Array, "B T"]:
    """RoPE positions of packed sequences: 0, 1, ... from each document's first token.

    A document starts where the id changes (or at the row's start), so a document continued in
    the next row under a new id, and the tail padding, also count from 0. With all ids equal (SFT:
    one conversation per row) this is `arange(T)`.
    """
    idx = jnp.arange(doc_ids.shape[-1], dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(doc_ids[..., :1], bool), doc_ids[..., 1:] != doc_ids[..., :-1]], axis=-1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=doc_ids.ndim - 1)


def key_padding(valid: Bool[Array, "B T"]) -> Bool[Array, "B 1 T"]:
    """Masks out keys that are padding (True = a real token); broadcasts over queries."""
    return valid[:, None, :]
