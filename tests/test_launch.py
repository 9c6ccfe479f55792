"""The launchers as a user runs them: convert, info, generate, and the quickstart main job."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=900):
    env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_convert_round_trip_reproduces_the_reference_file(fixture_dir, tmp_path):
    _run("launch/convert.py", f"--hf_dir={fixture_dir}", f"--orbax_dir={tmp_path}/orbax")
    _run("launch/convert.py", "--to_hf", f"--orbax_dir={tmp_path}/orbax", f"--hf_dir={tmp_path}/hf")
    ref = load_file(os.path.join(fixture_dir, "model.safetensors"))
    got = load_file(tmp_path / "hf" / "model.safetensors")
    assert set(got) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_convert_carries_the_tokenizer_files_both_ways(fixture_dir, task_tokenizer, tmp_path):
    import shutil

    from llada_jax import launcher
    from llada_jax.train import checkpoint

    hf = tmp_path / "hf_in"
    shutil.copytree(fixture_dir, hf)
    shutil.copy(task_tokenizer, hf / "tokenizer.json")
    (hf / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    out = _run("launch/convert.py", f"--hf_dir={hf}", f"--orbax_dir={tmp_path}/orbax")
    assert "tokenizer.json, tokenizer_config.json" in out.stdout
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "orbax" / name).read_bytes() == (hf / name).read_bytes()
    # What evaluation, generation and --init_from look up for an Orbax directory is now there.
    assert launcher.run_tokenizer(str(tmp_path / "orbax")) == str(tmp_path / "orbax" / "tokenizer.json")
    assert checkpoint.Checkpointer(str(tmp_path / "orbax")).all_steps() == [0]  # Orbax ignores the files
    out = _run("launch/convert.py", "--to_hf", f"--orbax_dir={tmp_path}/orbax", f"--hf_dir={tmp_path}/hf_out")
    assert "tokenizer.json, tokenizer_config.json" in out.stdout
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf_out" / name).read_bytes() == (hf / name).read_bytes()
    assert not list((tmp_path / "hf_out").glob("*.tmp"))


def test_setup_from_an_hf_directory_takes_its_tokenizer(fixture_dir, task_tokenizer, tmp_path):
    import shutil

    from helpers import load_config
    from llada_jax import launcher

    hf = tmp_path / "hf"
    shutil.copytree(fixture_dir, hf)
    shutil.copy(task_tokenizer, hf / "tokenizer.json")
    cfg = load_config("quickstart.py")
    run = launcher.setup(cfg, str(tmp_path / "run"), init_from=str(hf))
    assert cfg.data.tokenizer == str(hf / "tokenizer.json") and run.params is not None
    assert not (tmp_path / "run" / "tokenizer.json").exists()  # not the task tokenizer built afresh


def test_info_counts_without_allocating():
    out = json.loads(_run("launch/info.py", "--preset=mini").stdout)
    assert out["total_params"] == 16_255_643_392 and out["active_params"] == 1_432_973_056


@pytest.fixture(scope="module")
def task_tokenizer(tmp_path_factory):
    from llada_jax.data.tokenizer import build_task_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_task_tokenizer().save(path)
    return path


def test_generate_streams_and_writes_jsonl(fixture_dir, task_tokenizer, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "12+34="}) + "\n" +
                       json.dumps({"messages": [{"role": "user", "content": "5+7="}]}) + "\n")
    out = _run("launch/generate.py", f"--checkpoint={fixture_dir}", f"--tokenizer={task_tokenizer}",
               f"--prompts_file={prompts}", "--prompt=9+9=", "--mode=S", "--gen_length=32", "--block_length=16",
               "--moe_impl=dense", "--noeos_early_stop", f"--output={tmp_path}/out.jsonl")
    rows = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    assert [r["index"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert r["forwards"] >= r["denoising_steps"] >= 1 and len(r["tokens"]) >= 1
    streamed = [line for line in out.stdout.splitlines() if line.startswith("[")]
    assert len(streamed) >= 3  # at least one finished block per prompt, printed as it finished
    assert "TPF" in out.stderr


def test_generate_reports_a_bad_prompts_file(fixture_dir, task_tokenizer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1="}\nnot json\n')
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "launch/generate.py", f"--checkpoint={fixture_dir}",
                          f"--tokenizer={task_tokenizer}", f"--prompts_file={bad}"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert out.returncode != 0 and f"{bad}:2: not JSON" in out.stderr


@pytest.mark.heavy
def test_quickstart_runs_end_to_end(tmp_path):
    """The README's main command, shortened: SFT, evaluation, RL, evaluation, the table and the report."""
    out = _run("launch/quickstart.py", f"--workdir={tmp_path}", "--config.total_steps=6", "--config.log_every=3",
               "--config.checkpoint_every=6", "--config.data.num_train=500", "--config.data.num_test=40",
               "--config.data.batch_size=8",
               "--eval_examples=16", "--rl_steps=2", "--config.rl.prompts_per_step=2", "--config.rl.group_size=4",
               "--config.rl.num_timesteps=2", "--rl_eval_examples=8")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["task"] == "addition" and report["train"]["steps"] == 6
    assert report["rl_run"]["algorithm"] == "ebpo" and report["rl_run"]["steps"] == 2
    assert list(report["rl_run"]["validation_accuracy_by_step"]) == ["0", "2"]
    assert report["rl_run"]["rollout_reward_first"] is not None
    for stage in ("sft", "rl"):
        for mode in ("S", "Q"):
            # A few steps teach little (often an immediate EOS): check the numbers are there and sane.
            assert 0.0 <= report[stage][mode]["accuracy"] <= 1.0 and report[stage][mode]["tpf"] >= 0.0
    assert len(train_rows := _jsonl(tmp_path / "sft" / "metrics.jsonl")) == 2 and train_rows[-1]["step"] == 6
    rl_rows = _jsonl(tmp_path / "rl_ebpo" / "metrics.jsonl")  # step 0: the held-out point of the SFT model
    assert [r["step"] for r in rl_rows] == [0, 1, 2] and all("eval_S_accuracy" in rl_rows[i] for i in (0, 2))
    assert f"report: {tmp_path}/report.json" in out.stdout
    assert (tmp_path / "training_curves.png").stat().st_size > 10_000  # the README's curves (tests/evaluation/test_plots.py)
    from llada_jax.train.metrics import read_events

    assert [s for s, _ in read_events(str(tmp_path / "sft" / "tb"))["loss"]] == [3, 6]  # TensorBoard by default
    assert [s for s, _ in read_events(str(tmp_path / "rl_ebpo" / "tb"))["reward_mean"]] == [1, 2]
    for row in ("SFT    S", "SFT    Q", "RL     S", "RL     Q"):
        assert row in out.stdout
    story = report["story"]  # what the main job shows, per seed: RL's lift and S's speed over Q
    assert story["modes"] == ["S", "Q"] and list(story["rl_lift_points"]) == ["ebpo"]
    lift = 100 * (report["rl"]["S"]["accuracy"] - report["sft"]["S"]["accuracy"])
    assert story["rl_lift_points"]["ebpo"]["by_seed"]["0"] == pytest.approx(lift)
    for row, stage in (("sft", "sft"), ("ebpo", "rl")):
        q_tpf = report[stage]["Q"]["tpf"]
        assert q_tpf == 0 or story["speed"][row]["tpf_ratio"]["mean"] == pytest.approx(report[stage]["S"]["tpf"] / q_tpf)
    assert "EBPO lift of S accuracy over SFT, points: seed 0" in out.stdout and "S vs Q, EBPO: TPF" in out.stdout
    cost = report["likelihood_cost"]  # the vectorized terms equal the per-block loop's on the run's batch
    assert cost["completion_blocks"] >= 4 and cost["forwards"]["per_block_loop"] == 8
    assert cost["max_abs_term_diff"] < 1e-3 and cost["vectorized_s"] > 0
    # Another algorithm from the same command reuses the SFT stage and joins the report; so do a
    # second training seed and the longer-SFT control, with the spread over seeds.
    out = _run("launch/quickstart.py", f"--workdir={tmp_path}", "--config.total_steps=6", "--config.log_every=3",
               "--config.checkpoint_every=6", "--config.data.num_train=500", "--config.data.num_test=40",
               "--config.data.batch_size=8",
               "--eval_examples=16", "--rl_steps=1", "--config.rl.prompts_per_step=2", "--config.rl.group_size=4",
               "--algorithms=dipo", "--seeds=0,1", "--sft_longer_steps=2", "--modes=S", "--rl_eval_every=0")
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["rl_by_algorithm"]) == {"ebpo", "dipo"} and report["rl_run"]["algorithm"] == "dipo"
    assert report["seeds"] == [0, 1] and set(report["by_seed"]["0"]) == {"sft", "sft_longer", "ebpo", "dipo"}
    assert set(report["by_seed"]["1"]) == {"sft", "sft_longer", "dipo"}
    assert set(report["story"]["rl_lift_points"]["dipo"]["by_seed"]) == {"0", "1"}  # only S decoded: no speed rows
    assert report["story"]["rl_lift_points"]["dipo"]["n"] == 2
    assert _jsonl(tmp_path / "seed_1" / "sft_longer" / "metrics.jsonl")[-1]["step"] == 8
    assert [r["step"] for r in _jsonl(tmp_path / "seed_1" / "rl_dipo" / "metrics.jsonl")] == [1]
    for row, n in (("sft", 2), ("sft_longer", 2), ("dipo", 2), ("ebpo", 1)):
        acc = report["summary"][row]["S"]["accuracy"]
        values = [report["by_seed"][s][row]["S"]["accuracy"] for s in ("0", "1") if row in report["by_seed"][s]]
        assert acc["n"] == n and acc["mean"] == pytest.approx(sum(values) / n)
        assert acc["min"] == min(values) and acc["max"] == max(values)
    assert "mean over 2 training seeds [0, 1]" in out.stdout and "SFT+   S" in out.stdout


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_load_computes_in_the_checkpoints_dtype_unless_told(fixture_dir, task_tokenizer, tmp_path):
    """A bf16 release (torch_dtype) computes and caches in bf16 by default, fp32 on request; an
    Orbax run keeps the dtype it trained in (the quickstart's fp32); --quantize packs the weights."""
    from llada_jax import launcher
    from llada_jax.model import hf, quant
    from llada_jax.train import checkpoint

    config, params = hf.load_hf_checkpoint(fixture_dir)
    hf.save_hf_checkpoint(tmp_path / "bf16", config, params, dtype="bfloat16")
    tok = str(task_tokenizer)
    run = launcher.load(str(tmp_path / "bf16"), tok)
    assert (run.config.dtype, run.config.param_dtype) == ("bfloat16", "bfloat16")
    assert launcher.load(str(tmp_path / "bf16"), tok, dtype="float32").config.dtype == "float32"
    checkpoint.save_params(str(tmp_path / "orbax"), config, params)  # trained in fp32
    assert launcher.load(str(tmp_path / "orbax"), tok).config.dtype == "float32"
    q = launcher.load(str(tmp_path / "orbax"), tok, quantize="int8", quant_block=16)
    assert isinstance(q.params["moe_layers"]["moe"]["wi_gate"], quant.QArray)
    with pytest.raises(ValueError, match="dtype: expected one of"):
        launcher.load(str(tmp_path / "orbax"), tok, dtype="fp16")
