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

from ml_collections import config_dict

sys.path.insert(0, os.path.dirname(__file__))
from common import base_config, parse_arg  # noqa: E402


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

    c.rl = config_dict.ConfigDict()
    c.rl.algorithm = a.algorithm  # "ebpo" | "espo" | "dipo"
    c.rl.prompts_per_step = 8  # P
    c.rl.group_size = 8  # G completions per prompt
    c.rl.inner_updates = 2  # μ updates per rollout batch, same batch and noise key
    c.rl.preset = "S"  # decoding preset of the rollouts (decoding.PRESETS)
    c.rl.temperature = 1.0  # rollout sampling temperature (0 = greedy)
    c.rl.gen_length = 16
    c.rl.reward = "by_task"  # a name in rewards.REWARDS
    c.rl.skip_no_signal = True  # no update when all advantages are zero (rl_loop docstring, step 5)
    # Loss settings; None keeps the algorithm's default.
    c.rl.num_timesteps = config_dict.placeholder(int)  # likelihood N (EBPO 8, ESPO 2 coupled)
    c.rl.vectorize = config_dict.placeholder(str)  # "batch" | "scan"
    c.rl.eps_low = config_dict.placeholder(float)
    c.rl.eps_high = config_dict.placeholder(float)
    c.rl.beta = config_dict.placeholder(float)  # KL weight to the initial params (0 = no reference)
    c.rl.kl_estimator = config_dict.placeholder(str)  # EBPO: "k1" | "k2" | "k3"
    c.rl.grad_mode = config_dict.placeholder(str)  # EBPO / ESPO: "direct" | "replay"
    c.rl.dipo_step_bucket = 8  # DiPO num_steps rounded up to a multiple of this (fewer compiles)
    # Held-out evaluation (greedy) every eval_every steps and before the first; 0 = off.
    c.rl.eval_every = 10
    c.rl.eval_examples = 256
    c.rl.eval_modes = ("S", "Q")
    return c
