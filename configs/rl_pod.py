r"""EBPO of LLaDA2.x mini or flash at pod shapes: the SFT recipe's model, optimizer and mesh, plus
an `rl` section (REFERENCE §6). Fits a v5p-64 (32 chips) for mini with no overrides: the
likelihood terms one timestep at a time (`rl.vectorize=scan`) with the replay gradient
(`rl.grad_mode=replay`), full remat, "auto" attention (TPU: splash), and the experts routed per
device on an FSDP mesh with no expert axis (`moe_impl=expert_parallel`, P = 1, nothing
exchanged, README "Memory plans"). The step's 256 rollouts make 4 mini-batches
(`rl.mini_batches`, verl's ppo_mini_batch_size = 64): μ x 4 updates per step of 2 rollouts per
chip each, θ_old the rollout policy in all (28.1 GiB per chip with one update of all 256, no
mini-batches; `optim.accum_steps` further splits an update into micro-batches with the objective
unchanged). With the SFT mesh's expert=8 the dropless exchange's worst-case buffers for a chip's
8 rollouts x 4096 composite positions are those of SFT's one 64-sequence micro-batch at 8K (111.5 GiB).

  python launch/compile.py --config=configs/rl_pod.py:size=mini --topology=v5p-64 --job=rl
  python launch/compile.py --config=configs/rl_pod.py:size=mini --topology=v5p-64 --job=rl \
      --config.rl.vectorize=batch --config.rl.grad_mode=direct      # the batched layout (7x HBM)

Shapes: 32 prompts x 8 completions = 256 rollouts of 2048 tokens (prompt + completion), N = 8
likelihood timesteps. With launch/rl.py it also needs data: --config.data.data_dir/dataset, a
tokenizer and a reward that fits the dataset (`rl.reward`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import sft  # noqa: E402
from common import parse_arg, rl_config  # noqa: E402


def get_config(arg=None):
    a = parse_arg(arg, size="mini", algorithm="ebpo")
    c = sft.get_config(f"size={a.size}")
    c.total_steps = 200
    c.checkpoint_every = 20
    c.optim.lr = 1e-6  # constant (rl_loop.make_rl_optimizer)
    c.optim.weight_decay = 0.0
    c.data.seq_len = 2048  # prompt + completion
    c.rl = rl_config(a.algorithm)
    c.rl.prompts_per_step = 32
    c.rl.group_size = 8
    c.rl.num_timesteps = 8
    c.rl.gen_length = 1024
    c.rl.eval_every = 0
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1, expert=1))
    c.model.overrides.moe_impl = "expert_parallel"  # per device, no expert axis ("auto" would pick ragged)
    c.rl.mini_batches = 4  # 64 rollouts per update
    c.optim.accum_steps = 1
    c.rl.vectorize = "scan"  # one timestep's activations at a time
    c.rl.grad_mode = "replay"  # exact gradient, activation memory independent of N
    return c
