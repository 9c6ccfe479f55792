"""The one metrics writer of training, RL and evaluation: metrics.jsonl plus TensorBoard events.

`MetricsLog(workdir)` appends one JSON object per logged step to `<workdir>/metrics.jsonl`
and writes every numeric field as a TensorBoard scalar to `<workdir>/tb` (tensorboardX, a
dependency, needs no TensorFlow): `tensorboard --logdir=<workdir>` shows the run. On
resume, lines beyond the restored step are dropped first (the killed run logged them after
its last checkpoint and the resumed run logs them again), and the event writer is opened
with `purge_step` so that TensorBoard hides that run's events past the restored step too.

The workdir may be a URL (gs://, through etils.epath): object stores cannot append, so there
the file is rewritten whole at each write (small: one line per logged step), and TensorBoard
events are skipped.

Every writer goes through this class, so a multi-host run can make only one process write
by guarding its construction in one place (`enabled=False` makes it a no-op).

`read_events` reads the scalars back from the event files (for tests and notebooks, without
the tensorboard package).
"""

from __future__ import annotations

import json
import os
import struct
import time
from typing import Any, Mapping, Optional

import numpy as np
from etils import epath
from tensorboardX import SummaryWriter


class MetricsLog:
    """Appends one JSON object per logged step to `<workdir>/metrics.jsonl` and the numeric
    fields as TensorBoard scalars under `<workdir>/tb` (see the module docstring)."""

    def __init__(self, workdir: str, resume_step: int = 0, *, tensorboard: bool = True,
                 enabled: Optional[bool] = None):
        self.path = epath.Path(workdir) / "metrics.jsonl"  # a local path or a URL
        if enabled is None:  # one writer per run: the primary process (metrics are global values)
            from llada_jax.parallel import hosts

            enabled = hosts.is_primary()
        self.enabled = enabled
        self._writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Object stores (gs://) cannot append: there the whole file is rewritten at each write.
        self._append = "://" not in os.fspath(self.path)
        self._rows: list[str] = []
        if self.path.exists():
            keep = [line + "\n" for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self._rewrite(keep)
        if tensorboard and not self._append:
            from absl import logging

            logging.warning("%s: TensorBoard events are written for local workdirs only; metrics.jsonl has "
                            "every logged value", workdir)
        elif tensorboard:
            # the file name holds the second only: a writer opened within the same second (a quick
            # resume) would overwrite the last one's file without a suffix of its own, which also
            # keeps TensorBoard's reading order (by name) the writing order
            self._writer = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step + 1 if resume_step else None,
                                         filename_suffix=f".{time.time_ns()}")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _to_py(v) for k, v in metrics.items()}}
        if self._append:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        else:
            self._rewrite(self._rows + [json.dumps(row) + "\n"])
        if self._writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._writer.add_scalar(k, v, step)
            self._writer.flush()

    def _rewrite(self, lines: list[str]) -> None:
        """The file holds exactly `lines`, replaced in one rename."""
        tmp = self.path.parent / (self.path.name + ".tmp")
        tmp.write_text("".join(lines))
        tmp.replace(self.path)
        self._rows = list(lines) if not self._append else []

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _to_py(v):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()


def read_metrics(workdir: str) -> list[dict]:
    text = (epath.Path(workdir) / "metrics.jsonl").read_text()  # a local path or a URL
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_events(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the scalars in every event file under `logdir`, in file
    then write order, TensorBoard's purges applied (a SessionLog START with a step hides the
    earlier events at or past that step)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(logdir) for f in names if "tfevents" in f)
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                for tag in scalars:
                    scalars[tag] = [(s, v) for s, v in scalars[tag] if s < event.step]
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return scalars
