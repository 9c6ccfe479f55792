"""Many hosts, rehearsed on one machine: 2 processes x 4 fake CPU devices (gloo collectives, a
coordinator on 127.0.0.1) against 1 process x 8 devices, and the errors of batches that do not
divide the mesh.

The multi-process tests are slow (each starts several JAX processes that compile the train
step): they are marked `multihost`; `-m "not multihost"` skips them.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import ROOT, load_config, xla_flags
from llada_jax import train
from llada_jax.parallel import hosts, sharding

QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")
SFT_RUN = ["--config.data.num_train=2000", "--config.data.num_test=50", "--config.data.batch_size=8",
           "--config.log_every=1", "--config.total_steps=20", "--config.mesh.data=-1"]
# Sums across processes (gloo) add in another order than across the devices of one process:
# 2 x 4 and 1 x 8 agree to float32 rounding, not bit for bit.
RTOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args, *, processes: int, devices: int, log_dir) -> list[subprocess.Popen]:
    """`processes` copies of `python args...`, each with `devices` fake CPU devices; with more
    than one, they form one JAX run through a coordinator on a free local port."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT)
    port = _free_port()
    procs = []
    os.makedirs(log_dir, exist_ok=True)
    for i in range(processes):
        extra = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}", f"--process_id={i}"]
                 if processes > 1 else [])
        log = open(os.path.join(log_dir, f"process_{i}.log"), "w")
        procs.append(subprocess.Popen([sys.executable, *args, *extra], env=env, cwd=ROOT, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
        procs[-1].log_path = log.name
    return procs


def _kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait()


def _wait(procs, timeout: float = 900) -> None:
    """Waits for every process; any failure or a timeout kills them all and shows the logs."""
    deadline = time.time() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.time() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        failed = [p for p in procs if p.poll() != 0]
        _kill(procs)
        if failed:
            logs = "\n".join(f"--- {p.log_path} (rc {p.returncode})\n" + open(p.log_path).read()[-4000:] for p in failed)
            pytest.fail(f"{len(failed)} of {len(procs)} processes failed or timed out:\n{logs}")


def _sft(workdir, data_dir, *, processes, devices, extra=()):
    return _spawn([os.path.join("launch", "train.py"), f"--config={QUICKSTART}", f"--workdir={workdir}",
                   f"--config.data.data_dir={data_dir}", *SFT_RUN, *extra],
                  processes=processes, devices=devices, log_dir=os.path.join(str(workdir) + "_logs"))


def _metrics(workdir, drop=("tokens_per_s", "flops_per_s_per_device", "mfu")):  # timings
    return [{k: v for k, v in r.items() if k not in drop and not k.startswith("time_")}
            for r in train.read_metrics(str(workdir))]


def _assert_rows_close(got, want, rtol=RTOL, atol=1e-6):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys(), (g.keys(), w.keys())
        for k in w:
            np.testing.assert_allclose(g[k], w[k], rtol=rtol, atol=atol, err_msg=f"step {w['step']} {k}")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("data"))
    cfg = load_config("quickstart.py", **{"data.num_train": 2000, "data.num_test": 50, "data.data_dir": d})
    train.open_examples(cfg, d, "train")
    return d


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory, data_dir):
    """Three runs at once: 1 x 8 and 2 x 4 uninterrupted, and a 2 x 4 run SIGKILLed (both
    processes) after its step-4 checkpoint and step 6, then restarted to the end."""
    root = tmp_path_factory.mktemp("sft")
    one = _sft(root / "one", data_dir, processes=1, devices=8, extra=["--config.checkpoint_every=10"])
    two = _sft(root / "two", data_dir, processes=2, devices=4, extra=["--config.checkpoint_every=10"])
    killed_dir = root / "killed"
    victim = _sft(killed_dir, data_dir, processes=2, devices=4, extra=["--config.checkpoint_every=4"])
    try:
        deadline = time.time() + 900
        # Killed after its step-4 checkpoint and a few steps more (logged, then lost and redone).
        while not ((killed_dir / "checkpoints" / "4").is_dir() and (killed_dir / "metrics.jsonl").exists()
                   and (killed_dir / "metrics.jsonl").read_text().count("\n") >= 6):
            assert all(p.poll() is None for p in victim), "the run to kill ended early:\n" + open(
                victim[0].log_path).read()[-4000:]
            assert time.time() < deadline, "no step-4 checkpoint in time"
            time.sleep(0.05)
        _kill(victim)
        killed_at = max(r["step"] for r in _metrics(killed_dir))
        shutil.copytree(killed_dir, root / "killed_copy")  # resumed below on 1 process (N -> M)
        _wait(_sft(killed_dir, data_dir, processes=2, devices=4, extra=["--config.checkpoint_every=4"]))
        _wait(one + two)
    finally:
        _kill(one + two + victim)
    return root, killed_at


@pytest.mark.multihost
def test_two_hosts_log_the_metrics_of_one(sft_runs):
    root, _ = sft_runs
    want, got = _metrics(root / "one"), _metrics(root / "two")
    assert [r["step"] for r in want] == list(range(1, 21))
    _assert_rows_close(got, want)
    # Every process trained, one wrote: a single metrics file, tokenizer, and checkpoints of every process.
    assert sorted(f for f in os.listdir(root / "two" / "checkpoints" / "20" / "data") if f.startswith("process_")) == [
        "process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.multihost
def test_both_processes_killed_and_restarted_resume_exactly(sft_runs):
    root, killed_at = sft_runs
    assert 6 <= killed_at < 20, "SIGKILL arrived after the run finished"
    # Same program on the same topology: bit for bit.
    assert _metrics(root / "killed") == _metrics(root / "two")


@pytest.mark.multihost
def test_sigterm_to_one_host_stops_both_at_one_step(sft_runs, data_dir, tmp_path):
    """SIGTERM to process 1 alone: both processes save the same step (each its own data state)
    and exit 0, and rerunning resumes bit for bit (same topology as the `two` run)."""
    root, _ = sft_runs
    workdir = tmp_path / "preempted"
    procs = _sft(workdir, data_dir, processes=2, devices=4, extra=["--config.checkpoint_every=10"])
    try:
        deadline = time.time() + 900
        while not ((workdir / "metrics.jsonl").exists() and (workdir / "metrics.jsonl").read_text().count("\n") >= 5):
            assert all(p.poll() is None for p in procs), "the run ended early:\n" + open(procs[0].log_path).read()[-4000:]
            assert time.time() < deadline, "no step 5 in time"
            time.sleep(0.05)
        os.kill(procs[1].pid, signal.SIGTERM)
        _wait(procs)  # both exit 0
    finally:
        _kill(procs)
    stopped = max(r["step"] for r in _metrics(workdir))
    assert 5 <= stopped < 20, stopped
    assert sorted(os.listdir(workdir / "checkpoints" / str(stopped) / "data"))[-2:] == [
        "process_0-of-2.json", "process_1-of-2.json"]
    logs = [open(p.log_path).read() for p in procs]
    assert f"preempted (another process was signalled): saved step {stopped} of 20" in logs[0], logs[0][-2000:]
    assert f"preempted (SIGTERM received): saved step {stopped} of 20" in logs[1], logs[1][-2000:]
    _wait(_sft(workdir, data_dir, processes=2, devices=4, extra=["--config.checkpoint_every=10"]))
    assert _metrics(workdir) == _metrics(root / "two")


@pytest.mark.multihost
def test_checkpoint_of_two_processes_resumes_on_one(sft_runs, data_dir):
    root, _ = sft_runs
    _wait(_sft(root / "killed_copy", data_dir, processes=1, devices=8, extra=["--config.checkpoint_every=4"]))
    _assert_rows_close(_metrics(root / "killed_copy"), _metrics(root / "one"))


@pytest.mark.multihost
def test_rl_and_lora_sft_on_two_hosts_log_the_metrics_of_one(tmp_path, data_dir):
    script = os.path.join("tests", "parallel", "multihost_rl.py")
    one = _spawn([script, str(tmp_path / "one"), data_dir], processes=1, devices=8, log_dir=tmp_path / "one_logs")
    two = _spawn([script, str(tmp_path / "two"), data_dir], processes=2, devices=4, log_dir=tmp_path / "two_logs")
    _wait(one + two)
    want, got = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["step"] for r in want] == [0, 1, 2, 3]  # step 0: the held-out evaluation of the init
    assert any(r.get("updated") for r in want)  # the digit reward varies: updates ran on the global arrays
    # The held-out evaluation, each process decoding its share of the 12 examples, gives the
    # metrics of one process (compared with the others below, to the same tolerance).
    for step in (0, 3):
        assert {"eval_S_accuracy", "eval_S_reward", "eval_S_tpf"} <= want[step].keys() == got[step].keys()
    assert want[0]["eval_S_tpf"] > 0  # the random init's completions: a mean over real rows, padding dropped
    # The RL loss is a small difference of large terms: the cross-process summation order shows
    # in its last digits (observed 2e-5 relative, 2e-6 absolute), rollouts and rewards are exact.
    _assert_rows_close(got, want, rtol=1e-4)
    # Group rollouts on both: one process decodes the 8 rows of a step from row 0; on two, each
    # decodes its own 4 (its prompts) on its own 4 devices from its first row's global index, from
    # a copy of the FSDP-split params gathered whole onto them: the same rollouts (rewards above).
    offsets = lambda d, p: json.loads((d / f"group_rollouts_{p}.json").read_text())
    assert offsets(tmp_path / "one", 0) == [0, 0, 0]
    assert offsets(tmp_path / "two", 0) == [0, 0, 0] and offsets(tmp_path / "two", 1) == [4, 4, 4]
    # The same processes then ran 3 LoRA SFT steps (adapters only, base in bf16): 2 x 4 logs 1 x 8's
    # rows (steps 2 and 3 see the adapters each step before moved: their gradients are not zero).
    want, got = _metrics(tmp_path / "one" / "lora_sft"), _metrics(tmp_path / "two" / "lora_sft")
    assert [r["step"] for r in want] == [1, 2, 3] and all(r["grad_norm"] > 0 for r in want)
    _assert_rows_close(got, want)


# ------------------------------------------------------------------------------ one process
def test_batch_that_does_not_divide_the_mesh_is_an_error():
    mesh = sharding.make_mesh(data=2, fsdp=4)
    with pytest.raises(hosts.BatchShardingError, match=r"data.batch_size: .*data=2 x fsdp=4 = 8\), found 12"):
        hosts.batch_rows(mesh, 12)
    with pytest.raises(hosts.BatchShardingError, match="found 6"):
        train.batch_sharding(mesh, {"tokens": np.zeros((6, 4), np.int32)})
    # A tensor axis does not split the batch: 4 rows on data=4 x tensor=2 are fine.
    assert hosts.batch_rows(sharding.make_mesh(data=4, tensor=2), 4) == (0, 1)


def test_run_with_an_indivisible_batch_stops_before_training(tmp_path):
    cfg = load_config("quickstart.py", **{"data.num_train": 200, "data.num_test": 10, "data.batch_size": 12,
                                          "data.data_dir": str(tmp_path / "data")})
    with pytest.raises(hosts.BatchShardingError, match=r"data.batch_size: expected a multiple .* = 8\), found 12"):
        train.train_iterator(cfg, str(tmp_path), train.load_tokenizer(cfg, str(tmp_path)))


def test_global_batch_round_trip():
    mesh = sharding.make_mesh(fsdp=4, tensor=2)
    local = {"tokens": np.arange(8 * 3, dtype=np.int32).reshape(8, 3), "mask": np.arange(8) % 2 == 0}
    out = hosts.global_batch(mesh, local)
    assert out["tokens"].shape == (8, 3)
    assert out["tokens"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    for k in local:
        np.testing.assert_array_equal(hosts.host_local(out[k], mesh), local[k])
    replicated = jax.device_put(local["tokens"], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    np.testing.assert_array_equal(hosts.host_local(replicated, mesh), local["tokens"])


def test_initialize_without_a_cluster_is_a_no_op_and_half_flags_are_an_error(monkeypatch):
    for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS",
              "OMPI_COMM_WORLD_SIZE", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    assert hosts.initialize() is False
    assert hosts.initialize("127.0.0.1:1234", 1, 0) is False  # one process: nothing to start
    with pytest.raises(ValueError, match="--process_id: expected a value"):
        hosts.initialize("127.0.0.1:1234", 2, None)
    with pytest.raises(ValueError, match="--process_id: expected 0 <= process_id < num_processes=2, found 2"):
        hosts.initialize("127.0.0.1:1234", 2, 2)
    assert hosts.is_primary()
    hosts.barrier("single process")  # a no-op
    np.testing.assert_array_equal(hosts.allgather({"x": np.arange(3)})["x"], [[0, 1, 2]])


@pytest.mark.multihost
def test_sharded_load_on_two_hosts_equals_the_one_process_load(tmp_path, fixture_dir, tiny_hf):
    """Each process reads the slices its devices hold; together they are the whole checkpoint."""
    _, full = tiny_hf
    flat = {"/".join(p.key for p in path): np.asarray(v) for path, v in jax.tree_util.tree_flatten_with_path(full)[0]}
    _wait(_spawn([os.path.join("tests", "parallel", "multihost_load.py"), fixture_dir, str(tmp_path / "out"), "1,4,2,1"],
                 processes=2, devices=4, log_dir=tmp_path / "logs"))
    covered = {name: np.zeros(v.shape, bool) for name, v in flat.items()}
    for i in range(2):
        with np.load(tmp_path / "out" / f"process_{i}.npz") as shards:
            for key in shards.files:
                name, index = key.split("|")
                sl = tuple(slice(*map(int, part.split(":"))) for part in index.split(",")) if index else ()
                np.testing.assert_array_equal(shards[key], flat[name][sl], err_msg=key)
                covered[name][sl] = True
    assert all(c.all() for c in covered.values())



@pytest.mark.multihost
def test_convert_on_two_hosts_round_trips(tmp_path, fixture_dir):
    """launch/convert.py on 2 processes: HF -> Orbax in shards (FSDP over all 8 devices, each
    process writing its part), then Orbax -> HF gathered tensor by tensor and written by process 0:
    the reference file, bit for bit."""
    from safetensors.numpy import load_file

    convert = os.path.join("launch", "convert.py")
    _wait(_spawn([convert, f"--hf_dir={fixture_dir}", f"--orbax_dir={tmp_path / 'orbax'}"],
                 processes=2, devices=4, log_dir=tmp_path / "logs_to_orbax"))
    _wait(_spawn([convert, "--to_hf", f"--orbax_dir={tmp_path / 'orbax'}", f"--hf_dir={tmp_path / 'hf'}"],
                 processes=2, devices=4, log_dir=tmp_path / "logs_to_hf"))
    ref, got = load_file(os.path.join(fixture_dir, "model.safetensors")), load_file(tmp_path / "hf" / "model.safetensors")
    assert set(got) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_data_state_of_n_processes_maps_onto_m():
    from llada_jax.train import checkpoint

    # Written by 2 processes of 4 rows each at step 3; restored on this 1 process of 8 rows.
    extra = {"data_states": {"0": {"next_index": 12}, "1": {"next_index": 12}}}
    assert checkpoint.data_state_for_process(extra, 3, 8) == {"next_index": 24}
    assert checkpoint.data_state_for_process({"data_states": {"0": {"next_index": 5}}}, 3, 8) == {"next_index": 5}
    dropped = {"data_states": {"0": {"next_index": 13}, "1": {"next_index": 12}}}
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="written by 2 processes, restoring on 1"):
        checkpoint.data_state_for_process(dropped, 3, 8)


def test_async_checkpoint_keeps_state_and_per_process_data(tmp_path):
    from llada_jax.train import checkpoint

    state = {"w": jax.numpy.arange(8.0), "step": jax.numpy.int32(3)}
    ckpt = checkpoint.Checkpointer(str(tmp_path), enable_async=True)
    ckpt.save(3, state, extra={"note": "x"}, data_state={"next_index": 24}, force=True)
    ckpt.close()
    assert [f for f in os.listdir(tmp_path / "3" / "data") if f.startswith("process_")] == ["process_0-of-1.json"]
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    restored, extra = ckpt.restore(checkpoint.abstract_with_shardings(state))
    ckpt.close()
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert extra["note"] == "x" and checkpoint.data_state_for_process(extra, 3, 8) == {"next_index": 24}
    assert checkpoint.tree_bytes(state) == 8 * 4 + 4


def test_generate_on_a_mesh_equals_one_device(tiny_hf):
    """Rows over data x fsdp, params sharded by the rule table: the same tokens as one device."""
    from llada_jax import decode, model

    config, params = tiny_hf
    config = config.replace(moe_impl="dense")
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]] * 2
    kw = dict(gen_length=16, block_length=8, preset="S", temperature=1.0, rng=jax.random.key(3))
    want = decode.generate(params, config, prompts, **kw)
    mesh = sharding.make_mesh(data=2, fsdp=4)
    sharded = jax.device_put(params, sharding.param_shardings(model.abstract_params(config), mesh))
    got = decode.generate(sharded, config, prompts, mesh=mesh, **kw)
    assert got.tokens == want.tokens
    np.testing.assert_array_equal(got.forwards, want.forwards)
    for g, w in zip(got.logprobs, want.logprobs):  # this process's rows of the decoder's record
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    with pytest.raises(hosts.BatchShardingError, match=r"prompts \(rows\): .* = 8\), found 4"):
        decode.generate(sharded, config, prompts[:4], mesh=mesh, **kw)


def test_evaluate_on_a_mesh_equals_one_device(tmp_path):
    """Held-out evaluation across the mesh (batches padded to its 8 ways, rows gathered back in
    order) gives the metrics of the plain one-device loop."""
    from llada_jax import model
    from llada_jax.evaluation import heldout

    cfg = load_config("quickstart.py", **{"data.num_train": 200, "data.num_test": 20,
                                          "data.data_dir": str(tmp_path / "data")})
    tokenizer = train.load_tokenizer(cfg, str(tmp_path))
    model_config = train.build_model_config(cfg)
    params = model.init_params(model_config, jax.random.key(0))
    examples = list(train.open_examples(cfg, str(tmp_path), "test"))[:11]  # batches of 8 and 3 (padded to 8)
    kw = dict(mode="S", gen_length=20, block_length=cfg.objective.block_size, template=cfg.data.template,
              batch_size=8)
    want = heldout.evaluate(params, model_config, tokenizer, examples, **kw)
    mesh = sharding.make_mesh(data=2, fsdp=4)
    sharded = jax.device_put(params, sharding.param_shardings(model.abstract_params(model_config), mesh))
    got = heldout.evaluate(sharded, model_config, tokenizer, examples, mesh=mesh, **kw)
    assert got["n"] == want["n"] == 11
    assert {k: v for k, v in got.items() if k != "seconds"} == {k: v for k, v in want.items() if k != "seconds"}
    assert want["forwards_per_sample"] > 0
