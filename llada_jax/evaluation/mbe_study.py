"""The Multi-Block Editing study (bench/mbe.py --study, README "Multi-Block Editing on Sudoku rows").

Three variants of one task ("Beyond Block Boundaries", REFERENCE §5, as a secondary summary
describes its table), each decoded in S and Q modes on a held-out split:

- `no_mbe`: the plain SFT model, no MBE;
- `training_free_mbe`: the same model decoded with an MBE window;
- `mbe_sft_mbe`: the MBE-SFT model (the plain run with the MBE curriculum over its last steps,
  `mbe_schedule`) decoded with the same window;
- and the control `mbe_sft_no_mbe` (the MBE-SFT model without MBE), which separates what the
  training changed from what the editing does.

Per variant and mode: accuracy (reward 1), mean reward, TPF (generated tokens over every forward:
denoising, cache writes, MBE), edits per sample (writes that replaced an already written token by
a different one, T2T and MBE alike: `edits_per_row`), MBE forwards per sample, and how many
answers differ from the same model's no-MBE decode. `summarize` gives each metric's mean, std
(ddof 1) and range over training seeds; `markdown_table` prints them.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from llada_jax import decode
from llada_jax.evaluation import heldout
from llada_jax.model.config import ModelConfig


class Variant(NamedTuple):
    name: str
    model: str  # "sft" (plain) or "mbe_sft"
    mbe: bool  # decoded with the study's MBE window


VARIANTS = (Variant("no_mbe", "sft", False), Variant("training_free_mbe", "sft", True),
            Variant("mbe_sft_mbe", "mbe_sft", True), Variant("mbe_sft_no_mbe", "mbe_sft", False))
METRICS = ("accuracy", "reward", "tpf", "edits_per_sample", "mbe_forwards_per_sample", "answers_changed_by_mbe")


def mbe_schedule(steps: int, mbe_steps: int) -> tuple[tuple[int, int], ...]:
    """`objective.mbe_window_schedule` for MBE SFT over the last `mbe_steps` of a `steps`-step run:
    K = 0 (the plain composite mask) until then, then K = 2, 3, 4 for a third each, the last
    holding to the end. With the plain run's checkpoint at `steps - mbe_steps` as its start, the
    MBE-SFT model has the plain model's step budget, learning-rate schedule and data order."""
    if not 0 < mbe_steps <= steps or mbe_steps % 3:
        raise ValueError(f"mbe_steps: expected a multiple of 3 in (0, steps={steps}], found {mbe_steps}")
    third = mbe_steps // 3
    return ((steps - mbe_steps, 0), (third, 2), (third, 3), (0, 4))


def edits_per_row(trajectory: decode.Trajectory, lengths: Sequence[int]) -> np.ndarray:
    """Per row, the writes to its first `lengths[r]` generated positions that replaced an already
    written token by a different one (a first write onto a mask is no edit)."""
    tokens = np.asarray(trajectory.write_token)  # [N, L, W]
    count = np.minimum(np.asarray(trajectory.write_count), tokens.shape[-1])  # [N, L]
    slot = np.arange(tokens.shape[-1])
    changed = (tokens[..., 1:] != tokens[..., :-1]) & (slot[1:] < count[..., None])  # [N, L, W-1]
    per_position = changed.sum(-1)  # [N, L]
    start = np.asarray(trajectory.prompt_lengths)[:, None]
    pos = np.arange(tokens.shape[1])[None, :]
    inside = (pos >= start) & (pos < start + np.asarray(lengths)[:, None])
    return (per_position * inside).sum(-1)


def decode_variant(params, config: ModelConfig, tokenizer, examples: Sequence[Mapping[str, Any]], *, mode: str,
                   mbe_window: int, block_length: int, gen_length: int, template: str,
                   batch_size: int = 256, **generate_kw) -> tuple[dict, list[list[int]]]:
    """Greedy decoding of every example's prompt in `mode` with `mbe_window` (0: off), scored with
    the task's reward (`heldout.evaluate`). Returns the metrics (`METRICS` but
    `answers_changed_by_mbe`) and the tokens."""
    r = heldout.evaluate(params, config, tokenizer, examples, mode=mode, gen_length=gen_length,
                         block_length=block_length, batch_size=batch_size, template=template, return_outputs=True,
                         mbe_window=mbe_window, eos_id=tokenizer.eos_id, mask_id=tokenizer.mask_id,
                         record_trajectory=True, **generate_kw)
    outs = r["outputs"]
    edits = np.concatenate([edits_per_row(o.trajectory, [len(t) for t in o.tokens]) for o in outs])
    mbe_forwards = np.concatenate([np.asarray(o.mbe_forwards) for o in outs])
    return {"accuracy": r["accuracy"], "reward": r["reward"], "tpf": r["tpf"],
            "edits_per_sample": float(edits.mean()), "mbe_forwards_per_sample": float(mbe_forwards.mean()),
            "n": r["n"]}, [list(t) for o in outs for t in o.tokens]


def run_variants(models: Mapping[str, Any], config: ModelConfig, tokenizer, examples, *, modes: Sequence[str],
                 mbe_window: int, **kw) -> dict:
    """`{variant: {mode: metrics}}` for every `VARIANTS` entry whose model is in `models`
    (`{"sft": params, "mbe_sft": params}`); MBE variants also count the answers that differ
    from the same model's no-MBE decode."""
    out: dict = {}
    for mode in modes:
        plain_tokens = {}
        for v in sorted((v for v in VARIANTS if v.model in models), key=lambda v: v.mbe):  # no-MBE first
            metrics, tokens = decode_variant(models[v.model], config, tokenizer, examples, mode=mode,
                                             mbe_window=mbe_window if v.mbe else 0, **kw)
            if v.mbe:
                metrics["answers_changed_by_mbe"] = int(sum(a != b for a, b in zip(tokens, plain_tokens[v.model])))
            else:
                plain_tokens[v.model] = tokens
            out.setdefault(v.name, {})[mode] = metrics
    return {v.name: out[v.name] for v in VARIANTS if v.name in out}


def summarize(by_seed: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]]) -> dict:
    """`{seed: {variant: {mode: {metric: value}}}}` -> `{variant: {mode: {metric: spread}}}` over
    the seeds that have each cell, variants in `VARIANTS` order."""
    cells: dict = {}
    for result in by_seed.values():
        for variant, by_mode in result.items():
            for mode, metrics in by_mode.items():
                for k in METRICS:
                    if k in metrics:
                        cells.setdefault(variant, {}).setdefault(mode, {}).setdefault(k, []).append(metrics[k])
    order = [v.name for v in VARIANTS]
    return {variant: {mode: {k: heldout.spread(v) for k, v in by_metric.items()}
                      for mode, by_metric in cells[variant].items()}
            for variant in sorted(cells, key=lambda n: order.index(n) if n in order else len(order))}


def markdown_table(summary: Mapping, metrics: Sequence[str] = ("accuracy", "tpf", "edits_per_sample")) -> str:
    """One row per variant and mode: each metric's mean ± std over the seeds (n seeds)."""
    lines = ["| variant | mode | " + " | ".join(metrics) + " | seeds |",
             "|---|---|" + "---|" * len(metrics) + "---|"]
    for variant, by_mode in summary.items():
        for mode, cell in by_mode.items():
            parts = [f"{cell[k]['mean']:.3f} ± {cell[k]['std']:.3f}" if k in cell else "" for k in metrics]
            n = max(c["n"] for c in cell.values())
            lines.append(f"| {variant} | {mode} | " + " | ".join(parts) + f" | {n} |")
    return "\n".join(lines)
