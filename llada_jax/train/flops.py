"""Model FLOPs of a training step by formula, and MFU against a per-chip peak table.

The usual accounting (PaLM appendix B, MaxText's `calculate_tflops_training_per_device`):
a training step costs 3x its forward (backward = 2x forward); a forward costs 2 FLOPs per
multiply-add of every matmul a token goes through: the active parameters (each token runs
`num_experts_per_tok` routed experts, not all of them; the input embedding is a gather and
does not count) plus attention, `2 * 2 * heads * head_dim` per (query, allowed key) pair for
QK^T and PV. Attention counts only the pairs the mask allows (the block-diffusion composite
mask of REFERENCE §3 allows `B^2 * nb * (nb + 1)` pairs over its 2L tokens, nb = L / B blocks),
so the figure is the useful work whatever kernel skips or does not skip masked tiles. The body
(every layer) runs on all 2L tokens of `[x_t ; x_0]`, the `lm_head` only on the L noisy ones:
the clean half's last hidden states are never scored (objectives.denoiser_hidden slices them off).
"""

from __future__ import annotations

from typing import Optional

from llada_jax.model.config import ModelConfig

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets, keyed by a substring of
# `jax.devices()[0].device_kind` (lower case), most specific first.
PEAK_FLOPS = (
    ("v6", 918e12),  # TPU v6e (Trillium)
    ("v5p", 459e12),
    ("v5 lite", 197e12),  # TPU v5e reports "TPU v5 lite"
    ("v5e", 197e12),
    ("v4", 275e12),
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
)


def peak_flops(device_kind: str) -> Optional[float]:
    """Dense bf16 peak FLOP/s of one chip, or None when the chip is not in the table (e.g. CPU)."""
    kind = device_kind.lower()
    for key, value in PEAK_FLOPS:
        if key in kind:
            return value
    return None


def attention_pairs(length: int, block_size: int, mdlm: bool, window: int = 1, clean_sees_noisy: bool = False) -> int:
    """(query, key) pairs one sequence's training forward attends.

    MDLM (one block, or `mdlm`): L^2 over x_t alone. Block diffusion over [x_t ; x_0]: a noisy
    query of block b sees its noisy block and the clean blocks before it, a clean query the
    clean blocks up to its own: sum_b B * ((b + 1) B) twice = B^2 nb (nb + 1) (partial last
    block counted as a full one: an upper bound by less than one block). Multi-Block Editing's
    links (`window` K, `masks.composite_mbe`) add the noisy blocks b+1 .. b+K-1 to block b's noisy
    queries, and with `clean_sees_noisy` to its clean ones."""
    if mdlm or block_size >= length:
        return length * length
    nb = -(-length // block_size)
    # Multi-Block Editing links: block b's noisy (and clean) queries see min(K-1, nb-1-b) more noisy blocks.
    ahead = sum(min(window - 1, nb - 1 - b) for b in range(nb))
    return block_size * block_size * (nb * (nb + 1) + ahead * (2 if clean_sees_noisy else 1))


def training_flops_per_sequence(config: ModelConfig, length: int, block_size: int, mdlm: bool = False,
                                window: int = 1, clean_sees_noisy: bool = False) -> float:
    """Model FLOPs of forward + backward for ONE (noised) sequence of `length` tokens."""
    c = config
    tokens = length if (mdlm or block_size >= length) else 2 * length  # the composite input
    head = c.vocab_size * c.hidden_size
    body = c.param_counts()["active"] - 2 * head  # the embedding is a gather; the lm_head below
    forward = 2 * body * tokens + 2 * head * length  # the lm_head sees the noisy half only
    forward += 4 * c.num_layers * c.num_heads * c.head_dim * attention_pairs(length, block_size, mdlm, window,
                                                                                 clean_sees_noisy)
    return 3.0 * forward


def training_flops_per_step(config: ModelConfig, batch_size: int, length: int, block_size: int, *,
                            mdlm: bool = False, complementary: bool = True, mtf: bool = False,
                            window: int = 1, clean_sees_noisy: bool = False) -> float:
    """Model FLOPs of one training step of `batch_size` sequences (complementary masking doubles
    the rows; MTF adds a second full forward + backward)."""
    rows = batch_size * (2 if complementary else 1)
    return rows * (2 if mtf else 1) * training_flops_per_sequence(config, length, block_size, mdlm, window,
                                                                  clean_sees_noisy)


def mfu(flops_per_step: float, step_seconds: float, num_devices: int, device_kind: str) -> dict:
    """FLOP/s per device and MFU (None off the peak table)."""
    per_device = flops_per_step / max(step_seconds, 1e-12) / num_devices
    peak = peak_flops(device_kind)
    return {"flops_per_s_per_device": per_device, "mfu": None if peak is None else per_device / peak}
