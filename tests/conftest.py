"""Test setup: 8 fake CPU devices and full-precision matmuls (the fixture's tolerance needs it)."""

import fcntl
import gc
import os
import tempfile

from helpers import xla_flags  # noqa: E402

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
# A persistent compilation cache shared by the test processes and the launchers they start:
# identical programs (e.g. the runs of the resume test) compile once, the small ones too (a cache
# read costs less than the shortest XLA:CPU compile; tests/helpers.py says what this saves).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "llada_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# With libtpu installed (the test extra, for tests/test_aot.py), JAX tries its TPU plugin at start-up:
# let parallel test processes load it at once (no TPU is opened) and skip the GCE metadata query.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "fixtures", "llada2_tiny")


def pytest_collection_modifyitems(config, items):
    """`heavy` tests first, the rest in their order: xdist deals the first tests out round-robin, so
    the longest runs start at once on both workers instead of one of them ending the run alone.
    Only tests without module-scoped fixtures are marked (moving one would set its module's
    fixtures up twice)."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)  # stable: ties keep order


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
    """After each test module, drop JAX's cached programs (its fixtures are gone by then). Each
    loaded XLA:CPU executable keeps memory mappings of its code: a worker that kept every program
    had 35,023 after the 118 tests of tests/train, model and decode (-n 2), on course to pass
    Linux's default 65,530 per process in a full run of ~290 tests a worker, where loading the
    next program from the persistent cache died in XLA (a segfault or an abort in
    `deserialize_executable`, twice in CI, late in the run). With this: at most 11,702. A later
    module that needs a program again reads it back from the persistent cache."""
    yield
    jax.clear_caches()
    gc.collect()


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
