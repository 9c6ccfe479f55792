"""PNG figures of what the launchers measure: speed vs accuracy of decoding modes, training curves.

`speed_accuracy` draws an evaluation summary (`benchmarks.run_eval`) as accuracy against
tokens per forward, one point per mode, the presets named, and the Pareto front (the modes no
other mode beats on both axes) joined by a line: the speed-accuracy trade-off of LLaDA2.1's
threshold / editing_threshold knobs. `training_curves` draws a quickstart work directory's
metrics.jsonl files: the SFT loss, and the RL rollout reward and accuracy per step (raw and
smoothed) with the held-out evaluation points beside them.
Both use matplotlib's Agg back end (no display) and return the Figure, so tests can read the
axes' labels; the PNG is written to `path`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (x, y) that no other point matches or beats on both x and y while
    beating on one, sorted by x: larger is better on both axes."""
    front = [i for i, (x, y) in enumerate(points)
             if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i][0])


def speed_accuracy(summary: Mapping[str, Mapping[str, Any]], path: str, title: str = "") -> "plt.Figure":
    """Accuracy vs TPF of every mode in `summary` ({mode: {"tpf", "accuracy", ...}}) with the
    Pareto front, written as a PNG to `path`."""
    names = list(summary)
    points = [(float(summary[n]["tpf"]), float(summary[n]["accuracy"])) for n in names]
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    grid = [i for i, n in enumerate(names) if ":" in n]
    presets = [i for i in range(len(names)) if i not in grid]
    if grid:
        ax.scatter([points[i][0] for i in grid], [points[i][1] for i in grid], s=18, c="0.6",
                   label="threshold x editing_threshold grid")
    if presets:
        ax.scatter([points[i][0] for i in presets], [points[i][1] for i in presets], s=40, c="C0", marker="D",
                   label="presets", zorder=3)
    for i in presets:
        ax.annotate(names[i], points[i], textcoords="offset points", xytext=(5, 5), fontsize=9)
    front = pareto_front(points)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], c="C3", lw=1.5, label="Pareto front")
    ax.set_xlabel("tokens per forward (TPF)")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "speed vs accuracy of decoding modes")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return fig


def _rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """The mean of each value and the up to `window - 1` before it (a trailing window: a point
    never uses later steps)."""
    csum = np.concatenate([[0.0], np.cumsum(np.asarray(values, np.float64))])
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(idx - window, 0)
    return list((csum[idx] - csum[start]) / (idx - start))


def training_curves(workdir: str, path: str | None = None, rl_dir: str | None = None,
                    smooth: int = 5) -> "plt.Figure":
    """The SFT loss (`<workdir>/sft/metrics.jsonl`) and the RL run's curves
    (`<workdir>/<rl_dir>/metrics.jsonl`; by default the quickstart's most recent `rl_<algorithm>`
    run, or `rl`) per step, as a PNG (default `<workdir>/training_curves.png`): the rollout
    reward (raw, and its trailing mean over `smooth` steps), the rollout accuracy (smoothed) and
    the held-out evaluation points (`eval_<mode>_accuracy`, greedy decoding, every
    `rl.eval_every` steps). A stage without metrics is left out; none at all is an error naming
    the files."""
    if rl_dir is None:
        runs = [d for d in os.listdir(workdir) if d.startswith("rl") and
                os.path.exists(os.path.join(workdir, d, "metrics.jsonl"))] if os.path.isdir(workdir) else []
        rl_dir = max(runs, key=lambda d: os.path.getmtime(os.path.join(workdir, d, "metrics.jsonl"))) if runs else "rl"
    sft = [r for r in _rows(os.path.join(workdir, "sft", "metrics.jsonl")) if "loss" in r]
    rl_rows = _rows(os.path.join(workdir, rl_dir, "metrics.jsonl"))
    rl = [r for r in rl_rows if "reward_mean" in r]
    held_out = sorted({k[len("eval_"):-len("_accuracy")] for r in rl_rows for k in r
                       if k.startswith("eval_") and k.endswith("_accuracy")})
    if not sft and not rl:
        raise FileNotFoundError(f"training_curves: expected metrics in {workdir}/sft/metrics.jsonl or "
                                f"{workdir}/{rl_dir}/metrics.jsonl, found none")
    panels = [p for p in ("sft", "rl") if {"sft": sft, "rl": rl}[p]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), dpi=120, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "sft":
            ax.plot([r["step"] for r in sft], [r["loss"] for r in sft], c="C0")
            ax.set_ylabel("SFT loss")
            ax.set_title("SFT")
        else:
            steps = [r["step"] for r in rl]
            reward = [r["reward_mean"] for r in rl]
            ax.plot(steps, reward, c="C1", alpha=0.3, lw=0.8, label="rollout reward")
            ax.plot(steps, moving_average(reward, smooth), c="C1", label=f"rollout reward, mean of {smooth}")
            if all("accuracy" in r for r in rl):
                ax.plot(steps, moving_average([r["accuracy"] for r in rl], smooth), c="C2",
                        label=f"rollout accuracy, mean of {smooth}")
            for i, mode in enumerate(held_out):  # greedy decoding of held-out problems
                points = [(r["step"], r[f"eval_{mode}_accuracy"]) for r in rl_rows if f"eval_{mode}_accuracy" in r]
                ax.plot(*zip(*points), c=f"C{3 + i}", marker="o", ls="--", label=f"held-out accuracy ({mode}, greedy)")
            ax.set_ylabel("reward / accuracy")
            ax.set_title("RL")
            ax.legend(fontsize=8)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path or os.path.join(workdir, "training_curves.png"))
    return fig
