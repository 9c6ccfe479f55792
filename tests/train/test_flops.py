"""Model FLOPs by formula, checked against counts worked out by hand and a dense attention mask."""

import numpy as np

from llada_jax.model import masks
from llada_jax.train import flops
from llada_jax.model.config import get_config


def test_attention_pairs_equal_the_composite_mask():
    for length, block in ((32, 8), (16, 4), (16, 16)):
        mdlm = block >= length
        mask, _ = masks.composite(length, block) if not mdlm else (np.ones((length, length), bool), None)
        assert flops.attention_pairs(length, block, mdlm) == int(np.asarray(mask).sum())
    for window, clean in ((2, True), (3, False), (9, True)):  # Multi-Block Editing links
        mask, _ = masks.composite_mbe(32, 8, window, clean)
        assert flops.attention_pairs(32, 8, False, window, clean) == int(np.asarray(mask).sum())


def test_training_flops_by_hand():
    c = get_config("tiny")
    length, block = 32, 8
    # tiny, counted by hand: D=64, V=512, 3 layers (1 dense, 2 MoE), 4 heads + 2 kv heads of 16.
    attn = 64 * (4 + 2 * 2) * 16 + 4 * 16 * 64 + 2 * 64 + 2 * 16  # q,k,v,o + norms = 12448
    dense = 3 * 64 * 128  # 24576
    moe = 4 * 3 * 64 * 32 + 3 * 64 * 32 + 64 * 16 + 16  # 4 active experts + shared + router = 31760
    body = 3 * attn + dense + 2 * moe + 64  # + final norm = 125504
    assert body == 125504
    head = 512 * 64  # the lm_head: on the 32 noisy tokens only, not the 32 clean ones
    pairs = 8 * 8 * 4 * 5  # B^2 nb (nb + 1)
    forward = 2 * body * 64 + 2 * head * 32 + 4 * c.num_layers * c.num_heads * c.head_dim * pairs
    assert forward == 19_144_704  # 16_064_512 body + 2_097_152 lm_head + 983_040 attention
    assert flops.training_flops_per_sequence(c, length, block) == 3 * forward
    assert flops.training_flops_per_step(c, 4, length, block) == 8 * 3 * forward
    assert flops.training_flops_per_step(c, 4, length, block, complementary=False, mtf=True) == 8 * 3 * forward
    # MDLM (one block): no clean half, so every token reaches the lm_head.
    mdlm = 2 * (body + head) * 32 + 4 * c.num_layers * c.num_heads * c.head_dim * 32 * 32
    assert flops.training_flops_per_sequence(c, length, length) == 3 * mdlm


def test_mfu_table():
    assert flops.peak_flops("TPU v5p") == 459e12 and flops.peak_flops("TPU v5 lite") == 197e12
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops("cpu") is None
    out = flops.mfu(459e12 * 4, 2.0, 4, "TPU v5p")
    assert out["flops_per_s_per_device"] == 459e12 / 2 and out["mfu"] == 0.5
    assert flops.mfu(1e9, 1.0, 1, "cpu")["mfu"] is None
