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


def test_training_flops_by_hand():
    c = get_config("tiny")
    length, block = 32, 8
    active = c.param_counts()["active"] - c.vocab_size * c.hidden_size
    pairs = 8 * 8 * 4 * 5  # B^2 nb (nb + 1)
    forward = 2 * active * 64 + 4 * c.num_layers * c.num_heads * c.head_dim * pairs
    assert flops.training_flops_per_sequence(c, length, block) == 3 * forward
    assert flops.training_flops_per_step(c, 4, length, block) == 8 * 3 * forward
    assert flops.training_flops_per_step(c, 4, length, block, complementary=False, mtf=True) == 8 * 3 * forward


def test_mfu_table():
    assert flops.peak_flops("TPU v5p") == 459e12 and flops.peak_flops("TPU v5 lite") == 197e12
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops("cpu") is None
    out = flops.mfu(459e12 * 4, 2.0, 4, "TPU v5p")
    assert out["flops_per_s_per_device"] == 459e12 / 2 and out["mfu"] == 0.5
    assert flops.mfu(1e9, 1.0, 1, "cpu")["mfu"] is None
