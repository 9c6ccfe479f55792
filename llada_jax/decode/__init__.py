"""Draft-and-Edit decoding (REFERENCE §5): options, presets and knobs (`options`), the decoding
step and its `lax.while_loop` with the block KV cache and Multi-Block Editing (`loop`), the
cached forward (`kvcache`), the host entry point `generate` with streaming (`generation`),
continuous batching over the same step (`engine`), the prefix cache across the engine's
requests (`prefix_cache`: whole prompt blocks' K/V in a radix tree, LRU under a byte budget), and
RL's group rollouts with a shared prompt prefill (`rollouts`).

May import `model`, `kernels`, `parallel`; not training, rewards, RL, evaluation or serving.
"""

from llada_jax.decode.generation import GenerateOutput, Trajectory, generate, summarize
from llada_jax.decode.options import (MBE_ATTENTION, MBE_DEFAULTS, MBE_SELECT, PRESETS, DecodeSettings, Knobs, OptionError, check_options,
                                      check_prompts, make_knobs, trajectory_capacity)
from llada_jax.decode.loop import (COMMIT, DENOISE, DONE, PROPOSE, REWRITE, DecodeState, canvas_bucket,
                                   choose_tokens, decode, init_state, row_keys_for, step)

__all__ = [
    "COMMIT", "DENOISE", "DONE", "DecodeSettings", "DecodeState", "GenerateOutput", "Knobs", "MBE_ATTENTION",
    "MBE_DEFAULTS", "MBE_SELECT",    "OptionError", "PRESETS", "PROPOSE", "REWRITE", "Trajectory", "canvas_bucket", "check_options", "check_prompts",
    "choose_tokens", "decode", "generate", "init_state", "make_knobs", "row_keys_for", "step", "summarize",
    "trajectory_capacity",
]
