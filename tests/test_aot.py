"""Ahead-of-time compilation for TPU topologies (llada_jax.aot, launch/compile.py).

The compile tests need libtpu, XLA's TPU compiler, which then runs on this CPU for a 4-chip v5e
slice (the tiny model, shapes kept small so that each job compiles in seconds on a quiet
machine). They run launch/compile.py in a subprocess: with libtpu installed (the `tpu` extra), or
from the directory `LLADA_JAX_LIBTPU_PATH` names, where `.ci/run` installs it apart from the
environment (an installed libtpu makes every JAX process probe for a TPU at start-up).
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT
from llada_jax import aot

LIBTPU_PATH = os.environ.get("LLADA_JAX_LIBTPU_PATH", "")
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None or os.path.isdir(os.path.join(LIBTPU_PATH, "libtpu"))
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]', or "
                                                         "LLADA_JAX_LIBTPU_PATH): no TPU compiler for a topology")


def compile_job(*args):
    """launch/compile.py in a subprocess (libtpu from LLADA_JAX_LIBTPU_PATH when set)."""
    path = os.pathsep.join(p for p in (ROOT, LIBTPU_PATH, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, ALLOW_MULTIPLE_LIBTPU_LOAD="1", TPU_SKIP_MDS_QUERY="1")
    return subprocess.run([sys.executable, "launch/compile.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


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


_TINY = {  # the tiny model's jobs at small shapes; rl: 2 prompts x 4 completions, N = 2
    # sft with splash attention (2L = 128, one tile): the Pallas kernel must compile for the
    # topology, which needs it inside shard_map (XLA cannot partition a Mosaic kernel)
    "sft": ["--config=configs/quickstart.py", "--config.data.batch_size=8", "--config.data.seq_len=64",
            "--config.model.overrides.attention_impl=splash"],
    "rl": ["--config=configs/rl.py", "--config.rl.prompts_per_step=2", "--config.rl.group_size=4",
           "--config.rl.num_timesteps=2"],
    "decode": ["--config=configs/quickstart.py", "--config.data.batch_size=8", "--prompt_length=16",
               "--gen_length=32"],
}
_TINY["decode_int8"] = _TINY["decode"] + ["--quantize=int8"]  # weights stored int8 (model.quant)


@needs_libtpu
@pytest.mark.parametrize("job", ["sft", "rl", "decode", "decode_int8"])
def test_tiny_jobs_compile_for_a_tpu_slice(job):
    out = compile_job(f"--job={job.split('_')[0]}", "--topology=v5e:2x2", *_TINY[job])
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads([line for line in out.stdout.splitlines() if line.strip()][-1])
    assert report["topology"] == "v5e:2x2" and report["chips"] == 4
    assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1, "expert": 1}  # the config's: data=-1
    assert report["fits"] is True and "error" not in report
    assert report["hbm_bytes"] == aot.GENERATIONS["v5e"].hbm_bytes
    assert report["temporary_bytes"] > 0 and report["argument_bytes"] > 0
    assert report["total_bytes"] == (report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"]
                                     + report["temporary_bytes"] + report["generated_code_bytes"])
    if job in ("sft", "rl"):  # the train state is donated: its outputs reuse the argument buffers
        assert report["alias_bytes"] > 0
    if job == "sft":  # the quickstart pins xla; --config.model.overrides wins over it
        assert report["attention"] == "splash" and report["seq_len"] == 64
    if job == "rl":
        assert (report["rollouts"], report["num_timesteps"], report["grad_mode"]) == (8, 2, "direct")
    if job.startswith("decode"):
        assert report["canvas"] == 50 and report["batch"] == 8  # 16 + 32 tokens in blocks of 5
        assert report["quantize"] == ("int8" if job == "decode_int8" else None)


@needs_libtpu
def test_compile_reports_a_job_that_does_not_fit_readably(tmp_path):
    """Through the launcher: a chip with 1 MiB of HBM; one JSON line naming the job and the shortfall."""
    out = compile_job("--config=configs/quickstart.py", "--topology=v5e-4", "--job=decode",
                      "--config.data.batch_size=8", "--prompt_length=16", "--gen_length=32", "--hbm_mib=1")
    assert out.returncode == 1, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, out.stdout
    report = json.loads(lines[0])
    assert report["fits"] is False and report["job"] == "decode"
    assert report["hbm_bytes"] == 2 ** 20
    assert report["required_bytes"] > 2 ** 20
    assert report["shortfall_bytes"] == report["required_bytes"] - 2 ** 20
    assert report["error"].startswith("decode does not fit on v5e:2x2 (4 chips, mesh data=4)")
    assert "short by" in report["error"] and "CompileTimeHbmOom" in report["xla_message"]
    assert "decode does not fit" in out.stderr


@needs_libtpu
@pytest.mark.heavy
def test_sft_config_resolves_splash_and_expert_parallel_on_its_tpu_mesh():
    """configs/sft.py with nothing about back ends or the mesh passed: "auto" resolves for the TPU
    (splash, expert_parallel on the config's expert axis), the mesh is the config's (fsdp=-1 x
    expert=8) over the topology's chips, and a mesh flag overrides one axis of it."""
    tiny = ["--config=configs/sft.py:size=mini", "--config.model.preset=tiny", "--config.data.batch_size=8",
            "--config.data.seq_len=64", "--job=sft"]
    out = compile_job(*tiny, "--topology=v5e:2x4")  # 8 chips: fsdp=1 x expert=8
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads([line for line in out.stdout.splitlines() if line.strip()][-1])
    assert report["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1, "expert": 8}
    assert (report["attention"], report["moe_impl"], report["remat"]) == ("splash", "expert_parallel", "full")
    assert report["fits"] is True


@needs_libtpu
def test_sft_lora_config_plans_adapters_on_a_bf16_base_over_fsdp():
    """configs/sft.py:size=mini,lora (the v5e-8 LoRA plan) with nothing else passed compiles the LoRA
    step: rank 8, the base in bf16, FSDP over every chip with per-device expert routing (no expert
    axis: its exchange buffer is what does not fit), the adapters alone trainable. The tiny preset
    stands in for mini (whose compile takes many minutes; bench/plans/rows_lora.txt)."""
    out = compile_job("--config=configs/sft.py:size=mini,lora", "--config.model.preset=tiny",
                      "--config.data.seq_len=64", "--job=sft", "--topology=v5e:2x4")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads([line for line in out.stdout.splitlines() if line.strip()][-1])
    assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}
    assert (report["lora_rank"], report["base_dtype"], report["moe_impl"]) == (8, "bfloat16", "expert_parallel")
    assert 0 < report["trainable_params"] < 0.5 * 338_496 and report["fits"] is True  # tiny: 338,496 params


def test_run_mesh_is_the_configs_with_flag_overrides():
    """`aot.run_mesh`: the mesh launch/train.py builds from the config's `mesh` section (here over
    the 8 fake CPU devices), single axes overridden; an override to -1 takes the config's -1."""
    import jax

    from helpers import load_config

    cfg = load_config("sft.py", "size=mini")  # data=1, fsdp=-1, tensor=1, expert=8
    shape = lambda **kw: dict(aot.run_mesh(cfg, jax.devices(), **kw).shape)  # noqa: E731
    assert shape() == {"data": 1, "fsdp": 1, "tensor": 1, "expert": 8}
    assert shape(expert=2) == {"data": 1, "fsdp": 4, "tensor": 1, "expert": 2}
    assert shape(data=-1, expert=4) == {"data": 2, "fsdp": 1, "tensor": 1, "expert": 4}
    with pytest.raises(ValueError, match="mesh"):
        shape(expert=3)
    with pytest.raises(ValueError, match="expected axes"):
        aot.mesh_section(cfg, pipeline=2)
