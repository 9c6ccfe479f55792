r"""4x4 Sudoku with one grid row per block: a task where later blocks inform earlier ones.

  python launch/train.py --config=configs/mbe.py --workdir=/tmp/mbe_sft                 # plain SFT
  python launch/train.py --config=configs/mbe.py:mbe_steps=150 --workdir=/tmp/mbe_sft_k # + MBE SFT
  python bench/mbe.py --study --config=configs/mbe.py --workdir=/tmp/mbe_study --seeds=0,1,2

The compact Sudoku of configs/quickstart.py:task=sudoku4x4 (prompt: the puzzle's 16 cells, 0 =
blank; answer: the solution's 16 digits, row-major; 32 tokens with the task tokenizer), trained
and decoded in blocks of 4 tokens, so each answer block is one row of the grid and a completion
spans 4 blocks. A row's digits are fixed by its clues and by the other rows through the columns
and the 2x2 boxes, so a block decoded later carries information about the earlier ones: what
Multi-Block Editing (README "Multi-Block Editing SFT", *Decoding*) can use and a task of
independent blocks (the quickstart's four sums) cannot.

Arguments (`configs/mbe.py:a=1,b=2`):
  rows_per_block  grid rows per block (1: blocks of 4 tokens; 4: the quickstart's one block of 16)
  steps           SFT steps at batch 64
  mbe_steps       0: plain SFT. > 0: the same run with MBE SFT's curriculum over its last
                  `mbe_steps` steps, K = 2, 3, 4 for a third of them each (*Project choice*: a
                  second stage inside the same step budget and learning-rate schedule, so that
                  the MBE-SFT model and the plain one share their first steps:
                  `objective.mbe_window_schedule` = ((steps - mbe_steps, 0), (m, 2), (m, 3), (0, 4)),
                  m = mbe_steps / 3; `mbe_study.mbe_schedule`)

The held-out split is by solution grid: 39 of the 288 grids are test grids (tasks.split_of), so a
test puzzle's solution was never a training answer; the 500 test puzzles are distinct.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import parse_arg, quickstart_config  # noqa: E402

from llada_jax.evaluation.mbe_study import mbe_schedule  # noqa: E402

GRID_ROWS = 4
ROW_TOKENS = 4  # one digit per token with the task tokenizer
PROMPT_TOKENS = 16


def get_config(arg=None):
    a = parse_arg(arg, rows_per_block=1, steps=600, mbe_steps=0)
    if a.rows_per_block not in (1, 2, 4):
        raise ValueError(f"rows_per_block: expected 1, 2 or 4 (a divisor of the grid's {GRID_ROWS} rows), "
                         f"found {a.rows_per_block}")
    # The quickstart's compact Sudoku with its model, data sizes, noise range and optimizer (the
    # tiny preset, dense MoE and the dense attention oracle on CPU), SFT only.
    c = quickstart_config("task=sudoku4x4")
    del c["rl"], c["rl_stage"]
    c.total_steps = a.steps
    # Every 50 steps, all kept: bench/mbe.py --study starts the MBE-SFT run from the plain run's
    # checkpoint at step steps - mbe_steps.
    c.checkpoint_every = 50
    c.keep_checkpoints = a.steps // 50 + 1
    if c.data.seq_len != PROMPT_TOKENS + GRID_ROWS * ROW_TOKENS:  # 32: the answer fills its 4 rows, no EOS
        raise ValueError(f"data.seq_len: expected {PROMPT_TOKENS + GRID_ROWS * ROW_TOKENS} (a 16-token puzzle and "
                         f"its 4 rows), found {c.data.seq_len} in configs/quickstart.py:task=sudoku4x4")
    c.objective.block_size = a.rows_per_block * ROW_TOKENS
    if a.mbe_steps:
        c.objective.mbe_window_schedule = mbe_schedule(a.steps, a.mbe_steps)
    return c
