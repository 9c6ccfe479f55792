"""Training: the block-diffusion objectives (`objectives`: M2T / T2T noising, the composite loss,
block-size schedules), the optimizer, jitted sharded update step and loop with exact resume
(`trainer`), all Orbax I/O (`checkpoint`), FLOPs and MFU (`flops`) and the one metrics writer
(`metrics`). REFERENCE §2 and §4.

May import `model`, `data`, `kernels`, `parallel`; not decoding, rewards, RL or evaluation.
The trainer's functions are re-exported here: `from llada_jax import train; train.run_training(...)`.
"""

from llada_jax.train.metrics import MetricsLog, read_metrics
from llada_jax.train.trainer import (Batch, LoraRun, NonFiniteLossError, TrainState, batch_sharding, block_schedule,
                                     build_model_config, build_objective, check_lora_resume, check_tokenizer, decay_mask,
                                     enable_compilation_cache, eval_batches, expert_load_metrics, init_state,
                                     init_state_abstract, jit_train_step, learning_rate_schedule, load_tokenizer,
                                     lora_base_config, lora_setup, make_checkpointer, make_eval_step, make_optimizer,
                                     make_train_step, mesh_from_config, open_examples, real_mask, real_tokens, run_training,
                                     state_shardings, train_iterator, trainable_labels, update_expert_bias)

__all__ = [
    "Batch", "LoraRun", "MetricsLog", "NonFiniteLossError", "TrainState", "batch_sharding", "block_schedule",
    "build_model_config", "build_objective", "check_lora_resume", "check_tokenizer", "decay_mask",
    "enable_compilation_cache", "eval_batches", "expert_load_metrics", "init_state", "init_state_abstract",
    "jit_train_step", "learning_rate_schedule", "load_tokenizer", "lora_base_config", "lora_setup", "make_checkpointer",
    "make_eval_step", "make_optimizer", "make_train_step", "mesh_from_config", "open_examples", "read_metrics", "real_mask",
    "real_tokens", "run_training", "state_shardings", "train_iterator", "trainable_labels", "update_expert_bias",
]
