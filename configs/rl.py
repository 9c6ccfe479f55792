r"""RL of an SFT checkpoint on an offline task with EBPO, ESPO or DiPO (REFERENCE §6).

  python launch/train.py --config=configs/quickstart.py --workdir=/tmp/sft
  python launch/rl.py --config=configs/rl.py --workdir=/tmp/rl --init_from=/tmp/sft/checkpoints
  python launch/rl.py --config=configs/rl.py:algorithm=dipo ... --config.rl.group_size=16

The model, task and block size match configs/quickstart.py (the checkpoint must fit the model).
`rl` fields left None take the algorithm's defaults (rl.EBPOConfig / ESPOConfig / DiPOConfig).
`total_steps` and `checkpoint_every` count RL steps (one rollout batch and μ updates each).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import base_config, parse_arg, rl_config  # noqa: E402


def get_config(arg=None):
    a = parse_arg(arg, algorithm="ebpo", task="addition")
    c = base_config()
    c.total_steps = 20
    c.checkpoint_every = 5
    c.model.preset = "tiny"
    c.model.overrides.moe_impl = "dense"  # faster on XLA:CPU (configs/quickstart.py)
    c.data.task = a.task
    if a.task == "addition":
        c.data.task_config.max_digits = 2
    c.data.num_train = 20000
    c.data.num_test = 500
    c.data.seq_len = 48  # rollout batches are packed to this length: prompt + gen_length must fit
    c.objective.block_size = 16  # the decoder's block length and the likelihood's block size

    c.optim.lr = 1e-4  # constant (rl_loop.make_rl_optimizer)
    c.optim.weight_decay = 0.0

    c.rl = rl_config(a.algorithm)
    return c
