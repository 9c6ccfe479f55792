"""The RL loop end to end on the tiny model (rl_loop.run_rl): metrics, exact resume, the algorithm
switch, a raising reward, and rollouts on the current params."""

import json
import math
import subprocess
import sys
import threading
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config, xla_flags
from llada_jax import rewards, train
from llada_jax.decode import rollouts
from llada_jax.model.config import ConfigError
from llada_jax.rl import loop as rl_loop
from llada_jax.train import checkpoint

# The fields every metrics row of an RL step carries (kl: beta > 0; eval_*: evaluation steps).
STEP_FIELDS = ("reward_mean", "reward_std", "accuracy", "reward_errors", "clip_frac", "kl", "ratio_mean",
               "ratio_min", "ratio_max", "loss", "grad_norm", "rollout_tpf", "time_rollout_s",
               "time_likelihood_s", "time_update_s", "time_step_s", "updated")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("rl_data"))


def rl_config(data_dir, **overrides):
    small = {"data.data_dir": data_dir, "data.num_train": 64, "data.num_test": 16, "total_steps": 4,
             "checkpoint_every": 2, "optim.lr": 1e-3,  # large, so that one update visibly moves a random init
             "rl.prompts_per_step": 2, "rl.group_size": 4, "rl.inner_updates": 2, "rl.num_timesteps": 2,
             "rl.beta": 0.01, "rl.eval_every": 0}
    return load_config("rl.py", **{**small, **overrides})


def run(cfg, workdir, **kw):
    model_config = train.build_model_config(cfg)
    tokenizer = train.load_tokenizer(cfg, str(workdir))
    return rl_loop.run_rl(cfg, str(workdir), model_config, tokenizer, progress=False, **kw)


def without_time(rows):
    return [{k: v for k, v in r.items() if not k.startswith(rl_loop.TIME_PREFIX)} for r in rows]


def digit_fraction(completion, meta):
    """A toy reward a random init already varies on (the task's reward would be 0 for every sample,
    so advantages and updates would be zero): the fraction of digits in the completion."""
    del meta
    return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)


@pytest.fixture(scope="module")
def ebpo_run(data_dir, tmp_path_factory):
    """4 EBPO steps from a random init, evaluated at steps 0, 2 and 4, with the params that each
    rollout (the sampled `decode.rollouts.generate_groups` calls; evaluation is greedy) decoded with recorded."""
    workdir = tmp_path_factory.mktemp("ebpo")
    cfg = rl_config(data_dir, **{"rl.eval_every": 2, "rl.eval_examples": 8, "rl.eval_modes": ("S",)})
    seen = []  # host copies: the state's buffers are donated to the next update
    generate_groups = rollouts.generate_groups

    def recording_generate_groups(params, *args, **kw):
        if kw.get("temperature", 0.0) > 0:
            seen.append(jax.tree.map(np.array, params))
        return generate_groups(params, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rollouts, "generate_groups", recording_generate_groups)
        state = run(cfg, workdir, reward_fn=digit_fraction)
    return cfg, workdir, state, seen


def test_ebpo_end_to_end_metrics(ebpo_run):
    cfg, workdir, state, _ = ebpo_run
    rows = train.read_metrics(str(workdir))
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert set(rows[0]) >= {"eval_S_accuracy", "eval_S_tpf"}
    for r in rows[1:]:
        assert set(STEP_FIELDS) <= set(r), sorted(set(STEP_FIELDS) - set(r))
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, (int, float))), r
        assert r["reward_errors"] == 0 and r["rollout_tpf"] > 0 and r["updated"] == 1
        assert 0 <= r["accuracy"] <= 1 and r["ratio_min"] <= r["ratio_mean"] <= r["ratio_max"]
    assert "eval_S_accuracy" in rows[2] and "eval_S_accuracy" in rows[4] and "eval_S_accuracy" not in rows[1]
    assert int(state.step) == cfg.total_steps * rl_loop.inner_updates(cfg)
    assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [2, 4]


def test_rollouts_use_current_params(ebpo_run):
    """Rollout s decodes with exactly the state that the updates of step s-1 produced."""
    cfg, workdir, _, seen = ebpo_run
    assert len(seen) == cfg.total_steps
    leaves = jax.tree_util.tree_leaves
    _, saved = checkpoint.load_params(os.path.join(workdir, "checkpoints"), step=2)
    for a, b in zip(leaves(seen[2]), leaves(saved)):
        np.testing.assert_array_equal(a, np.asarray(b))
    for s in (1, 2, 3):  # every step's updates reach the next rollout
        assert any(not np.array_equal(a, b) for a, b in zip(leaves(seen[s - 1]), leaves(seen[s]))), s


def test_exact_resume(ebpo_run, data_dir, tmp_path):
    _, workdir, _, _ = ebpo_run
    cfg = rl_config(data_dir, **{"rl.eval_every": 2, "rl.eval_examples": 8, "rl.eval_modes": ("S",)})
    cfg.total_steps = 2
    run(cfg, tmp_path, reward_fn=digit_fraction)
    cfg.total_steps = 4
    run(cfg, tmp_path, reward_fn=digit_fraction)
    assert without_time(train.read_metrics(str(tmp_path))) == without_time(train.read_metrics(str(workdir)))


@pytest.mark.parametrize("algorithm", ["espo", "dipo"])
def test_algorithm_switch(algorithm, data_dir, tmp_path):
    cfg = rl_config(data_dir, **{"rl.algorithm": algorithm, "rl.num_timesteps": None})
    cfg.total_steps = 2
    run(cfg, tmp_path, reward_fn=digit_fraction)
    rows = train.read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, (int, float))), r
        assert {"clip_frac", "ratio_mean", "kl"} <= set(r)
    if algorithm == "dipo":
        assert all(r["dipo_num_steps"] % cfg.rl.dipo_step_bucket == 0 for r in rows)
        assert all(r["scored_tokens"] > 0 or r["samples_kept"] == 0 for r in rows)


def test_inner_updates_default_per_algorithm():
    """ESPO's paper runs mu = 8 updates per rollout batch; EBPO and DiPO keep 2; a value overrides."""
    assert [rl_loop.inner_updates(load_config("rl.py", **{"rl.algorithm": a})) for a in ("ebpo", "espo", "dipo")] \
        == [2, 8, 2]
    assert rl_loop.inner_updates(load_config("rl.py", **{"rl.algorithm": "espo", "rl.inner_updates": 3})) == 3


def test_raising_reward_is_counted(data_dir, tmp_path):
    calls = []

    def flaky(completion, meta):
        calls.append(completion)
        if len(calls) % 3 == 0:
            raise RuntimeError("verifier bug")
        return float(len(calls) % 2)

    cfg = rl_config(data_dir)
    cfg.total_steps = 2
    run(cfg, tmp_path, reward_fn=flaky)
    rows = train.read_metrics(str(tmp_path))
    n = cfg.rl.prompts_per_step * cfg.rl.group_size
    assert len(calls) == 2 * n
    assert [r["reward_errors"] for r in rows] == [sum(1 for i in range(s * n, (s + 1) * n) if (i + 1) % 3 == 0)
                                                  for s in range(2)]
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_no_signal_skips_update(data_dir, tmp_path):
    """Equal rewards in every group: all advantages are zero, so the step neither computes the
    likelihood nor moves the params (Adam would otherwise drift along stale momentum)."""
    cfg = rl_config(data_dir)
    cfg.total_steps = 2
    state = run(cfg, tmp_path, reward_fn=lambda completion, meta: 1.0)
    rows = train.read_metrics(str(tmp_path))
    assert [(r["updated"], r["reward_mean"], "loss" in r) for r in rows] == [(0, 1.0, False)] * 2
    assert int(state.step) == 0


def test_hanging_reward_costs_its_sample_not_the_step(data_dir, tmp_path):
    """Scoring runs in the pool: the one sample whose verifier hangs is cut off at
    rl.reward_timeout_s (reward 0, counted), the others are scored and the step completes."""
    release, calls = threading.Event(), []

    def sometimes_hangs(completion, meta):
        calls.append(completion)
        if len(calls) == 3:
            release.wait(120)
        return digit_fraction(completion, meta)

    cfg = rl_config(data_dir, **{"total_steps": 1, "rl.reward_timeout_s": 1.0, "rl.reward_workers": 2})
    try:
        run(cfg, tmp_path, reward_fn=sometimes_hangs)
    finally:
        release.set()
    (row,) = train.read_metrics(str(tmp_path))
    assert row["reward_timeouts"] == 1 and row["reward_errors"] == 1
    assert len(calls) == cfg.rl.prompts_per_step * cfg.rl.group_size and math.isfinite(row["reward_mean"])


def test_launcher_uses_a_module_function_reward(tmp_path):
    """`--config.rl.reward=package.module:function` loads a user's verifier from PYTHONPATH."""
    pkg = tmp_path / "user_pkg" / "my_rewards"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "verify.py").write_text(
        "import os\n\ndef quarter(completion, meta):\n"
        "    open(os.environ['REWARD_LOG'], 'a').write('x')\n    return 0.25\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1),
               REWARD_LOG=str(tmp_path / "calls"),
               PYTHONPATH=os.pathsep.join([str(tmp_path / "user_pkg"), root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "launch/rl.py", "--config=configs/rl.py", f"--workdir={tmp_path}/rl",
         "--config.rl.reward=my_rewards.verify:quarter", "--config.total_steps=2", "--config.checkpoint_every=2",
         "--config.data.num_train=64", "--config.data.num_test=16", "--config.rl.prompts_per_step=2",
         "--config.rl.group_size=4", "--config.rl.num_timesteps=2", "--config.rl.eval_every=0"],
        cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = train.read_metrics(str(tmp_path / "rl"))
    assert [(r["step"], r["reward_mean"]) for r in rows] == [(1, 0.25), (2, 0.25)]
    assert (tmp_path / "calls").read_text() == "x" * 16


def test_eval_uses_the_validation_split_by_default(data_dir, tmp_path, monkeypatch):
    """Settings are chosen on validation: the loop's held-out eval reads rl.eval_split."""
    opened = []
    open_examples = train.open_examples

    def recording(cfg, workdir, split):
        opened.append(split)
        return open_examples(cfg, workdir, split)

    monkeypatch.setattr(train, "open_examples", recording)
    cfg = rl_config(data_dir, **{"total_steps": 1, "rl.eval_every": 1, "rl.eval_examples": 4,
                                 "rl.eval_modes": ("S",)})
    assert cfg.rl.eval_split == "validation"
    run(cfg, tmp_path, reward_fn=digit_fraction)
    assert "validation" in opened and "test" not in opened
    assert "eval_S_accuracy" in train.read_metrics(str(tmp_path))[-1]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_a_gsm8k_file_drives_rl_and_its_overlong_prompts_are_dropped(data_dir, tmp_path):
    """`rl.prompts_file` in GSM8K's public format: the rollouts' prompts and the verifier's metas
    come from it, and the prompts with no room for rl.gen_length tokens are dropped at start-up
    and counted in every metrics row."""
    short = [{"question": f"What is {a}+{b}?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
             for a, b in ((12, 30), (7, 8), (40, 2), (3, 9))]
    long = [{"question": "What is " + "1+" * 40 + "1?", "answer": "#### 41"}] * 2
    path = _write_jsonl(tmp_path / "gsm8k.jsonl", [long[0], *short[:2], long[1], *short[2:]])
    seen = []

    def reward(completion, meta):
        seen.append(dict(meta))
        return digit_fraction(completion, meta)

    cfg = rl_config(data_dir, **{"rl.prompts_file": path, "data.seq_len": 100, "total_steps": 2})
    run(cfg, tmp_path / "run", reward_fn=reward)
    rows = train.read_metrics(str(tmp_path / "run"))
    assert [(r["step"], r["prompts_dropped"]) for r in rows] == [(1, 2), (2, 2)]
    assert any(r["updated"] for r in rows)
    assert len(seen) == 2 * cfg.rl.prompts_per_step * cfg.rl.group_size
    assert {m["task"] for m in seen} == {"gsm8k"} and {m["answer"] for m in seen} <= {s["answer"] for s in short}
    # The metas are the gsm8k verifier's: a right final answer scores 1.
    assert rewards.by_task("so \\boxed{42}", {"task": "gsm8k", "answer": short[0]["answer"]}) == 1.0


def test_prompt_rows_from_chat_jsonl_and_when_nothing_fits(data_dir, tmp_path):
    """Chat JSONL without assistant turns: the turns are the prompt, the other keys the meta; a
    file whose every prompt is too long is refused naming data.seq_len."""
    path = _write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "1+2"}], "answer": "3", "task": "gsm8k"},
        {"messages": [{"role": "user", "content": "4+4"}], "answer": "8", "task": "gsm8k"}])
    cfg = rl_config(data_dir, **{"rl.prompts_file": path})
    tokenizer = train.load_tokenizer(cfg, str(tmp_path))
    rows, dropped = rl_loop.prompt_rows(cfg, str(tmp_path), tokenizer)
    assert dropped == 0 and [r["meta"] for r in rows] == [{"answer": "3", "task": "gsm8k"}, {"answer": "8", "task": "gsm8k"}]
    assert [tokenizer.decode(r["prompt"]) for r in rows] == ["1+2", "4+4"]
    cfg.data.seq_len, cfg.rl.gen_length = 20, 18
    with pytest.raises(ConfigError, match=r"data.seq_len: .* every one of the 2 prompts longer than 2 tokens"):
        rl_loop.prompt_rows(cfg, str(tmp_path), tokenizer)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("overrides,want", [
    ({}, None),  # fp32 compute of fp32 params: the params as they are
    ({"rl.rollout_dtype": "bfloat16"}, "bfloat16"),
    ({"model.overrides.dtype": "bfloat16"}, "bfloat16"),  # mixed precision: the model's compute dtype
])
def test_rollouts_decode_a_copy_of_theta_in_their_compute_dtype(data_dir, tmp_path, monkeypatch, overrides, want):
    """Where the rollouts compute in another dtype than the params are held in, `run_rl` hands
    them a copy cast once per step (`model.compute_params`: router fp32, the rest bf16); else the
    state's params themselves."""
    seen = []

    def rollout(params, model_config, prompts, cfg, key, mesh=None, on_finish=None):
        seen.append({jax.tree_util.keystr(k): v.dtype for k, v in jax.tree_util.tree_leaves_with_path(params)})
        raise _Stop

    monkeypatch.setattr(rl_loop, "rollout", rollout)
    with pytest.raises(_Stop):
        run(rl_config(data_dir, **overrides), tmp_path / "run", reward_fn=digit_fraction)
    (dtypes,) = seen
    fp32 = {k for k, d in dtypes.items() if d == jnp.float32}
    if want is None:
        assert fp32 == set(dtypes)
    else:
        assert fp32 and all(k.endswith(("['router']", "['expert_bias']")) for k in fp32)
        assert {d for k, d in dtypes.items() if k not in fp32} == {jnp.dtype(want)}


def test_rollouts_decode_in_rl_rollout_dtype(data_dir, monkeypatch):
    """`rl.rollout_dtype` sets the rollouts' compute dtype (None keeps the model's); a bad one is
    refused when the RL config is built, before any step."""
    seen = []
    monkeypatch.setattr(rollouts, "generate_groups", lambda params, config, rows, **kw: seen.append(config.dtype))
    cfg = rl_config(data_dir)
    model_config = train.build_model_config(cfg)
    rl_loop.rollout(None, model_config, [[1, 2]], cfg, jax.random.key(0))
    cfg = rl_config(data_dir, **{"rl.rollout_dtype": "bfloat16"})
    rl_loop.rollout(None, model_config, [[1, 2]], cfg, jax.random.key(0))
    assert seen == [model_config.dtype, "bfloat16"]
    with pytest.raises(ConfigError, match="rl.rollout_dtype: expected None or one of"):
        rl_loop.build_rl_config(rl_config(data_dir, **{"rl.rollout_dtype": "bf16"}))
    with pytest.raises(ConfigError, match=r"rl.rollout_engine: expected one of \('groups', 'generate'\), found 'engine'"):
        rl_loop.build_rl_config(rl_config(data_dir, **{"rl.rollout_engine": "engine"}))
