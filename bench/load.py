r"""Peak resident memory of each process while loading an HF checkpoint in shards (prints JSON).

  python bench/load.py --workdir=/tmp/bench/load.py --processes=2 --devices=4 --size_gb=1

Writes a random checkpoint of about --size_gb GB (a wide, few-layer LLaDA2 MoE model, fp32) once,
then starts --processes CPU processes of --devices fake devices each (gloo collectives, a
coordinator on 127.0.0.1) that load it with `load_hf_checkpoint(shardings=...)` on a mesh with
every device on `fsdp`, and, for comparison, one process that loads it whole onto one device.
Each process reports its resident memory before loading, its peak (`ru_maxrss`) and sampled
peaks of anonymous and file-backed resident memory. On CPU the devices' buffers are host
memory, so a process's peak counts the shards it holds (1/processes of the model) plus what
loading needs on top; file-backed pages are the mapped safetensors (page cache).
"""

import json
import os
import resource
import socket
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "/tmp/llada_bench_load", "The checkpoint is written here (reused if present).")
flags.DEFINE_integer("processes", 2, "Processes that load in shards.")
flags.DEFINE_integer("devices", 4, "Fake CPU devices per process.")
flags.DEFINE_float("size_gb", 1.0, "Approximate checkpoint size in GB (fp32).")
flags.DEFINE_string("worker", None, "Internal: run one loading process ('sharded' or 'whole').")
flags.DEFINE_integer("process_id", None, "Internal: this worker's process index.")
flags.DEFINE_string("coordinator", None, "Internal: coordinator address.")


def _status_mb() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) / 1024
    return out


def _rss_mb() -> float:
    return _status_mb().get("VmRSS", float("nan"))


class _PeakSampler:
    """Peaks of resident memory, anonymous (heap, device buffers) and file-backed (mapped
    safetensors pages, evictable page cache), sampled every few milliseconds."""

    def __init__(self):
        import threading

        self.peaks = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            for k, v in _status_mb().items():
                self.peaks[k] = max(self.peaks.get(k, 0.0), v)
            time.sleep(0.005)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {f"peak_{k}_mb": round(v, 1) for k, v in self.peaks.items()}


def _config(size_gb: float):
    from llada_jax.model.config import get_config

    # A wide tiny: parameters ~ (2 V D + layers x experts x 3 D F); D, F, V fixed, experts scaled.
    base = dict(hidden_size=1024, moe_intermediate_size=512, intermediate_size=2048, vocab_size=32768,
                num_layers=3, num_heads=8, num_kv_heads=4, head_dim=128, first_k_dense_replace=1,
                mask_token_id=32767, eos_token_id=32766, pad_token_id=32766)
    per_expert = 2 * 3 * 1024 * 512 * 4  # two MoE layers, fp32
    fixed = (2 * 32768 * 1024 + 3 * 1024 * 2048 + 3 * 1024 * 8 * 128 * 2 + 2 * 3 * 1024 * 512) * 4
    experts = max(8, int((size_gb * 1e9 - fixed) / per_expert) // 8 * 8)
    return get_config("tiny", **base, num_experts=experts, n_group=8, topk_group=4, num_experts_per_tok=4)


def _write_checkpoint(path: str, size_gb: float) -> int:
    import jax
    import numpy as np

    from llada_jax import model
    from llada_jax.model import hf

    config = _config(size_gb)
    if not os.path.exists(os.path.join(path, "config.json")):
        import flax.linen as nn

        abstract = nn.meta.unbox(model.abstract_params(config))
        rng = np.random.default_rng(0)
        params = jax.tree_util.tree_map(lambda x: (rng.standard_normal(x.shape, np.float32) * 0.02), abstract)
        hf.save_hf_checkpoint(path, config, params, max_shard_bytes=256 * 2**20)
        del params
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def _worker():
    from llada_jax.parallel import hosts

    if FLAGS.worker == "sharded":
        hosts.initialize(FLAGS.coordinator, FLAGS.processes, FLAGS.process_id)
    import jax

    from llada_jax import model
    from llada_jax.model import hf
    from llada_jax.parallel import sharding

    path = os.path.join(FLAGS.workdir, "hf")
    config = hf.ModelConfig.from_hf_config(path)
    before = _rss_mb()
    sampler = _PeakSampler()
    t0 = time.perf_counter()
    if FLAGS.worker == "sharded":
        mesh = sharding.make_mesh(data=1, fsdp=-1)
        shardings = sharding.param_shardings(model.abstract_params(config), mesh)
        _, params = hf.load_hf_checkpoint(path, config=config, shardings=shardings)
    else:
        _, params = hf.load_hf_checkpoint(path, config=config)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    peaks = sampler.stop()
    held = sum(s.data.nbytes for x in jax.tree_util.tree_leaves(params) for s in x.addressable_shards)
    print(json.dumps({"process": jax.process_index(), "rss_before_mb": round(before, 1),
                      "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), **peaks,
                      "held_by_its_devices_mb": round(held / 2**20, 1), "seconds": round(seconds, 1)}))


def _spawn(mode: str, processes: int, devices: int) -> list[dict]:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), f"--workdir={FLAGS.workdir}",
                               f"--worker={mode}", f"--processes={processes}", f"--process_id={i}",
                               f"--coordinator=127.0.0.1:{port}"], env=env, stdout=subprocess.PIPE, text=True)
             for i in range(processes)]
    try:
        outs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a {mode} loading process failed: {[p.returncode for p in procs]}")
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def main(argv):
    del argv
    if FLAGS.worker:
        return _worker()
    size = _write_checkpoint(os.path.join(FLAGS.workdir, "hf"), FLAGS.size_gb)
    sharded = _spawn("sharded", FLAGS.processes, FLAGS.devices)
    whole = _spawn("whole", 1, 1)
    print(json.dumps({"checkpoint_mb": round(size / 2**20, 1), "processes": FLAGS.processes,
                      "devices_per_process": FLAGS.devices, "sharded": sharded, "whole_on_one_device": whole[0]},
                     indent=1))


if __name__ == "__main__":
    app.run(main)
