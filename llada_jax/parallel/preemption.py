"""Stop cleanly when asked to: SIGTERM (what TPU maintenance events, Kubernetes and SLURM send
before they kill a job) becomes "save a checkpoint at this step and exit 0".

A signal reaches each host on its own time, or only some hosts, while a checkpoint needs every
process at the same step. So the handler only sets a local flag, and `PreemptionGuard.should_stop`
turns the flags into one decision at steps every process names the same way: every `check_every`
steps (every step with one process) the processes exchange their flags (`hosts.allgather`, one int32 each) and all stop if any
was signalled. The exchange waits for the step in flight (it is a collective queued behind it),
which is why it can be spaced out; with one process it is a read of the flag.

Used as a context manager around a loop (the trainer's; the RL loop can hook in the same way):

    with PreemptionGuard() as guard:
        for step in ...:
            ...
            if guard.should_stop(step + 1):
                save(step + 1); break

The previous handlers are restored on exit. Outside the main thread Python cannot install a
signal handler; the guard then never fires (and says so once).
"""

from __future__ import annotations

import signal
import threading
from typing import Sequence

import jax
import numpy as np
from absl import logging

from llada_jax.parallel import hosts


class PreemptionGuard:
    """Latches `signals` (default SIGTERM) into a flag that every process agrees on at the steps
    where `should_stop` checks (`step % check_every == 0`)."""

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,), check_every: int = 1):
        if check_every < 1:
            raise ValueError(f"check_every: expected >= 1, found {check_every}")
        self.signals = tuple(signals)
        self.check_every = int(check_every)
        self.received: int | None = None  # the signal this process got, if any
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        del frame
        self.received = signum  # nothing else here: the loop saves at its next check

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is not threading.main_thread():
            logging.warning("PreemptionGuard: not on the main thread, so %s will not be caught",
                            [signal.Signals(s).name for s in self.signals])
            return self
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    @property
    def reason(self) -> str:
        """For the log line: which signal, or that another process was signalled."""
        if self.received is None:
            return "another process was signalled"
        return f"{signal.Signals(self.received).name} received"

    def should_stop(self, step: int) -> bool:
        """Whether every process should save at `step` and stop. Every process must call it at the
        same steps (it is a collective at `step % check_every == 0` with several processes)."""
        if jax.process_count() > 1 and step % self.check_every:
            return False  # one process: the flag is free to read at every step
        flag = np.int32(self.received is not None)
        return bool(np.asarray(hosts.allgather(flag)).max())
