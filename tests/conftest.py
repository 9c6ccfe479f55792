"""Test setup: 8 fake CPU devices and full-precision matmuls (the fixture's tolerance needs it)."""

import fcntl
import os
import tempfile

from helpers import xla_flags  # noqa: E402

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
# A persistent compilation cache shared by the test processes and the launchers they start:
# identical programs (e.g. the runs of the resume test) compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "llada_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
# With libtpu installed (the test extra, for tests/test_aot.py), JAX tries its TPU plugin at start-up:
# let parallel test processes load it at once (no TPU is opened) and skip the GCE metadata query.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "fixtures", "llada2_tiny")


@pytest.fixture(scope="session")
def fixture_dir():
    if not os.path.isdir(FIXTURE_DIR):
        pytest.fail(f"parity fixture not found at {FIXTURE_DIR} (CI clones with ../shared beside the repo)")
    return FIXTURE_DIR


@pytest.fixture(scope="session")
def tiny_hf(fixture_dir):
    """(config, params) of the official tiny fixture model."""
    from llada_jax.model.hf import load_hf_checkpoint

    return load_hf_checkpoint(fixture_dir)


@pytest.fixture
def sandbox_lock(tmp_path_factory):
    """One sandbox test at a time across the xdist workers of a run: those tests check the whole
    machine for stray sandbox processes (and kill them), which would catch another worker's run in
    progress. A lock rather than an xdist group: with `--dist loadgroup`, xdist 3.8 hangs when it
    replaces a crashed worker (pytest-dev/pytest-xdist#1323, #1378), holding CI until its limit."""
    path = tmp_path_factory.getbasetemp().parent / "sandbox-tests.lock"  # shared by the run's workers
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# The suite's heaviest files first (measured with --durations=0 on 2 cores, most test time first).
# With `--dist worksteal` (setup.cfg) each xdist worker starts on a contiguous half of this order
# and an idle worker steals the tail of the other's queue: the long multi-process and end-to-end
# tests start at once, on one worker each, instead of one of them keeping a worker busy alone
# at the end; a file's tests stay together, so its module fixtures are built once.
HEAVY_FIRST = (
    "parallel/test_hosts.py", "rl/test_rl_loop.py", "train/test_train.py", "rl/test_rl.py", "test_launch.py",
    "decode/test_decoding.py", "model/test_model.py", "test_aot.py", "test_notebooks.py", "decode/test_engine.py",
    "model/test_moe.py", "rl/test_rl_lora.py", "train/test_lora_training.py", "train/test_sft_packing.py",
    "model/test_quant.py", "model/test_lora.py", "kernels/test_logits.py", "train/test_objectives.py",
    "serve/test_serve.py",
)


def pytest_collection_modifyitems(config, items):
    tests = os.path.dirname(os.path.abspath(__file__))
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.relpath(str(item.path), tests), len(rank)))  # stable
