"""Helpers shared by the test files (pytest's default import mode puts tests/ on sys.path)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tests' programs are tiny and compiled once or twice each, so XLA:CPU's compile time is most
# of the suite's time: LLVM's optimisation passes are off (about 40% less wall time on the
# compile-bound tests, measured side by side). Every comparison in the suite is between two
# programs compiled with the same flags, or against a stored oracle with a stated tolerance;
# the launchers that users run keep XLA's defaults.
TEST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process (or a launcher a test starts) with `devices` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {TEST_COMPILE_FLAGS}"


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
