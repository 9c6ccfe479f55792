"""The Multi-Block Editing study (llada_jax.evaluation.mbe_study, bench/mbe.py --study) and its task
(configs/mbe.py: 4x4 Sudoku, one grid row per block)."""

import numpy as np
import pytest

from helpers import load_config
from llada_jax import train
from llada_jax.decode import Trajectory
from llada_jax.evaluation import mbe_study


def test_sudoku_rows_config_builds_one_row_per_block(tmp_path):
    cfg = load_config("mbe.py", **{"data.num_train": 64, "data.num_test": 8, "data.num_validation": 8,
                                   "data.batch_size": 8})
    assert (cfg.objective.block_size, cfg.data.seq_len, cfg.data.task) == (4, 32, "sudoku4x4")
    assert cfg.objective.mbe_window_schedule == ()
    tok = train.load_tokenizer(cfg, str(tmp_path))
    batch = next(train.train_iterator(cfg, str(tmp_path), tok))
    examples = {e["meta"]["puzzle"]: e["meta"]["solution"] for e in train.open_examples(cfg, str(tmp_path), "train")}
    block = cfg.objective.block_size
    for tokens, loss_mask in zip(batch["tokens"], batch["loss_mask"]):
        assert not loss_mask[:16].any() and loss_mask[16:].all()  # prompt 16 tokens, answer 16
        puzzle = tok.decode(tokens[:16].tolist())
        solution = examples[puzzle]
        rows = [tok.decode(tokens[16 + b * block:16 + (b + 1) * block].tolist()) for b in range(4)]
        assert rows == [solution[4 * r:4 * r + 4] for r in range(4)]  # answer block b = grid row b

    assert load_config("mbe.py", "rows_per_block=2").objective.block_size == 8
    with pytest.raises(ValueError, match="rows_per_block: expected 1, 2 or 4.*found 3"):
        load_config("mbe.py", "rows_per_block=3")
    assert load_config("mbe.py", "steps=1200,mbe_steps=300").objective.mbe_window_schedule == (
        (900, 0), (100, 2), (100, 3), (0, 4))
    with pytest.raises(ValueError, match="mbe_steps: expected a multiple of 3 in \\(0, steps=100\\], found 200"):
        mbe_study.mbe_schedule(100, 200)


def _edits_oracle(tokens, count, prompt_lengths, lengths):
    out = []
    for r in range(tokens.shape[0]):
        n = 0
        for pos in range(prompt_lengths[r], prompt_lengths[r] + lengths[r]):
            writes = list(tokens[r, pos, :min(count[r, pos], tokens.shape[-1])])
            n += sum(a != b for a, b in zip(writes, writes[1:]))
        out.append(n)
    return np.asarray(out)


def test_edits_per_row_counts_changed_rewrites():
    # row 0, position 3: writes 5, 7, 7, 3 (two edits: 5->7, 7->3); slot garbage past the count and
    # positions outside the generated span (prompt, past the row's length) never count
    tokens = np.zeros((2, 8, 5), np.int32)
    count = np.zeros((2, 8), np.int32)
    tokens[0, 3, :] = [5, 7, 7, 3, 9]
    count[0, 3] = 4
    tokens[0, 1, :] = [1, 2, 3, 4, 5]  # a prompt position
    count[0, 1] = 5
    tokens[1, 6, :] = [4, 4, 8, 0, 0]  # past row 1's length
    count[1, 6] = 3
    tokens[1, 4, :] = [6, 2, 0, 0, 0]
    count[1, 4] = 2
    traj = Trajectory(write_step=np.zeros_like(tokens), write_token=tokens, write_count=count,
                      prompt_lengths=np.asarray([2, 2]))
    np.testing.assert_array_equal(mbe_study.edits_per_row(traj, [4, 4]), [2, 1])

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 3, (6, 20, 4)).astype(np.int32)
    count = rng.integers(0, 6, (6, 20)).astype(np.int32)  # may exceed the slots, as write_count may
    prompt_lengths, lengths = rng.integers(0, 8, 6), rng.integers(0, 12, 6)
    traj = Trajectory(np.zeros_like(tokens), tokens, count, prompt_lengths)
    np.testing.assert_array_equal(mbe_study.edits_per_row(traj, lengths),
                                  _edits_oracle(tokens, count, prompt_lengths, lengths))


def test_summarize_gives_mean_std_over_seeds_and_the_table():
    def cell(acc, tpf, edits):
        return {"accuracy": acc, "reward": acc, "tpf": tpf, "edits_per_sample": edits, "n": 10}

    by_seed = {
        "0": {"no_mbe": {"S": cell(0.2, 1.0, 0.0)}, "mbe_sft_mbe": {"S": cell(0.5, 0.8, 2.0)}},
        "1": {"no_mbe": {"S": cell(0.4, 2.0, 1.0)}, "mbe_sft_mbe": {"S": cell(0.7, 0.8, 4.0)}},
        "2": {"no_mbe": {"S": cell(0.9, 3.0, 2.0)}},  # a seed without the MBE-SFT model
    }
    summary = mbe_study.summarize(by_seed)
    assert list(summary) == ["no_mbe", "mbe_sft_mbe"]  # VARIANTS order, not insertion order
    acc = summary["no_mbe"]["S"]["accuracy"]
    assert acc["n"] == 3 and acc["mean"] == pytest.approx(0.5) and (acc["min"], acc["max"]) == (0.2, 0.9)
    assert acc["std"] == pytest.approx(np.sqrt((0.3 ** 2 + 0.1 ** 2 + 0.4 ** 2) / 2))  # ddof 1
    mbe = summary["mbe_sft_mbe"]["S"]
    assert mbe["accuracy"]["n"] == 2 and mbe["accuracy"]["mean"] == pytest.approx(0.6)
    assert mbe["tpf"]["std"] == 0.0 and mbe["edits_per_sample"]["std"] == pytest.approx(np.sqrt(2.0))
    assert "n" not in summary["no_mbe"]["S"]  # the example count is no metric
    table = mbe_study.markdown_table(summary).splitlines()
    assert table[0] == "| variant | mode | accuracy | tpf | edits_per_sample | seeds |"
    assert table[2] == "| no_mbe | S | 0.500 ± 0.361 | 2.000 ± 1.000 | 1.000 ± 1.000 | 3 |"
    assert table[3] == "| mbe_sft_mbe | S | 0.600 ± 0.141 | 0.800 ± 0.000 | 3.000 ± 1.414 | 2 |"
