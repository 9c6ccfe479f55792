"""llada_jax: LLaDA2.1 block-diffusion MoE language models in JAX.

Pure functions at the centre; see README.md for the API.
"""

from llada_jax import masks
from llada_jax.config import ConfigError, ModelConfig, PRESETS, get_config
from llada_jax.decoding import GenerateOutput, generate
from llada_jax.hf import CheckpointError, hf_keys, load_hf_checkpoint, save_hf_checkpoint
from llada_jax.model import abstract_params, forward, forward_with_router, init_params

__all__ = [
    "CheckpointError", "ConfigError", "GenerateOutput", "ModelConfig", "PRESETS", "abstract_params", "forward",
    "forward_with_router", "generate", "get_config", "hf_keys", "init_params", "load_hf_checkpoint", "masks",
    "save_hf_checkpoint",
]
