"""Helpers shared by the test files (pytest's default import mode puts tests/ on sys.path)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA's default optimisation level, and every compiled program kept in the persistent cache
# (tests/conftest.py: no minimum compile time). CI runs on a machine whose cache is warm, where
# the suite's time is tracing, lowering and running the programs, not compiling them: measured side
# by side on tests/decode/test_decoding.py (-n 2, this 2-core machine), 116 s with LLVM's passes off
# (the earlier choice, which pays off only on a cold cache) against 66 s at the defaults with
# everything cached. A cold cache compiles ~3.4x longer than the warm run.
TEST_COMPILE_FLAGS = ""


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process (or a launcher a test starts) with `devices` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {TEST_COMPILE_FLAGS}".strip()


def load_config(name: str, arg=None, **overrides):
    """`configs/<name>`'s `get_config(arg)`, loaded by path as the launchers do, with dotted
    overrides applied in order: `load_config("rl.py", **{"rl.group_size": 4})`."""
    spec = importlib.util.spec_from_file_location(f"config_{os.path.splitext(name)[0]}",
                                                  os.path.join(ROOT, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(arg)
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


def assert_close_to_scale(actual, desired, rel: float, err_msg: str = "") -> None:
    """Every |actual - desired| <= rel * max(1, max |desired|).

    fp32 results of two organisations of one computation (a kernel and its dense oracle, a cache
    and a full recompute, a composite forward and a per-block loop) differ by rounding that grows
    with the magnitude of the values, and with how XLA fuses and threads on the machine at hand:
    an absolute tolerance on log-probabilities of magnitude ~20 passes on one machine and fails on
    another (1.14e-5 against atol 1e-5 at -18.57, on a 2-core CI machine). So the bound scales
    with the largest magnitude compared; the floor of 1 keeps an absolute `rel` for values near
    zero. `rel` is a relative precision: ~1e-6 is a few fp32 ulps of accumulated rounding.
    """
    import numpy as np

    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    scale = max(1.0, float(np.max(np.abs(desired)))) if desired.size else 1.0
    np.testing.assert_allclose(actual, desired, rtol=0, atol=rel * scale,
                               err_msg=f"{err_msg} (tolerance {rel:g} x scale {scale:.3g})".strip())
