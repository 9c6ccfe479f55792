r"""SFT of LLaDA2.x mini or flash from its Hugging Face checkpoint with the public recipe (REFERENCE §4).

  python launch/train.py --config=configs/sft.py:size=mini --workdir=/runs/mini \
      --config.model.hf_dir=/ckpt/LLaDA2.1-mini --config.data.tokenizer=/ckpt/LLaDA2.1-mini \
      --config.data.data_dir=/data --config.data.dataset=chat_jsonl/my_sft

Import chat JSONL first (the validation split feeds the validation loss every eval_every steps):
  python launch/make_data.py --data_dir=/data --jsonl_name=my_sft --jsonl_train=... --jsonl_validation=...
Several datasets by weight: --config.data.dataset= --config.data.mixture=chat_jsonl/a:3,chat_jsonl/b:1
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import base_config, parse_arg  # noqa: E402

# Per size: steps, global batch, and the mesh. mini (16B total / 1.4B active): experts over 8
# devices, FSDP over the rest. flash (103B / 6.2B): experts over 8, FSDP over 16, data over the rest.
SIZES = {
    "mini": dict(steps=2000, batch=64, mesh=dict(data=1, fsdp=-1, tensor=1, expert=8)),
    "flash": dict(steps=1000, batch=128, mesh=dict(data=-1, fsdp=16, tensor=1, expert=8)),
}


def get_config(arg=None):
    a = parse_arg(arg, size="mini")
    if a.size not in SIZES:
        raise KeyError(f"config argument size: expected one of {sorted(SIZES)}, found {a.size!r}")
    s = SIZES[a.size]
    c = base_config()
    c.total_steps = s["steps"]
    c.checkpoint_every = 200
    c.model.preset = a.size
    c.model.overrides.dtype = "bfloat16"  # bf16 compute, fp32 master weights
    c.model.overrides.param_dtype = "float32"
    c.model.overrides.remat_policy = "dots_with_no_batch_dims"
    c.data.task = ""
    c.data.batch_size = s["batch"]
    c.data.seq_len = 2048
    c.data.too_long = "truncate"
    # Conversations packed into the rows (real-token fraction ~0.97 on a lognormal chat length mix at
    # 4096, bench/pack.py); --config.data.pack_conversations=False pads one conversation per row.
    c.data.pack_conversations = True
    # Validation loss on the dataset's validation split (make_data.py --jsonl_validation);
    # --config.eval_every=0 turns it off.
    c.eval_every = 200
    c.eval_batches = 8
    c.optim.lr = 1e-5
    c.optim.warmup_frac = 0.03
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0
    c.mesh.update(s["mesh"])
    return c
