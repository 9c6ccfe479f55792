r"""SFT of LLaDA2.x mini or flash from its Hugging Face checkpoint with the public recipe (REFERENCE §4).

  python launch/train.py --config=configs/sft.py:size=mini --workdir=/runs/mini \
      --config.model.hf_dir=/ckpt/LLaDA2.1-mini --config.data.tokenizer=/ckpt/LLaDA2.1-mini \
      --config.data.data_dir=/data --config.data.dataset=chat_jsonl/my_sft

Import chat JSONL first (the validation split feeds the validation loss every eval_every steps):
  python launch/make_data.py --data_dir=/data --jsonl_name=my_sft --jsonl_train=... --jsonl_validation=...
Several datasets by weight: --config.data.dataset= --config.data.mixture=chat_jsonl/a:3,chat_jsonl/b:1

The defaults are plans for this hardware with no overrides (README "Memory plans",
`launch/compile.py`; compiled: mini 76.7 GiB per chip of 95.7, flash 81.3, mini long 82.1):

  size=mini        L = 8192,  global batch 64 (2 micro-batches of 32), v5p-64 (32 chips: fsdp=4 x expert=8)
  size=flash       L = 4096,  global batch 128, v5p-256 (128 chips: fsdp=16 x expert=8)
  size=mini,long   L = 32768 (mini's context), global batch 32, v5p-64 (32 chips: fsdp=32,
                   moe_impl=expert_parallel routing per device, no expert axis)
  size=mini,lora   LoRA rank 8 on every projection, the base frozen in bf16 (lora.base_dtype),
                   L = 4096, global batch 8, v5e-8 (8 chips x 16 GB: fsdp=8, expert_parallel
                   routing per device, no expert axis); compiled as is
                   (bench/plans/lora.jsonl): 13.4 GiB per chip of 15.75

The fitting plan they carry: full remat, the chunked lm_head + log-prob (always on,
`ModelConfig.logits_chunk`), a mesh with an `expert` axis (not `long`), gradient accumulation
where one micro-batch's exchange buffers do not fit, and "auto" back ends, which on TPU resolve
to splash attention and expert_parallel MoE (llada_jax/model/backends.py).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import base_config, parse_arg  # noqa: E402

# Per size: steps, global batch, sequence length and the mesh. mini (16B total / 1.4B active):
# experts over 8 devices, FSDP over the rest. flash (103B / 6.2B): experts over 8, FSDP over 16,
# data over the rest. `long`: mini at its full context.
# `accum`: micro-batches per step (the objective unchanged, optim.accum_steps). mini at 8K needs 2:
# the dropless exchange over the expert axis sizes its receive buffer for the worst case,
# P * T_local * min(k, E/P) rows, and one micro-batch of 64 sequences asks 111.5 GiB per chip.
# `long`: one 32K sequence per chip is 65,536 composite positions, 4x the 8K micro-batch's; there
# the experts are routed per device without an expert axis (expert_parallel with P = 1: nothing
# exchanged, the buffer T_local * k rows), named explicitly since "auto" picks ragged (GSPMD, a
# global sort) on a mesh without one.
# `lora`: mini fine-tuned with adapters on a small slice (issue #23: v5e-8). The base in bf16 is 4 GB
# per chip over 8 chips, the adapters ~0.3B parameters; the activations of one 4096-token sequence
# (8192 composite positions) per chip are the rest. With an expert axis of 8 the dropless exchange's
# worst-case receive buffer (P * T_local * min(k, E/P) rows) alone asks 31.4 GiB of temporaries, so the
# experts are routed per device (expert_parallel with P = 1, as `long` does) and FSDP takes every chip.
# lr 1e-4: adapters start at zero and take a larger step than the full model's 1e-5.
LORA = {"mini": dict(batch=8, seq_len=4096, accum=1, mesh=dict(data=1, fsdp=-1, tensor=1, expert=1),
                     moe_impl="expert_parallel", rank=8, alpha=16.0, lr=1e-4)}
SIZES = {
    "mini": dict(steps=2000, batch=64, seq_len=8192, accum=2, mesh=dict(data=1, fsdp=-1, tensor=1, expert=8)),
    "flash": dict(steps=1000, batch=128, seq_len=4096, accum=1, mesh=dict(data=-1, fsdp=16, tensor=1, expert=8)),
}
LONG = {"mini": dict(batch=32, seq_len=32768, accum=1, mesh=dict(data=1, fsdp=-1, tensor=1, expert=1),
                     moe_impl="expert_parallel")}


def get_config(arg=None):
    a = parse_arg(arg, size="mini", long=False, lora=False)
    if a.size not in SIZES:
        raise KeyError(f"config argument size: expected one of {sorted(SIZES)}, found {a.size!r}")
    if a.long and a.size not in LONG:
        raise KeyError(f"config argument long: expected a size in {sorted(LONG)}, found size={a.size!r}")
    if a.lora and a.size not in LORA:
        raise KeyError(f"config argument lora: expected a size in {sorted(LORA)}, found size={a.size!r}")
    if a.lora and a.long:
        raise KeyError("config arguments long, lora: expected one of them, found both")
    s = dict(SIZES[a.size], **(LONG[a.size] if a.long else {}), **(LORA[a.size] if a.lora else {}))
    c = base_config()
    c.total_steps = s["steps"]
    c.checkpoint_every = 200
    c.model.preset = a.size
    c.model.overrides.dtype = "bfloat16"  # bf16 compute, fp32 master weights
    c.model.overrides.param_dtype = "float32"
    c.model.overrides.remat_policy = "full"  # saves only each layer's input; what fits at these lengths
    c.data.task = ""
    c.data.batch_size = s["batch"]
    c.data.seq_len = s["seq_len"]
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
    c.optim.accum_steps = s["accum"]
    if "moe_impl" in s:
        c.model.overrides.moe_impl = s["moe_impl"]
    if a.lora:  # adapters on every projection, the base frozen in bf16 (needs --init_from or model.hf_dir)
        c.lora.rank = s["rank"]
        c.lora.alpha = s["alpha"]
        c.lora.base_dtype = "bfloat16"
        c.optim.lr = s["lr"]
    c.mesh.update(s["mesh"])
    return c
