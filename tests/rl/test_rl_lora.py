"""RL with LoRA (launch/rl.py with `lora.rank > 0`): adapters train on the frozen base, which is
also the KL reference, and a run SIGKILLed after a checkpoint resumes exactly."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import ROOT, load_config, xla_flags
from llada_jax import model, train
from llada_jax.rl import loop as rl_loop
from llada_jax.train import checkpoint

REWARD = ("def digit_fraction(completion, meta):\n"
          "    return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)\n")


def _launch(tmp_path, workdir):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1),
               PYTHONPATH=os.pathsep.join([str(tmp_path / "user"), ROOT, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "launch/rl.py", "--config=configs/rl.py", f"--workdir={workdir}",
           f"--init_from={tmp_path / 'base'}", f"--config.data.data_dir={tmp_path / 'data'}",
           "--config.rl.reward=user_reward:digit_fraction", "--config.total_steps=4", "--config.checkpoint_every=2",
           "--config.data.num_train=64", "--config.data.num_test=16", "--config.rl.prompts_per_step=2",
           "--config.rl.group_size=4", "--config.rl.num_timesteps=2", "--config.rl.inner_updates=2",
           "--config.rl.beta=0.01", "--config.rl.eval_every=0", "--config.optim.lr=1e-2",
           "--config.lora.rank=4", "--config.lora.alpha=8", "--config.lora.targets=q_proj,v_proj,wi_gate,wo"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rows(workdir):
    return [{k: v for k, v in r.items() if not k.startswith(rl_loop.TIME_PREFIX)} for r in train.read_metrics(str(workdir))]


@pytest.mark.heavy
def test_rl_with_lora_takes_steps_and_resumes_exactly_after_sigkill(tmp_path):
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "user_reward.py").write_text(REWARD)
    data = {"data.data_dir": str(tmp_path / "data"), "data.num_train": 64, "data.num_test": 16}
    train.open_examples(load_config("rl.py", **data), str(tmp_path / "data"), "train")  # once, before the runs
    config = train.build_model_config(load_config("rl.py"))
    base = jax.device_get(jax.jit(model.init_params, static_argnums=0)(config, jax.random.key(11)))
    checkpoint.save_params(str(tmp_path / "base"), config, base)

    ref, victim = _launch(tmp_path, tmp_path / "ref"), _launch(tmp_path, tmp_path / "killed")
    first = tmp_path / "killed" / "checkpoints" / "2"
    deadline = time.time() + 600
    while not first.is_dir() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first.is_dir(), victim.communicate()[0]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    out, _ = ref.communicate(timeout=900)
    assert ref.returncode == 0, out
    resumed = _launch(tmp_path, tmp_path / "killed")
    out2, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out2

    rows = _rows(tmp_path / "ref")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["updated"] == 1 and np.isfinite(r["loss"]) and "kl" in r for r in rows), rows
    assert _rows(tmp_path / "killed") == rows
    _, got = checkpoint.load_params(str(tmp_path / "killed" / "checkpoints"))
    _, want = checkpoint.load_params(str(tmp_path / "ref" / "checkpoints"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(want))
    # the adapted weights moved, every other leaf is the base's bit for bit
    targets = {"q_proj", "v_proj", "wi_gate", "wo"}
    for (path, g), b in zip(jax.tree_util.tree_flatten_with_path(jax.device_get(got))[0], jax.tree_util.tree_leaves(base)):
        if str(path[-1].key) in targets:
            assert np.any(g != b), path
        else:
            np.testing.assert_array_equal(g, b)
