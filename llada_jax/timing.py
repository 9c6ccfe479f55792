"""Timing for the benchmark scripts: compile (first call) separately from steady-state calls."""

from __future__ import annotations

import time
from typing import Any, Callable


def time_call(fn: Callable, *args, repeats: int = 5) -> tuple[float, float, Any]:
    """`(median seconds of `repeats` calls, seconds of the first call (compile + run), result)`."""
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], first, out
