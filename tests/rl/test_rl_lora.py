"""RL with LoRA (launch/rl.py with `lora.rank > 0`): adapters train on the frozen base, which is
also the KL reference, and a run SIGKILLed after a checkpoint resumes exactly."""

import jax
import numpy as np
import pytest

from llada_jax.train import checkpoint
from rl_launch import killed_and_uninterrupted, prepare, rows

LORA = ("--config.lora.rank=4", "--config.lora.alpha=8", "--config.lora.targets=q_proj,v_proj,wi_gate,wo")


@pytest.mark.heavy
def test_rl_with_lora_takes_steps_and_resumes_exactly_after_sigkill(tmp_path):
    base = prepare(tmp_path)
    killed_and_uninterrupted(tmp_path, LORA)

    want = rows(tmp_path / "ref")
    assert [r["step"] for r in want] == [1, 2, 3, 4]
    assert all(r["updated"] == 1 and np.isfinite(r["loss"]) and "kl" in r for r in want), want
    assert rows(tmp_path / "killed") == want
    _, got = checkpoint.load_params(str(tmp_path / "killed" / "checkpoints"))
    _, ref = checkpoint.load_params(str(tmp_path / "ref" / "checkpoints"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(ref))
    # the adapted weights moved, every other leaf is the base's bit for bit
    targets = {"q_proj", "v_proj", "wi_gate", "wo"}
    for (path, g), b in zip(jax.tree_util.tree_flatten_with_path(jax.device_get(got))[0], jax.tree_util.tree_leaves(base)):
        if str(path[-1].key) in targets:
            assert np.any(g != b), path
        else:
            np.testing.assert_array_equal(g, b)
