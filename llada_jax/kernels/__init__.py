"""Code without Flax modules that the model's layers call: attention masks as descriptions
(`mask`, with a dense twin), the attention implementations behind one interface (`attention`:
xla, blocked, splash, cudnn, auto) and the chunked lm_head + log-probability (`logits`).
REFERENCE §3 (masks) and SCALE.md (kernels).

May import `parallel` (the rule table, for the splash kernel's shard_map specs); nothing above.
"""

from llada_jax.kernels.attention import (ATTENTION_IMPLS, DEFAULT_TILES, TileSizes, attention,
                                         blocked_attention, blocked_tiles, platform, resolve, splash_attention,
                                         xla_attention)
from llada_jax.kernels.mask import AttentionMask

__all__ = ["ATTENTION_IMPLS", "AttentionMask", "DEFAULT_TILES", "TileSizes", "attention", "blocked_attention",
           "blocked_tiles", "platform", "resolve", "splash_attention", "xla_attention"]
