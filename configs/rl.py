r"""RL of an SFT checkpoint on an offline task with EBPO, ESPO or DiPO (REFERENCE §6).

  python launch/train.py --config=configs/quickstart.py --workdir=/tmp/sft
  python launch/rl.py --config=configs/rl.py --workdir=/tmp/rl --init_from=/tmp/sft/checkpoints
  python launch/rl.py --config=configs/rl.py:algorithm=dipo ... --config.rl.group_size=16

Everything but the RL budget is configs/quickstart.py's (same arguments: task, noise), so the
checkpoint fits the model and the prompts are rendered as in training. `rl` fields left None
take the algorithm's defaults (rl.EBPOConfig / ESPOConfig / DiPOConfig). `total_steps` and
`checkpoint_every` count RL steps (one rollout batch and μ updates each); `optim.lr` is constant.
"""

import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import parse_arg  # noqa: E402

from llada_jax.rl import loop as rl_loop  # noqa: E402


def _quickstart_config(arg: str):
    # By path: `import quickstart` could find launch/quickstart.py when launched from launch/.
    spec = importlib.util.spec_from_file_location("_quickstart_config", os.path.join(os.path.dirname(__file__),
                                                                                      "quickstart.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg=None):
    a = parse_arg(arg, algorithm="ebpo", task="addition", noise=0.6)
    c = rl_loop.stage_config(_quickstart_config(f"task={a.task},noise={a.noise}"))
    c.rl.algorithm = a.algorithm
    return c
