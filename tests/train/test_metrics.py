"""The metrics writer (llada_jax.train.metrics): metrics.jsonl and TensorBoard events agree, and a
resume drops the killed run's rows past the restored step from both."""

import pytest

from llada_jax import train
from llada_jax.train import metrics


def test_jsonl_and_tensorboard_agree_and_resume_purges_both(tmp_path):
    log = metrics.MetricsLog(str(tmp_path))
    for step in range(1, 5):
        log.write(step, {"loss": 1.0 / step, "note": "text is not a scalar", "flag": True})
    log.close()
    events = metrics.read_events(str(tmp_path / "tb"))
    assert list(events) == ["loss"] and [s for s, _ in events["loss"]] == [1, 2, 3, 4]
    assert [v for _, v in events["loss"]] == pytest.approx([1.0 / s for s in range(1, 5)])  # float32 in the events

    log = metrics.MetricsLog(str(tmp_path), resume_step=2)  # the run was killed after its step-2 checkpoint
    for step in (3, 4):
        log.write(step, {"loss": 10.0 * step})
    log.close()
    rows = metrics.read_metrics(str(tmp_path))
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 30.0), (4, 40.0)]
    assert metrics.read_events(str(tmp_path / "tb"))["loss"] == [(1, 1.0), (2, 0.5), (3, 30.0), (4, 40.0)]
    assert train.MetricsLog is metrics.MetricsLog and train.read_metrics is metrics.read_metrics


def test_disabled_log_writes_nothing(tmp_path):
    log = metrics.MetricsLog(str(tmp_path / "w"), enabled=False)
    log.write(1, {"loss": 1.0})
    assert not (tmp_path / "w").exists()
