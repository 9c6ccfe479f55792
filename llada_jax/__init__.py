"""llada_jax: LLaDA2.1 block-diffusion MoE language models in JAX.

Pure functions at the centre; see README.md for the API. One subpackage per capability, and
imports point one way (tests/test_layers.py holds them there), from the top down:

    serve | aot | launcher      the HTTP adapter; ahead-of-time plans; what every launcher calls first
    rl                          EBPO / ESPO / DiPO: likelihood, losses, advantages, batches, the loop
    evaluation                  held-out and benchmark evaluation, plots
    train | decode | rewards    objectives + trainer + checkpoints; Draft-and-Edit + engine; verifiers + sandbox
    model | data                config, layers, MoE, masks, HF I/O; tasks, tokenizer, grain pipelines
    kernels                     attention implementations, mask descriptions, chunked lm_head
    parallel                    the logical-axis rule table and mesh, many hosts
    timing                      a stopwatch for the benchmarks
"""

from llada_jax.decode import GenerateOutput, generate
from llada_jax.model import abstract_params, forward, forward_with_router, init_params, masks
from llada_jax.model.config import PRESETS, ConfigError, ModelConfig, get_config
from llada_jax.model.hf import CheckpointError, hf_keys, load_hf_checkpoint, save_hf_checkpoint

__all__ = [
    "CheckpointError", "ConfigError", "GenerateOutput", "ModelConfig", "PRESETS", "abstract_params", "forward",
    "forward_with_router", "generate", "get_config", "hf_keys", "init_params", "load_hf_checkpoint", "masks",
    "save_hf_checkpoint",
]
