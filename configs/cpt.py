r"""Continued pre-training (CPT) on the tiny preset: packed documents under the block-size schedule.

  python launch/train.py --config=configs/cpt.py --workdir=/tmp/cpt
  python launch/train.py --config=configs/cpt.py:task=countdown,steps=300 --workdir=/tmp/cpt_countdown
  python launch/train.py --config=configs/cpt.py --workdir=/runs/cpt --config.model.hf_dir=/ckpt/LLaDA2.1-mini ...

Documents (the task's conversations rendered in the chat format, each ending in EOS) are packed
back to back into rows of `data.seq_len` tokens (`data.packed`): attention stays inside each
document and its RoPE positions restart at 0. The block size follows LLaDA2's warm-up / stable /
decay schedule (REFERENCE §4, `objectives.wsd_block_schedule`): at seq_len 128 it warms up
1 -> 4 -> 32 -> 64, trains full-sequence MDLM (one block of 128), then decays 64 -> 32. Each size
is compiled once, when the schedule first reaches it; `metrics.jsonl` logs the step's
`block_size`. Set the run's length with the `steps` argument (it also sizes the schedule's
phases); `--config.total_steps` alone would leave the schedule as it was. The aux-loss-free expert-bias update is on (`optim.expert_bias_rate`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import base_config, parse_arg  # noqa: E402


def get_config(arg=None):
    a = parse_arg(arg, task="addition", steps=600)
    c = base_config()
    c.total_steps = a.steps
    c.checkpoint_every = 100
    c.log_every = 10
    c.model.preset = "tiny"
    # XLA:CPU lowers ragged_dot to a masked dense dot: the dense path is faster here (bench/forward.py).
    c.model.overrides.moe_impl = "dense"
    c.model.overrides.attention_impl = "xla"  # pinned as in the quickstart (README results made with it)
    c.model.overrides.rope_theta = 10000.0  # as the quickstart: full rotary at 1e4
    c.model.overrides.partial_rotary_factor = 1.0
    c.data.task = a.task
    c.data.packed = True
    c.data.num_train = 20000
    c.data.num_test = 500
    c.data.batch_size = 16
    c.data.seq_len = 128
    # Warm-up, stable and decay share the run's steps equally (each phase's steps split evenly
    # over its sizes, objectives.wsd_block_schedule). `objective.block_size` is the final size.
    c.block_schedule = dict(warmup_steps=a.steps // 3, stable_steps=a.steps // 3,
                            decay_steps=a.steps - 2 * (a.steps // 3), warmup_sizes=(1, 4, 32), final_size=32)
    c.objective.block_size = 32
    c.objective.t_min = 0.05  # pre-training: mask levels over (nearly) the whole range, not SFT's band
    c.objective.t_max = 0.95
    c.optim.lr = 3e-3
    c.optim.warmup_frac = 0.03
    c.optim.min_lr_ratio = 0.1
    c.optim.weight_decay = 0.01
    c.optim.expert_bias_rate = 1e-3
    return c
