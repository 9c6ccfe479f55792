"""One process of the multi-host RL test (tests/parallel/test_hosts.py): a few RL steps from a random init.

  python tests/parallel/multihost_rl.py WORKDIR DATA_DIR [--coordinator_address=... --num_processes=N --process_id=I]

The reward is the fraction of digits in a completion (a random init already varies on it, so
advantages and updates are not zero). The mesh is FSDP over every device; the row offsets each
process's group rollouts started from go to WORKDIR/group_rollouts_<process>.json. The held-out
evaluation runs before the first step and after the last (the task's reward on the test split).

Then, in the same processes (no second launch: these tests are CI's slowest), 3 LoRA SFT steps
(rank 4, base frozen in bf16) on a seeded random base into WORKDIR/lora_sft.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for helpers

import jax  # noqa: E402
from absl import app  # noqa: E402

from helpers import load_config  # noqa: E402
from llada_jax import model, train  # noqa: E402
from llada_jax.parallel import hosts  # noqa: E402
from llada_jax.rl import loop as rl_loop  # noqa: E402

hosts.define_flags()


def digit_fraction(completion, meta):
    del meta
    return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)


def main(argv):
    hosts.initialize_from_flags()
    workdir, data_dir = argv[1], argv[2]
    cfg = load_config("rl.py", **{
        "data.data_dir": data_dir, "data.num_train": 2000, "data.num_test": 50,  # the SFT tests' data
        "total_steps": 3, "checkpoint_every": 3, "optim.lr": 1e-3, "rl.prompts_per_step": 2, "rl.group_size": 4,
        "rl.inner_updates": 2, "rl.num_timesteps": 2, "rl.beta": 0.01,
        # FSDP over all 8 devices: on 2 processes the params are split across them, so each one's
        # rollout copy is gathered from both (hosts.process_local_copy).
        "mesh.data": 1, "mesh.fsdp": 8,
        # Held-out evaluation before step 1 and after step 3, each process decoding its share:
        # 12 examples, padded to 16 rows (a multiple of the mesh's 8), rows gathered back in order.
        "rl.eval_every": 3, "rl.eval_examples": 12, "rl.eval_modes": ("S",)})
    model_config = train.build_model_config(cfg)
    tokenizer = train.load_tokenizer(cfg, workdir)
    # Each process decodes its own prompts' group rollouts on its own devices: which rows did it draw?
    offsets, generate_groups = [], rl_loop.group_rollouts.generate_groups

    def recording(*args, **kwargs):
        offsets.append(kwargs.get("row_offset", 0))
        return generate_groups(*args, **kwargs)

    rl_loop.group_rollouts.generate_groups = recording
    rl_loop.run_rl(cfg, workdir, model_config, tokenizer, reward_fn=digit_fraction, progress=False)
    rl_loop.group_rollouts.generate_groups = generate_groups
    with open(os.path.join(workdir, f"group_rollouts_{jax.process_index()}.json"), "w") as f:
        json.dump(offsets, f)

    lora_dir = os.path.join(workdir, "lora_sft")
    cfg = load_config("quickstart.py", **{
        "data.data_dir": data_dir, "data.num_train": 2000, "data.num_test": 50, "data.batch_size": 8,
        "total_steps": 3, "checkpoint_every": 3, "log_every": 1, "optim.lr": 1e-2, "optim.warmup_frac": 0.0,
        "lora.rank": 4, "lora.alpha": 8.0, "lora.base_dtype": "bfloat16", "optim.expert_bias_rate": 0.0})
    model_config = train.build_model_config(cfg)
    base = jax.device_get(jax.jit(model.init_params, static_argnums=0)(model_config, jax.random.key(7)))
    tokenizer = train.load_tokenizer(cfg, lora_dir)
    obj = train.build_objective(cfg, model_config, extra_special_ids=tokenizer.special_ids)
    train.run_training(cfg, lora_dir, model_config, obj, train.train_iterator(cfg, lora_dir, tokenizer),
                       init_params=base, progress=False)


if __name__ == "__main__":
    app.run(main)
