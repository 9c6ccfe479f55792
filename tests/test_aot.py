"""Ahead-of-time compilation for TPU topologies (llada_jax.aot, launch/compile.py).

The compile tests need libtpu (the test extra installs it on Linux x86_64): XLA's TPU compiler
runs on this CPU for a 4-chip v5e slice, the tiny model, shapes kept small so that each job
compiles in seconds on a quiet machine.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, load_config
from llada_jax import aot

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]'): "
                                                         "no TPU compiler to compile for a topology")


@pytest.mark.parametrize("text, name, chips, cloud", [
    ("v5p-64", "v5p:2x4x4", 32, "v5p-64"),
    ("v5p-256", "v5p:4x4x8", 128, "v5p-256"),
    ("v5p-8", "v5p:2x2x1", 4, "v5p-8"),
    ("v5p-1024", "v5p:8x8x8", 512, "v5p-1024"),
    ("v6e-32", "v6e:4x8", 32, "v6e-32"),
    ("v5e-16", "v5e:4x4", 16, "v5e-16"),
    ("v5litepod-8", "v5e:2x4", 8, "v5e-8"),
    ("v5p:2x4x4", "v5p:2x4x4", 32, "v5p-64"),
    ("V5E:2x2", "v5e:2x2", 4, "v5e-4"),
])
def test_parse_topology(text, name, chips, cloud):
    t = aot.parse_topology(text)
    assert (t.name, t.chips, t.cloud_name) == (name, chips, cloud)


@pytest.mark.parametrize("text, fragment", [
    ("v5p-63", "even N"),
    ("v5p-48", "power of two"),
    ("v5e-12", "N in"),
    ("v5e:2x2x2", "2D shape"),
    ("v9-8", "generation 'v9'"),
    ("tpu", "expected a TPU topology"),
])
def test_parse_topology_rejects(text, fragment):
    with pytest.raises(ValueError, match="topology") as e:
        aot.parse_topology(text)
    assert fragment in str(e.value) and text in str(e.value)


def test_parse_hbm_oom_reads_xla_numbers():
    msg = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory required for "
           "HLO temporaries (702.02G) exceeds available HBM (95.73G). HLO module: jit_step.")
    assert aot.is_hbm_oom(msg)
    req, avail, what = aot.parse_hbm_oom(msg)
    assert (req, avail, what) == (round(702.02 * 2 ** 30), round(95.73 * 2 ** 30), "HLO temporaries")
    assert aot.parse_hbm_oom("Ran out of memory in memory space hbm. Used 1.50M of 512.00K hbm.")[:2] == (
        round(1.5 * 2 ** 20), 512 * 2 ** 10)
    assert not aot.is_hbm_oom("INVALID_ARGUMENT: shapes do not match")


@pytest.fixture(scope="module")
def v5e_2x2():
    return aot.parse_topology("v5e:2x2")


def _tiny(job):
    if job == "rl":  # 2 prompts x 4 completions, N = 2: the EBPO step's shape, small
        return load_config("rl.py", **{"rl.prompts_per_step": 2, "rl.group_size": 4, "rl.num_timesteps": 2})
    return load_config("quickstart.py", **{"data.batch_size": 8})


@needs_libtpu
@pytest.mark.parametrize("job", ["sft", "rl", "decode"])
def test_tiny_jobs_compile_for_a_tpu_slice(job, v5e_2x2):
    report = aot.plan(job, _tiny(job), v5e_2x2, **({"prompt_length": 16, "gen_length": 32} if job == "decode" else {}))
    assert report["topology"] == "v5e:2x2" and report["chips"] == 4
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1, "expert": 1}
    assert report["fits"] is True and "error" not in report
    assert report["hbm_bytes"] == aot.GENERATIONS["v5e"].hbm_bytes
    assert report["temporary_bytes"] > 0 and report["argument_bytes"] > 0
    assert report["total_bytes"] == (report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"]
                                     + report["temporary_bytes"] + report["generated_code_bytes"])
    if job in ("sft", "rl"):  # the train state is donated: its outputs reuse the argument buffers
        assert report["alias_bytes"] > 0
    if job == "rl":
        assert (report["rollouts"], report["num_timesteps"], report["grad_mode"]) == (8, 2, "direct")
    if job == "decode":
        assert report["canvas"] == 48 and report["batch"] == 8
    json.dumps(report)


@needs_libtpu
def test_compile_reports_a_job_that_does_not_fit_readably(tmp_path):
    """Through the launcher: a chip with 1 MiB of HBM; one JSON line naming the job and the shortfall."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "launch/compile.py", "--config=configs/quickstart.py", "--topology=v5e-4", "--job=decode",
         "--config.data.batch_size=8", "--prompt_length=16", "--gen_length=32", "--hbm_mib=1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, out.stdout
    report = json.loads(lines[0])
    assert report["fits"] is False and report["job"] == "decode"
    assert report["hbm_bytes"] == 2 ** 20
    assert report["required_bytes"] > 2 ** 20
    assert report["shortfall_bytes"] == report["required_bytes"] - 2 ** 20
    assert report["error"].startswith("decode does not fit on v5e:2x2 (4 chips, mesh fsdp=4)")
    assert "short by" in report["error"] and "CompileTimeHbmOom" in report["xla_message"]
    assert "decode does not fit" in out.stderr
