"""Figures (llada_jax.evaluation.plots): the Pareto front by hand, and PNGs with labelled axes."""

import json

import matplotlib.image
import numpy as np

from llada_jax.evaluation import plots


def test_pareto_front_by_hand():
    points = [(1.0, 0.9), (2.0, 0.8), (1.5, 0.7), (3.0, 0.5), (3.0, 0.4), (0.5, 0.9)]
    assert plots.pareto_front(points) == [0, 1, 3]  # (1.5, .7) loses to (2, .8); (.5, .9) to (1, .9)


def _png_ok(path, min_size=(400, 300)):
    image = matplotlib.image.imread(path)
    assert image.shape[1] >= min_size[0] and image.shape[0] >= min_size[1]
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_speed_accuracy_plot(tmp_path):
    summary = {"S": {"tpf": 3.1, "accuracy": 0.62}, "Q": {"tpf": 2.2, "accuracy": 0.71},
               "no_edit": {"tpf": 1.8, "accuracy": 0.70},
               "Q:threshold=0.5,editing_threshold=0.9": {"tpf": 2.8, "accuracy": 0.66}}
    fig = plots.speed_accuracy(summary, str(tmp_path / "p.png"))
    ax = fig.axes[0]
    assert ax.get_xlabel() == "tokens per forward (TPF)" and ax.get_ylabel() == "accuracy"
    front = [line for line in ax.get_lines() if line.get_label() == "Pareto front"][0]
    assert list(front.get_xdata()) == [2.2, 2.8, 3.1]
    _png_ok(tmp_path / "p.png")


def test_training_curves_from_metrics_files(tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "rl").mkdir()
    (tmp_path / "sft" / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5 / s}) + "\n"
                                                            for s in range(1, 20)))
    (tmp_path / "rl" / "metrics.jsonl").write_text(
        json.dumps({"step": 0, "eval_S_accuracy": 0.1}) + "\n" +
        "".join(json.dumps({"step": s, "reward_mean": s / 10, "accuracy": s / 12,
                            **({"eval_S_accuracy": 0.1 + s / 20} if s % 3 == 0 else {})}) + "\n" for s in range(1, 8)))
    fig = plots.training_curves(str(tmp_path), smooth=3)
    assert [(a.get_xlabel(), a.get_ylabel()) for a in fig.axes] == [("step", "SFT loss"), ("step", "reward / accuracy")]
    lines = {line.get_label(): line for line in fig.axes[1].get_lines()}
    assert list(lines) == ["rollout reward", "rollout reward, mean of 3", "rollout accuracy, mean of 3",
                           "held-out accuracy (S, greedy)"]
    np.testing.assert_allclose(lines["rollout reward, mean of 3"].get_ydata(), [.1, .15, .2, .3, .4, .5, .6])
    held_out = lines["held-out accuracy (S, greedy)"]  # the step-0 evaluation of the init included
    assert list(held_out.get_xdata()) == [0, 3, 6]
    np.testing.assert_allclose(held_out.get_ydata(), [0.1, 0.25, 0.4])
    _png_ok(tmp_path / "training_curves.png")


def test_moving_average_uses_no_later_step():
    np.testing.assert_allclose(plots.moving_average([4.0, 0.0, 2.0, 6.0], 2), [4.0, 2.0, 1.0, 4.0])
    np.testing.assert_allclose(plots.moving_average([1.0, 2.0], 5), [1.0, 1.5])
