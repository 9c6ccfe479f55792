"""The RL loop's mini-batched updates, one-step off-policy pipelining and preemption (rl_loop.run_rl):
θ_old's terms in every update are those of the params that drew the rollouts, and a run stopped by
SIGTERM saves at that step and resumes to the uninterrupted run's metrics, pipelining on; one
SIGKILLed after a checkpoint (launch/rl.py) resumes exactly too."""

import json
import os
import signal
import threading

import jax
import numpy as np
import pytest

from helpers import assert_close_to_scale
from llada_jax import rl, train
from llada_jax.model.config import ConfigError
from llada_jax.rl import loop as rl_loop
from llada_jax.train import checkpoint
from rl_launch import killed_and_uninterrupted, prepare, rows
from test_rl_loop import data_dir, digit_fraction, rl_config, run, without_time  # noqa: F401 (a fixture)

# 4 prompts x 4 rollouts = 16 per step in 2 mini-batches of 8 (one row per fake device), each
# accumulated over 2 micro-batches; μ = 2: 4 updates per step.
PIPELINED = {"rl.prompts_per_step": 4, "rl.mini_batches": 2, "optim.accum_steps": 2, "rl.pipeline": True,
             "total_steps": 3}


@pytest.fixture(scope="module")
def pipelined_run(data_dir, tmp_path_factory):
    """3 pipelined steps with the params of every rollout and the mini-batches (θ_old's terms as
    the updates used them) of every step's updates recorded."""
    workdir = tmp_path_factory.mktemp("pipelined")
    cfg = rl_config(data_dir, **PIPELINED)
    decoded, updates = [], []
    rollout, run_updates = rl_loop.rollout, rl.run_updates

    def recording_rollout(params, *args, **kw):
        decoded.append(jax.tree.map(np.array, params))  # a host copy: the state's buffers are donated
        return rollout(params, *args, **kw)

    def recording_updates(step, state, batches, key, mu, on_policy_first=True):
        out = run_updates(step, state, batches, key, mu, on_policy_first)
        updates.append((on_policy_first, [{k: np.asarray(v) for k, v in b.items()} for b in batches]))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rl_loop, "rollout", recording_rollout)
        mp.setattr(rl, "run_updates", recording_updates)
        state = run(cfg, workdir, reward_fn=digit_fraction)
    return cfg, workdir, state, decoded, updates


def test_pipelined_updates_are_clipped_against_the_params_that_drew_the_rollouts(pipelined_run):
    cfg, workdir, state, decoded, updates = pipelined_run
    rows = train.read_metrics(str(workdir))
    assert [r["rollout_staleness"] for r in rows] == [0, 1, 1]  # the first step after a start is on-policy
    assert int(state.step) == cfg.total_steps * rl_loop.inner_updates(cfg) * 2  # μ x mini-batches per step
    leaves = jax.tree_util.tree_leaves
    # Step 1's rollouts are decoded before update 0 (from θ_0, as step 0's), step 2's before update 1.
    assert len(decoded) == 3
    assert all(np.array_equal(a, b) for a, b in zip(leaves(decoded[0]), leaves(decoded[1])))
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(decoded[1]), leaves(decoded[2])))
    terms = jax.jit(rl.policy_terms, static_argnames=("model_config", "config"))
    model_config = train.build_model_config(cfg)
    config = rl_loop.build_rl_config(cfg)
    noise_key = jax.random.fold_in(jax.random.key(cfg.seed), 2)  # rl_loop's _NOISE_STREAM
    assert [u[0] for u in updates] == [True, False, False]
    for s, (_, batches) in enumerate(updates):
        key = jax.random.fold_in(noise_key, s)
        assert len(batches) == 2
        for j, b in enumerate(batches):
            mb = {k: b[k] for k in ("tokens", "completion_mask", "example_ids")}
            want = terms(decoded[s], mb, key, model_config=model_config, config=config)
            assert_close_to_scale(b["old_terms"], want, 1e-5, err_msg=f"step {s} mini-batch {j}'s θ_old")
            if s == 1:  # not the params the update started from (θ_1, which drew step 2's rollouts)
                later = terms(decoded[2], mb, key, model_config=model_config, config=config)
                assert np.abs(np.asarray(later) - b["old_terms"]).max() > 1e-3


def test_sigterm_saves_the_step_and_the_resumed_pipelined_run_is_exact(pipelined_run, data_dir, tmp_path):
    """SIGTERM while step 2's rollouts are scored (pipelining: during step 1's update): the run
    saves step 1 with step 2's pending rollouts, returns normally (the launcher exits 0), and the
    rerun logs every metric of every step as the uninterrupted run did."""
    _, ref_dir, _, _, _ = pipelined_run
    cfg = rl_config(data_dir, **PIPELINED)
    calls, lock = [0], threading.Lock()

    def signalling_reward(completion, meta):
        with lock:
            calls[0] += 1
            if calls[0] == 17:  # the first completion of the second scored step
                os.kill(os.getpid(), signal.SIGTERM)
        return digit_fraction(completion, meta)

    previous = signal.getsignal(signal.SIGTERM)
    run(cfg, tmp_path, reward_fn=signalling_reward)
    assert signal.getsignal(signal.SIGTERM) == previous  # the guard's handler is gone
    assert [r["step"] for r in train.read_metrics(str(tmp_path))] == [1]
    assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 1
    run(cfg, tmp_path, reward_fn=digit_fraction)
    assert without_time(train.read_metrics(str(tmp_path))) == without_time(train.read_metrics(str(ref_dir)))


def test_update_settings_the_step_cannot_honour_are_errors(data_dir):
    def check(**overrides):
        return rl_loop.check_update_config(rl_config(data_dir, **overrides))

    assert check(**{"rl.mini_batches": 2, "optim.accum_steps": 2}) == 4  # 2 prompts x 4 rollouts / 2
    with pytest.raises(ConfigError, match=r"rl.mini_batches: expected a divisor >= 1 of .* 8 rollouts, found 3"):
        check(**{"rl.mini_batches": 3})
    with pytest.raises(ConfigError, match=r"optim.accum_steps: expected a divisor >= 1 of the 4 rollouts of an "
                                          r"update .*, found 3"):
        check(**{"rl.mini_batches": 2, "optim.accum_steps": 3})
    with pytest.raises(ConfigError, match=r"optim.expert_bias_rate: expected 0 for RL .*found 0.01"):
        check(**{"optim.expert_bias_rate": 0.01})


def test_the_quickstart_rl_stage_drops_the_sft_expert_bias_balancing():
    """An SFT stage that balances experts (trained from scratch, as measured for the quickstart);
    its RL stage runs the RL step, which does not update the bias, so the stage config carries the
    section's rate (0)."""
    from helpers import load_config

    cfg = load_config("quickstart.py", **{"optim.expert_bias_rate": 1e-3})
    assert cfg.optim.expert_bias_rate > 0
    stage = rl_loop.stage_config(cfg)
    assert stage.optim.expert_bias_rate == 0.0 and stage.total_steps == cfg.rl_stage.steps
    assert rl_loop.check_update_config(stage) == cfg.rl.prompts_per_step * cfg.rl.group_size


@pytest.mark.heavy
def test_sigkill_then_resume_is_exact_with_pipelining_and_the_reward_pool(tmp_path):
    """launch/rl.py pipelined (one step off-policy), in 2 mini-batches of 2 micro-batches, the
    user's verifier scored in the pool's threads: SIGKILLed once its step-2 checkpoint is written
    (which carries step 3's decoded, scored rollouts and θ_old's terms), the rerun logs every
    metric of the uninterrupted run and ends on its params bit for bit."""
    flags = ("--config.rl.pipeline=True", "--config.rl.mini_batches=2", "--config.optim.accum_steps=2",
             "--config.rl.reward_workers=2")
    prepare(tmp_path)
    killed_and_uninterrupted(tmp_path, flags)

    saved = json.loads((tmp_path / "killed" / "checkpoints" / "2" / "data" / "process_0-of-1.json").read_text())
    assert saved["pending"]["s"] == 2, sorted(saved)  # step 3's rollouts (0-based 2) came from the checkpoint
    want = rows(tmp_path / "ref")
    assert [r["step"] for r in want] == [1, 2, 3, 4] and [r["rollout_staleness"] for r in want] == [0, 1, 1, 1]
    assert all(r["updated"] == 1 and np.isfinite(r["loss"]) for r in want), want
    assert rows(tmp_path / "killed") == want
    _, got = checkpoint.load_params(str(tmp_path / "killed" / "checkpoints"))
    _, ref = checkpoint.load_params(str(tmp_path / "ref" / "checkpoints"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(ref))
