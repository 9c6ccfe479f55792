r"""RL of an SFT checkpoint on an offline task with EBPO, ESPO or DiPO (REFERENCE §6).

  python launch/train.py --config=configs/quickstart.py --workdir=/tmp/sft
  python launch/rl.py --config=configs/rl.py --workdir=/tmp/rl --init_from=/tmp/sft/checkpoints
  python launch/rl.py --config=configs/rl.py:algorithm=dipo ... --config.rl.group_size=16

Everything but the RL budget is configs/quickstart.py's (same arguments: task, noise), so the
checkpoint fits the model and the prompts are rendered as in training. `rl` fields left None
take the algorithm's defaults (rl.EBPOConfig / ESPOConfig / DiPOConfig). `total_steps` and
`checkpoint_every` count RL steps (one rollout batch and μ updates each); `optim.lr` is constant.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import parse_arg, quickstart_config  # noqa: E402

from llada_jax.rl import loop as rl_loop  # noqa: E402


def get_config(arg=None):
    a = parse_arg(arg, algorithm="ebpo", task="addition", noise=0.6)
    c = rl_loop.stage_config(quickstart_config(f"task={a.task},noise={a.noise}"))
    c.rl.algorithm = a.algorithm
    return c
