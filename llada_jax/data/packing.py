"""Chat SFT with several conversations packed into each row (grain's best-fit packing).

One conversation per row padded to `seq_len` spends most of a long row on padding (at 4096
tokens with conversations of ~500, about 85%). `packed_sft_dataset` places whole conversations
into rows of `seq_len` tokens with `grain.experimental.BestFitPackIterDataset` (each goes to the
open row it fills most tightly; a row is emitted when a conversation fits none of the
`packing_bins` open rows), so no conversation is ever split. Each row carries what CPT's packed
rows carry, and the trainer's objective already handles:

- `tokens`    int32 [B, L]: the conversations back to back, `<|endoftext|>` on padding;
- `loss_mask` bool  [B, L]: True on every assistant turn's `{answer}<|role_end|>` only: never on
  system / user turns, role tags or padding (`Tokenizer.encode_sft_turns`);
- `doc_ids`   int32 [B, L]: 1, 2, ... per conversation, 0 on padding. The objective turns them
  into segment ids of the composite attention mask (a token sees only its own conversation)
  and into RoPE positions that restart at 0 at each conversation (`masks.document_positions`).

Every conversation starts on a block boundary (grain's `pack_alignment_struct` = block size):
the block-diffusion mask is a function of block indices, so an aligned conversation sees the
same blocks as it would alone in a row, and its per-token losses equal its losses alone
(tests/data/test_packing.py); the few padding tokens this costs get doc id 0 and no weight.

Deterministic and resumable like the other pipelines: the packer's state is part of the grain
iterator state that the trainer checkpoints. With several processes each packs the
conversations of its own rows (`rows_for_process`), so a row's contents depend on the process
count, as in CPT.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import grain
import numpy as np

from llada_jax.data.mixture import Mixture
from llada_jax.data.pipeline import TOO_LONG_POLICIES, _check_lengths, _fits, _limit_length, _ordered, tokenize_sft
from llada_jax.data.records import DataError
from llada_jax.data.tokenizer import TEMPLATES

if TYPE_CHECKING:
    from llada_jax.data.tokenizer import Tokenizer

DEFAULT_PACKING_BINS = 64


def _packed_sft_row(row: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    doc_ids = row["tokens_segment_ids"].astype(np.int32)
    real = doc_ids > 0
    return {"tokens": np.where(real, row["tokens"], pad_id).astype(np.int32),
            "loss_mask": row["loss_mask"].astype(bool) & real, "doc_ids": doc_ids}


def packed_sft_dataset(examples: grain.MapDataset | Mixture, tokenizer: Tokenizer, *, batch_size: int, seq_len: int,
                       block_size: int = 32, template: str = "chat", too_long: str = "drop",
                       max_dropped_fraction: float | None = 0.5, packing_bins: int = DEFAULT_PACKING_BINS,
                       seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                       drop_remainder: bool = True, shard_index: int | None = None,
                       shard_count: int | None = None,
                       read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
    """SFT batches of packed conversations (module docstring), loss on every assistant turn.

    Args:
      examples: `{"messages", "meta"}` examples, or a `Mixture` of several datasets.
      tokenizer: renders each conversation and marks its assistant turns.
      batch_size: rows per batch on this process.
      seq_len: row length, a multiple of `block_size`.
      block_size: diffusion block size B; every conversation starts at a multiple of it.
      template: "chat" (every assistant turn trained) or "plain" (one turn, the answer trained).
      too_long: conversations longer than `seq_len`: "drop", "truncate" or raise ("error").
      max_dropped_fraction: with "drop", raise when more than this fraction of a window of
        examples is dropped (as in `sft_dataset`); None disables the check.
      packing_bins: rows open at once in the packer; more bins pack tighter (fewer padding
        tokens) and hold more conversations in memory.
      seed: shuffle seed (examples and the order of emitted rows).
      shuffle, num_epochs, drop_remainder, shard_index, shard_count, read_options: as in `sft_dataset`.
    """
    _check_lengths(seq_len, block_size)
    if seq_len is None:
        raise DataError("seq_len: expected the packed row length (a multiple of block_size), found None")
    if too_long not in TOO_LONG_POLICIES:
        raise DataError(f"too_long: expected one of {TOO_LONG_POLICIES}, found {too_long!r}")
    if template not in TEMPLATES:
        raise DataError(f"template: expected one of {TEMPLATES}, found {template!r}")
    if packing_bins < 1:
        raise DataError(f"packing_bins: expected a positive integer, found {packing_bins}")
    ds = _ordered(examples, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                  shard_index=shard_index, shard_count=shard_count, rows=batch_size)
    ds = ds.map(functools.partial(tokenize_sft, tokenizer=tokenizer, template=template))
    drop = too_long == "drop"
    if drop:
        ds = ds.filter(functools.partial(_fits, seq_len=seq_len))
    else:
        ds = ds.map(functools.partial(_limit_length, seq_len=seq_len, policy=too_long))
    rows = ds.to_iter_dataset(read_options)
    if drop:
        rows = grain.experimental.WithOptionsIterDataset(
            rows, grain.experimental.DatasetOptions(filter_raise_threshold_ratio=max_dropped_fraction))
    features = ("tokens", "loss_mask")
    rows = grain.experimental.BestFitPackIterDataset(
        rows, length_struct={k: seq_len for k in features}, num_packing_bins=packing_bins, seed=seed,
        shuffle_bins=shuffle, pack_alignment_struct={k: block_size for k in features},
        padding_struct={"tokens": tokenizer.pad_id, "loss_mask": False})
    rows = rows.map(functools.partial(_packed_sft_row, pad_id=tokenizer.pad_id))
    return rows.batch(batch_size, drop_remainder=drop_remainder)
