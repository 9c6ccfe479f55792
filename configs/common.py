"""Defaults shared by every run config (big_vision style: configs are Python, `get_config(arg)`)."""

import dataclasses
import importlib.util
import os

import ml_collections
from ml_collections import config_dict

from llada_jax.model.config import ModelConfig
from llada_jax.model.lora import TARGETS
from llada_jax.rewards.sandbox import SandboxConfig


# ModelConfig field annotations (strings: `from __future__ import annotations`) -> placeholder types;
# a tuple field is given on the command line as a string, `--config.model.overrides.remat_save='("a", "b")'`.
_PLACEHOLDER_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "tuple[str, ...]": tuple}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    c.checkpoint_every = 200
    c.keep_checkpoints = 3
    c.checkpoint_async = config_dict.placeholder(bool)  # None: asynchronous above 2 GiB of train state
    c.log_every = 10
    # Validation loss (metrics.jsonl `val_loss`) every eval_every steps and at the last, over the first
    # eval_batches batches of the split data.eval_split of the run's dataset(s); 0 = off.
    c.eval_every = 0
    c.eval_batches = 4
    # SIGTERM saves and stops at a step every process agrees on; with several processes they
    # exchange a flag every this many steps (a tiny all-gather that waits for the step in flight).
    c.preemption_check_every = 1
    # jax.profiler trace of steps [profile_start_step, profile_start_step + profile_num_steps) into
    # <workdir>/profile; 0 steps = off.
    c.profile_start_step = 0
    c.profile_num_steps = 0

    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"
    c.model.hf_dir = ""  # an HF checkpoint directory: its config.json, and its weights as the init
    # ModelConfig field overrides (dtype, moe_impl, hidden_size, ...): every field is a typed
    # placeholder, so `--config.model.overrides.hidden_size=128` works and a typo is an error.
    c.model.overrides = ml_collections.ConfigDict(
        {f.name: config_dict.placeholder(_PLACEHOLDER_TYPES[f.type]) for f in dataclasses.fields(ModelConfig)})
    # By the mesh's platform at start-up (llada_jax/model/backends.py): TPU splash + expert_parallel
    # (ragged without an expert axis), GPU cudnn + tiled, CPU blocked + dense. An explicit value wins.
    c.model.overrides.attention_impl = "auto"
    c.model.overrides.moe_impl = "auto"

    c.data = ml_collections.ConfigDict()
    c.data.task = "addition"  # an offline task built locally, or "" to read `dataset` from data_dir
    c.data.task_config = ml_collections.ConfigDict()  # the task's generator settings, e.g. max_digits
    c.data.dataset = ""  # a prepared dataset in data_dir, e.g. "chat_jsonl/my_sft"
    c.data.data_dir = ""  # default: <workdir>/data
    c.data.tokenizer = ""  # a tokenizer.json (file or directory); default: the locally built task tokenizer
    c.data.num_train = 20000
    c.data.num_test = 500
    c.data.num_validation = 200  # held-out problems for choosing settings (offline tasks)
    c.data.batch_size = 32  # global batch
    c.data.seq_len = 64  # a multiple of objective.block_size
    c.data.template = "chat"  # "chat" (LLaDA2 chat format) or "plain" (prompt, answer, EOS padding)
    c.data.too_long = "drop"
    c.data.eval_split = "validation"  # the held-out split of the validation loss (eval_every)
    # Several prepared datasets mixed by weight instead of `dataset`: "name1:w1,name2:w2" (or a list of
    # "name:weight"); each is shuffled on its own and interleaved in proportion to its weight.
    c.data.mixture = ""
    # Chat SFT: pack whole conversations into rows of seq_len (per-conversation attention and RoPE,
    # loss on every assistant turn, never on padding) instead of one conversation per padded row.
    c.data.pack_conversations = False
    c.data.packing_bins = 64  # rows the packer keeps open: more pack tighter

    c.objective = ml_collections.ConfigDict()  # ObjectiveConfig fields (REFERENCE §4)
    c.objective.block_size = 32
    c.objective.t_min = 0.3
    c.objective.t_max = 0.8
    c.objective.weighting = "elbo"
    c.objective.complementary = True
    c.objective.p_edit = 0.1
    c.objective.keep_weight = 0.0
    c.objective.lambda_t2t = 1.0
    c.objective.mtf = False
    c.objective.cap = False
    # Multi-Block Editing SFT (README "Multi-Block Editing"): cross-block links of window K in the
    # composite mask (0 = off), or a curriculum of ((num_steps, K), ...) stages, e.g.
    # ((300, 2), (300, 3), (0, 4)); clean history blocks also see the window's noisy blocks.
    c.objective.mbe_window = 0
    c.objective.mbe_window_schedule = ()
    c.objective.mbe_clean_sees_noisy = True

    c.optim = ml_collections.ConfigDict()  # the public SFT recipe's shape (REFERENCE §4)
    c.optim.lr = 1e-5
    c.optim.warmup_frac = 0.03
    c.optim.min_lr_ratio = 0.0
    c.optim.weight_decay = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip = 1.0
    c.optim.accum_steps = 1
    # Aux-loss-free expert balancing (train.update_expert_bias): off for SFT and RL, on for CPT.
    c.optim.expert_bias_rate = 0.0

    c.lora = lora_config()

    c.mesh = ml_collections.ConfigDict()  # -1: all remaining devices
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.expert = 1
    return c


def lora_config() -> ml_collections.ConfigDict:
    """The `lora` section (llada_jax.model.lora.LoraConfig): rank 0 = full fine-tuning."""
    c = ml_collections.ConfigDict()
    c.rank = 0  # > 0: train low-rank adapters only, the base (--init_from / model.hf_dir) frozen
    c.alpha = 16.0  # the adapters' update is scaled by alpha / rank
    c.targets = ",".join(TARGETS)  # comma-separated projection names (model.lora.TARGETS)
    c.dropout = 0.0  # rank dropout: each rank component dropped with this probability per step
    # Storage dtype of the frozen base, cast once at the start: "bfloat16" halves it; "" keeps the
    # model's param_dtype. Adapters and their optimizer state are fp32 either way.
    c.base_dtype = ""
    return c


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """`"task=sudoku,runlocal"` -> ConfigDict(task="sudoku", runlocal=True), over `defaults`."""
    out = ml_collections.ConfigDict(defaults)
    for part in filter(None, (arg or "").split(",")):
        key, _, value = part.partition("=")
        if key not in out:
            raise KeyError(f"config argument: unknown key {key!r}; expected one of {sorted(out)}")
        out[key] = type(out[key])(value) if value else True
    return out


def rl_config(algorithm: str = "ebpo") -> ml_collections.ConfigDict:
    """The `rl` section: rollouts, the loss of `algorithm` and held-out evaluation (rl_loop.run_rl)."""
    c = ml_collections.ConfigDict()
    c.algorithm = algorithm  # "ebpo" | "espo" | "dipo"
    c.prompts_per_step = 8  # P
    c.group_size = 8  # G completions per prompt
    # μ updates per rollout batch, same batch and noise key; None: the algorithm's default
    # (rl_loop.INNER_UPDATES: EBPO 2, ESPO 8 as in its paper, DiPO 2).
    c.inner_updates = config_dict.placeholder(int)
    # Updates per inner epoch (verl's ppo_mini_batch_size = P x G / mini_batches): the step's rollouts
    # split into this many mini-batches, μ x mini_batches updates per step, θ_old the rollout policy
    # in all of them. Each update can be accumulated over optim.accum_steps micro-batches.
    c.mini_batches = 1
    # One-step off-policy (AReaL, DARE): step s+1's rollouts are decoded from the params before
    # update s, and their rewards scored on the host while update s runs; θ_old's terms are the
    # rollout params' (staleness 1). The first step after a start is on-policy.
    c.pipeline = False
    c.preset = "S"  # decoding preset of the rollouts (decoding.PRESETS)
    c.temperature = 1.0  # rollout sampling temperature (0 = greedy)
    # Compute dtype of the rollouts' decoding (activations, KV cache): None = the model's
    # (`model.overrides.dtype`); "bfloat16" decodes as a bf16 release is served. Where it is not the
    # params' dtype, the rollouts decode a copy of θ cast to it once per step (router kept fp32).
    c.rollout_dtype = config_dict.placeholder(str)
    # "groups": decode.rollouts (each prompt prefilled once for its G rows, the batch shrinking as
    # rows finish, rewards scored as they do); "generate": the static batch of decode.generate.
    # Same rollouts token for token; several processes always use "generate".
    c.rollout_engine = "groups"
    c.eos_early_stop = True  # a rollout stops after the block holding its first EOS (same answers)
    c.gen_length = 16
    c.reward = "by_task"  # a name in rewards.REWARDS, or a user's verifier "package.module:function"
    # Scoring: reward_workers threads (0 = one after another in the loop's thread, no timeout); a
    # completion still being scored after reward_timeout_s gets reward 0 (metrics: reward_timeouts).
    c.reward_workers = 8
    c.reward_timeout_s = 60.0
    # The code reward's sandbox limits (rewards.sandbox.SandboxConfig fields; None keeps its default),
    # e.g. --config.rl.sandbox.timeout_s=5 --config.rl.sandbox.memory_bytes=536870912.
    c.sandbox = ml_collections.ConfigDict(
        {f.name: config_dict.placeholder(_PLACEHOLDER_TYPES[f.type if isinstance(f.type, str) else f.type.__name__])
         for f in dataclasses.fields(SandboxConfig)})
    # Prompts: the data section's train split (default), or a file as launch/eval.py reads it
    # (GSM8K / MATH / HumanEval / MBPP JSONL, task records, or chat JSONL whose turns stop before
    # the answer: `{"messages": [...], <other keys: the verifier's meta>}`); format "auto" detects it.
    # Prompts longer than data.seq_len - gen_length are dropped at start-up (metrics: prompts_dropped).
    c.prompts_file = ""
    c.prompts_format = "auto"
    c.eval_file = ""  # held-out evaluation from this file (same formats) instead of data's eval_split
    c.skip_no_signal = True  # no update when all advantages are zero (rl_loop docstring, step 5)
    # Loss settings; None keeps the algorithm's default.
    c.num_timesteps = config_dict.placeholder(int)  # likelihood N (EBPO 8, ESPO 2 coupled)
    c.vectorize = config_dict.placeholder(str)  # "batch" | "scan"
    c.eps_low = config_dict.placeholder(float)
    c.eps_high = config_dict.placeholder(float)
    c.beta = config_dict.placeholder(float)  # KL weight to the initial params (0 = no reference)
    c.kl_estimator = config_dict.placeholder(str)  # EBPO: "k1" | "k2" | "k3"
    c.grad_mode = config_dict.placeholder(str)  # EBPO / ESPO: "direct" | "replay"
    c.t_floor = config_dict.placeholder(float)  # EBPO / ESPO: smallest mask rate of the ELBO noise
    c.weighting = config_dict.placeholder(str)  # EBPO / ESPO: "rate" (1/t) | "count" (realised rate)
    c.normalize = config_dict.placeholder(str)  # EBPO: "none" (the paper's) | "token" (per-token log ratio)
    c.dual_clip = config_dict.placeholder(float)  # EBPO: floor c*A for A < 0 (None = plain PPO clip)
    c.dipo_step_bucket = 8  # DiPO num_steps rounded up to a multiple of this (fewer compiles)
    # Held-out evaluation (greedy) every eval_every steps and before the first; 0 = off.
    c.eval_every = 10
    c.eval_split = "validation"  # settings are chosen on validation; test is reported once, at the end
    c.eval_examples = 256
    c.eval_modes = ("S", "Q")
    return c


def quickstart_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """configs/quickstart.py's `get_config(arg)`, loaded by path: `import quickstart` could find
    launch/quickstart.py when a program runs from launch/."""
    spec = importlib.util.spec_from_file_location("_quickstart_config",
                                                  os.path.join(os.path.dirname(__file__), "quickstart.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
