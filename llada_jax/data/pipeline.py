"""grain input pipelines for supervised fine-tuning (SFT) and continual pre-training (CPT).

Both start from a grain `MapDataset` of `{"messages", "meta"}` examples (`open_split`, or
`grain.MapDataset.source(list)` for in-memory data) and return a `grain.IterDataset` of
numpy batches:
- `tokens`    int32 [B, L]: the ids in the chat (or plain) format, padded with `<|endoftext|>`;
- `loss_mask` bool  [B, L]: positions the objective may noise and score (REFERENCE §4): the
  response in SFT (the prompt is never masked), every real token in CPT;
- `doc_ids`   int32 [B, L]: document of each position for the same-document attention mask
  (REFERENCE §3): 1 everywhere in SFT (one conversation per row, its padding included),
  1, 2, ... per packed document in CPT and packed SFT (`data.packing.packed_sft_dataset`)
  with 0 on padding.
L is a multiple of the block size, so the sequence splits into whole diffusion blocks.

Order of operations: shuffle globally with a seed (a new permutation each epoch), repeat, take
this process's rows of every global batch (multi-host: process i of n reads rows
`[i * b, (i + 1) * b)` of each global batch of `n * b` examples, `rows_for_process`), tokenise
lazily, batch. The global batch of step s is therefore the same examples on any number of
processes (as long as no example is dropped for length: each process filters its own rows), so
a run on 2 hosts x 4 devices sees exactly the batches of 1 host x 8 devices. Everything is
deterministic given the seed, and `iter(dataset)` is a `grain.DatasetIterator` whose
`get_state()` / `set_state()` make a resumed run see the same batches as an uninterrupted one.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Sequence

import grain
import jax
import numpy as np

from llada_jax.data.mixture import Mixture
from llada_jax.data.records import DataError
from llada_jax.data.tokenizer import TEMPLATES

if TYPE_CHECKING:
    from llada_jax.data.tokenizer import Tokenizer

TOO_LONG_POLICIES = ("drop", "truncate", "error")


def shard_for_process(examples: grain.MapDataset, shard_index: int | None = None,
                      shard_count: int | None = None) -> grain.MapDataset:
    """The slice `examples[shard_index::shard_count]` this process reads (defaults: JAX's process
    index and count). Shards are disjoint and together cover the source; sizes differ by <= 1."""
    index = jax.process_index() if shard_index is None else shard_index
    count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= index < count:
        raise DataError(f"shard_index: expected 0 <= shard_index < shard_count={count}, found {index}")
    if len(examples) < count:
        raise DataError(f"the source has {len(examples)} examples, fewer than the {count} shards")
    return examples[index::count]


class _RowsOfGlobalBatches(grain.MapDataset):
    """Rows `[index * rows, (index + 1) * rows)` of every consecutive group of `count * rows`
    elements of the parent: this process's part of each global batch."""

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, index: int, count: int, rows: int):
        super().__init__(parent)
        self._index, self._count, self._rows = index, count, rows
        n = len(parent)
        full, rest = divmod(n, count * rows)
        self._length = full * rows + min(max(rest - index * rows, 0), rows)

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, i: int) -> int:
        group, r = divmod(i, self._rows)
        return group * self._count * self._rows + self._index * self._rows + r

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._parent_index(index)]

    def __str__(self) -> str:
        return f"RowsOfGlobalBatches[{self._index} of {self._count} x {self._rows}]"


def rows_for_process(examples: grain.MapDataset, rows: int, shard_index: int | None = None,
                     shard_count: int | None = None) -> grain.MapDataset:
    """Process `shard_index`'s rows of every global batch of `shard_count * rows` consecutive
    examples (defaults: JAX's process index and count). Together the processes read every
    example once, and global batch k is the same examples whatever the process count."""
    index = jax.process_index() if shard_index is None else shard_index
    count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= index < count:
        raise DataError(f"shard_index: expected 0 <= shard_index < shard_count={count}, found {index}")
    if count == 1:
        return examples
    return _RowsOfGlobalBatches(examples, index, count, rows)


def _ordered(examples: grain.MapDataset | Mixture, *, seed: int, shuffle: bool, num_epochs: int | None,
             shard_index: int | None, shard_count: int | None, rows: int) -> grain.MapDataset:
    count = jax.process_count() if shard_count is None else shard_count
    if len(examples) < count:
        raise DataError(f"the source has {len(examples)} examples, fewer than the {count} shards")
    if isinstance(examples, Mixture):  # each source shuffled and repeated, then mixed by weight
        return rows_for_process(examples.ordered(seed=seed, shuffle=shuffle, num_epochs=num_epochs), rows,
                                shard_index, shard_count)
    ds = examples
    if shuffle:
        ds = ds.shuffle(seed)  # reshuffled per epoch: the epoch number is folded into the seed
    return rows_for_process(ds.repeat(num_epochs), rows, shard_index, shard_count)


def tokenize_sft(example: dict[str, Any], tokenizer: Tokenizer, template: str = "chat") -> dict[str, np.ndarray]:
    """Unpadded `tokens` [n] and `loss_mask` [n]. "chat": the whole conversation, True on every
    assistant turn's `{answer}<|role_end|>` (`Tokenizer.encode_sft_turns`); "plain" (one turn):
    the prompt then the answer, True on the answer."""
    if template == "chat":
        ids, trained = tokenizer.encode_sft_turns(example["messages"])
        return {"tokens": np.asarray(ids, np.int32), "loss_mask": np.asarray(trained, bool)}
    prompt, response = tokenizer.encode_sft(example["messages"], template=template)
    return {"tokens": np.asarray(prompt + response, np.int32),
            "loss_mask": np.arange(len(prompt) + len(response)) >= len(prompt)}


def _fits(row: dict[str, np.ndarray], seq_len: int) -> bool:
    return len(row["tokens"]) <= seq_len


def _limit_length(row: dict[str, np.ndarray], seq_len: int, policy: str) -> dict[str, np.ndarray]:
    n = len(row["tokens"])
    if n <= seq_len:
        return row
    if policy == "error":
        raise DataError(f"an example has {n} tokens, more than seq_len={seq_len} (too_long='error')")
    return {k: v[:seq_len] for k, v in row.items()}


def _pad_batch(rows: Sequence[dict[str, np.ndarray]], *, seq_len: int | None, block_size: int, pad_id: int,
               loss_on_padding: bool) -> dict[str, np.ndarray]:
    """Stacks SFT rows, padding each with EOS to `seq_len`, or (if None) to the longest row
    rounded up to a whole block."""
    length = seq_len or -(-max(len(r["tokens"]) for r in rows) // block_size) * block_size
    tokens = np.full((len(rows), length), pad_id, np.int32)
    loss_mask = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        n = len(row["tokens"])
        tokens[i, :n] = row["tokens"]
        loss_mask[i, :n] = row["loss_mask"]
        # LLaDA fills the canvas after an answer with EOS; training on the padding teaches it to.
        loss_mask[i, n:] = loss_on_padding
    real = np.arange(length)[None, :] < np.asarray([len(r["tokens"]) for r in rows])[:, None]
    return {"tokens": tokens, "loss_mask": loss_mask, "doc_ids": np.ones_like(tokens), "real": real}


def _check_lengths(seq_len: int | None, block_size: int) -> None:
    if block_size < 1:
        raise DataError(f"block_size: expected a positive integer, found {block_size}")
    if seq_len is not None and (seq_len < block_size or seq_len % block_size):
        raise DataError(f"seq_len: expected a positive multiple of block_size={block_size}, found {seq_len}")


def sft_dataset(examples: grain.MapDataset, tokenizer: Tokenizer, *, batch_size: int, seq_len: int | None = None,
                block_size: int = 32, template: str = "chat", loss_on_padding: bool = True, too_long: str = "drop",
                max_dropped_fraction: float | None = 0.5, seed: int = 0,
                shuffle: bool = True, num_epochs: int | None = None, drop_remainder: bool = True,
                shard_index: int | None = None, shard_count: int | None = None,
                read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
    """SFT batches: one conversation per row, loss on every assistant turn (and, by default, the
    EOS padding after it). `packed_sft_dataset` packs several conversations into a row instead.

    Batches also carry `real` bool [B, L], True on the conversation's own tokens (not padding),
    which the trainer counts as real tokens.

    Args:
      examples: `{"messages", "meta"}` examples, or a `Mixture` of several datasets.
      tokenizer: splits each conversation into prompt and response (`Tokenizer.encode_sft`).
      batch_size: rows per batch on this process (the global batch is batch_size × process count).
      seq_len: fixed row length, a multiple of `block_size`; None pads each batch to its longest
        row rounded up to a whole block (fewer pad tokens, one compiled shape per length).
      block_size: diffusion block size B.
      template: "chat" (the LLaDA2 chat format) or "plain" (prompt text, answer, EOS padding).
      loss_on_padding: whether the EOS padding after the response is trained (LLaDA does).
      too_long: rows longer than `seq_len`: "drop" them, "truncate" them, or raise ("error").
      max_dropped_fraction: with "drop", raise if more than this fraction of a window of 1000
        examples is dropped (a `seq_len` too small would otherwise make an endless pipeline
        spin without output); None disables the check.
      seed: shuffle seed.
      shuffle: shuffle the examples (globally, a new permutation per epoch).
      num_epochs: passes over the data; None repeats forever.
      drop_remainder: drop a final partial batch (keeps shapes static).
      shard_index, shard_count: this process's rows of each global batch (`rows_for_process`);
        default JAX's process index and count.
      read_options: grain threading / prefetch options of the tokenisation stage.
    """
    _check_lengths(seq_len, block_size)
    if too_long not in TOO_LONG_POLICIES:
        raise DataError(f"too_long: expected one of {TOO_LONG_POLICIES}, found {too_long!r}")
    ds = _ordered(examples, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                  shard_index=shard_index, shard_count=shard_count, rows=batch_size)
    if template not in TEMPLATES:
        raise DataError(f"template: expected one of {TEMPLATES}, found {template!r}")
    ds = ds.map(functools.partial(tokenize_sft, tokenizer=tokenizer, template=template))
    drop = seq_len is not None and too_long == "drop"
    if drop:
        ds = ds.filter(functools.partial(_fits, seq_len=seq_len))
    elif seq_len is not None:
        ds = ds.map(functools.partial(_limit_length, seq_len=seq_len, policy=too_long))
    rows = ds.to_iter_dataset(read_options)
    if drop:
        rows = grain.experimental.WithOptionsIterDataset(
            rows, grain.experimental.DatasetOptions(filter_raise_threshold_ratio=max_dropped_fraction))
    return rows.batch(
        batch_size, drop_remainder=drop_remainder,
        batch_fn=functools.partial(_pad_batch, seq_len=seq_len, block_size=block_size, pad_id=tokenizer.pad_id,
                                   loss_on_padding=loss_on_padding))


def tokenize_document(example: dict[str, Any], tokenizer: Tokenizer) -> dict[str, np.ndarray]:
    """The whole rendered conversation followed by EOS, the document separator of packed data."""
    return {"tokens": np.asarray(tokenizer.encode_chat(example["messages"]) + [tokenizer.eos_id], np.int32)}


def _packed_row(row: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    doc_ids = row["tokens_segment_ids"].astype(np.int32)
    return {"tokens": np.where(doc_ids > 0, row["tokens"], pad_id).astype(np.int32),
            "loss_mask": doc_ids > 0, "doc_ids": doc_ids}


def cpt_dataset(examples: grain.MapDataset, tokenizer: Tokenizer, *, batch_size: int, seq_len: int,
                block_size: int = 32, seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                drop_remainder: bool = True, shard_index: int | None = None, shard_count: int | None = None,
                read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
    """CPT batches: documents (rendered conversations + EOS) packed into rows of `seq_len` tokens.

    Concatenate-then-split packing (grain's `ConcatThenSplitIterDataset`): no token is dropped;
    a document that does not fit continues in the next row under a new document id. Arguments
    as in `sft_dataset`; `seq_len` is required and a multiple of `block_size`.
    """
    _check_lengths(seq_len, block_size)
    ds = _ordered(examples, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                  shard_index=shard_index, shard_count=shard_count, rows=batch_size)
    ds = ds.map(functools.partial(tokenize_document, tokenizer=tokenizer)).to_iter_dataset(read_options)
    ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len})
    ds = ds.map(functools.partial(_packed_row, pad_id=tokenizer.pad_id))
    return ds.batch(batch_size, drop_remainder=drop_remainder)
