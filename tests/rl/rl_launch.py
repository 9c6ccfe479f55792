"""`launch/rl.py` as a user runs it, in subprocesses: a run SIGKILLed after a checkpoint and
resumed against an uninterrupted one (tests/rl/test_rl_lora.py, test_rl_pipeline.py)."""

import os
import signal
import subprocess
import sys
import time

import jax

from helpers import ROOT, load_config, xla_flags
from llada_jax import model, train
from llada_jax.rl import loop as rl_loop
from llada_jax.train import checkpoint

REWARD = ("def digit_fraction(completion, meta):\n"
          "    return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)\n")

# configs/rl.py at a few steps of 2 prompts x 4 rollouts, μ = 2, N = 2, a KL term, a checkpoint
# every 2 steps, and the verifier a user's module:function (scored in the pool's threads).
COMMON = ("--config.rl.reward=user_reward:digit_fraction", "--config.total_steps=4",
          "--config.checkpoint_every=2", "--config.data.num_train=64", "--config.data.num_test=16",
          "--config.rl.prompts_per_step=2", "--config.rl.group_size=4", "--config.rl.num_timesteps=2",
          "--config.rl.inner_updates=2", "--config.rl.beta=0.01", "--config.rl.eval_every=0",
          "--config.optim.lr=1e-2")


def prepare(tmp_path, seed: int = 11):
    """The user's verifier module, the task data and a random base checkpoint under `tmp_path`;
    returns the base params."""
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "user_reward.py").write_text(REWARD)
    data = {"data.data_dir": str(tmp_path / "data"), "data.num_train": 64, "data.num_test": 16}
    train.open_examples(load_config("rl.py", **data), str(tmp_path / "data"), "train")  # once, before the runs
    config = train.build_model_config(load_config("rl.py"))
    base = jax.device_get(jax.jit(model.init_params, static_argnums=0)(config, jax.random.key(seed)))
    checkpoint.save_params(str(tmp_path / "base"), config, base)
    return base


def launch(tmp_path, workdir, flags) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1),
               PYTHONPATH=os.pathsep.join([str(tmp_path / "user"), ROOT, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "launch/rl.py", "--config=configs/rl.py", f"--workdir={workdir}", f"--init_from={tmp_path / 'base'}",
           f"--config.data.data_dir={tmp_path / 'data'}", *COMMON, *flags]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def rows(workdir):
    """metrics.jsonl without the timings."""
    return [{k: v for k, v in r.items() if not k.startswith(rl_loop.TIME_PREFIX)}
            for r in train.read_metrics(str(workdir))]


def killed_and_uninterrupted(tmp_path, flags, kill_after: int = 2):
    """Runs `<tmp_path>/ref` uninterrupted beside `<tmp_path>/killed`, SIGKILLs the latter once its
    checkpoint `kill_after` is written, then reruns the same command there to the end."""
    ref, victim = launch(tmp_path, tmp_path / "ref", flags), launch(tmp_path, tmp_path / "killed", flags)
    first = tmp_path / "killed" / "checkpoints" / str(kill_after)
    deadline = time.time() + 600
    while not first.is_dir() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first.is_dir(), victim.communicate()[0]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    out, _ = ref.communicate(timeout=900)
    assert ref.returncode == 0, out
    resumed = launch(tmp_path, tmp_path / "killed", flags)
    out2, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out2
