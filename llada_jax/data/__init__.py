"""Data for LLaDA2 training and RL: offline tasks with rewards, TFDS array_record storage, grain
pipelines, the tokenizer.

- `tasks`: addition, Countdown and 4x4 Sudoku generators and their verifiers (REFERENCE §6).
- `builders`: TFDS builders writing array_record (no TensorFlow), the JSONL importer, `open_split`.
- `pipeline`: grain SFT and CPT pipelines with checkpointable iterators (REFERENCE §4's inputs).
- `packing`: chat SFT with whole conversations packed into rows (per-conversation attention,
  RoPE restarts, loss on every assistant turn).
- `mixture`: several datasets mixed by weight (`Mixture`, `parse_mixture`).
- `records`, `jsonl`: the chat record format and its reader (unknown keys counted, not rejected).
- `tokenizer`: HF tokenizer.json, the LLaDA2 chat format, a locally built task tokenizer (REFERENCE §1).

A sibling of `model` in the layers: it imports nothing else of llada_jax, and knows no model.
"""

from llada_jax.data.builders import (
    Addition, ChatJsonl, Countdown, JsonlConfig, Sudoku4x4, TaskBuilderConfig, dataset_dir, import_jsonl,
    open_split, prepare_task)
from llada_jax.data.jsonl import read_jsonl
from llada_jax.data.mixture import Mixture, parse_mixture
from llada_jax.data.packing import packed_sft_dataset
from llada_jax.data.pipeline import cpt_dataset, rows_for_process, shard_for_process, sft_dataset
from llada_jax.data.records import DataError, check_messages, decode_record, encode_record
from llada_jax.data.tasks import TASKS, get_task, reward

__all__ = [
    "Addition", "ChatJsonl", "Countdown", "DataError", "JsonlConfig", "Mixture", "packed_sft_dataset",
    "parse_mixture", "Sudoku4x4", "TASKS", "TaskBuilderConfig",
    "check_messages", "cpt_dataset", "dataset_dir", "decode_record", "encode_record", "get_task", "import_jsonl",
    "open_split", "prepare_task", "read_jsonl", "reward", "rows_for_process", "sft_dataset", "shard_for_process",
]
