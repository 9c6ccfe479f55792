r"""SFT of LLaDA2.x-mini from its Hugging Face checkpoint with the public recipe (REFERENCE §4).

  python launch/train.py --config=configs/sft_mini.py --workdir=gs://bucket/run \
      --config.model.hf_dir=/ckpt/LLaDA2.1-mini --config.data.dataset=chat_jsonl/my_sft \
      --config.data.data_dir=/data --config.data.tokenizer=/ckpt/LLaDA2.1-mini

Import chat JSONL first: python launch/make_data.py --jsonl_name=my_sft --jsonl_train=... --data_dir=/data
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import base_config, parse_arg  # noqa: E402


def get_config(arg=None):
    a = parse_arg(arg, steps=2000, batch=64)
    c = base_config()
    c.total_steps = a.steps
    c.checkpoint_every = 200
    c.model.preset = "mini"
    c.model.overrides.dtype = "bfloat16"  # bf16 compute, fp32 master weights
    c.model.overrides.param_dtype = "float32"
    c.model.overrides.remat_policy = "dots_with_no_batch_dims"
    c.data.task = ""
    c.data.batch_size = a.batch
    c.data.seq_len = 2048
    c.data.too_long = "truncate"
    c.optim.lr = 1e-5
    c.optim.warmup_frac = 0.03
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0
    # 16B total / 1.4B active: experts over 8 devices, FSDP over the rest
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.expert = 8
    return c
