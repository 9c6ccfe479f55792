"""Code without Flax that the model's layers call: attention masks as descriptions, the attention
implementations behind one interface, and the chunked lm_head + log-probability."""

from llada_jax.kernels.attention import (ATTENTION_IMPLS, DEFAULT_TILES, TileSizes, attention,
                                         blocked_attention, blocked_tiles, platform, resolve, splash_attention,
                                         xla_attention)
from llada_jax.kernels.mask import AttentionMask

__all__ = ["ATTENTION_IMPLS", "AttentionMask", "DEFAULT_TILES", "TileSizes", "attention", "blocked_attention",
           "blocked_tiles", "platform", "resolve", "splash_attention", "xla_attention"]
