"""The model: `ModelConfig` and its presets (`config`), the Flax linen layers and the pure
`forward` (`transformer`), the MoE router and back ends (`moe`), which attention kernel and MoE
back end a mesh's platform gets (`backends`), the attention mask builders
(`masks`) and Hugging Face safetensors in and out (`hf`). REFERENCE §1 (architecture,
checkpoints) and §3 (masks).

May import `kernels` and `parallel`; nothing above (no training, decoding or RL code).
The pure functions are re-exported here: `from llada_jax import model; model.forward(...)`.
"""

from llada_jax.model import masks
from llada_jax.model.config import FP32_PARAMS, PRESETS, ConfigError, ModelConfig, get_config
from llada_jax.model.transformer import (Attention, DecoderLayer, MLP, MoE, RMSNorm, Transformer,
                                         abstract_params, as_mask, compute_params, forward, forward_cached,
                                         forward_with_router, hidden_states, hidden_states_with_router, init_cache,
                                         init_params, init_sharded, logits_from_hidden, output_stats, rope)
from llada_jax.model.moe import EXPERT_IMPLS, experts_dense, experts_ragged, experts_tiled, route

__all__ = [
    "Attention", "ConfigError", "DecoderLayer", "EXPERT_IMPLS", "FP32_PARAMS", "MLP", "MoE", "ModelConfig", "PRESETS",
    "RMSNorm", "Transformer", "abstract_params", "as_mask", "compute_params", "experts_dense", "experts_ragged",
    "experts_tiled", "forward", "forward_cached", "forward_with_router", "get_config", "hidden_states",
    "hidden_states_with_router", "init_cache", "init_params", "init_sharded", "logits_from_hidden", "masks",
    "output_stats", "rope", "route",
]
