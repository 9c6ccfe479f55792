"""Group advantages (REFERENCE §6): a group whose rewards are all equal carries no signal (decided on max > min)."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float


def _groups(rewards: Float[Array, " B"], group_size: int) -> Float[Array, "P G"]:
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards: expected shape [num_prompts * group_size] with group_size={group_size}, "
                         f"found {rewards.shape}")
    return rewards.reshape(-1, group_size).astype(jnp.float32)


def _has_signal(r: Float[Array, "P G"]) -> Bool[Array, "P 1"]:
    """Whether a group's rewards differ. Decided on max > min: the float32 mean of identical
    non-dyadic rewards (0.1, 1/3) is off by an ulp, so `std > 0` holds for them."""
    return r.max(-1, keepdims=True) > r.min(-1, keepdims=True)


def group_normalized_advantages(rewards: Float[Array, " B"], group_size: int, eps: float = 1e-6) -> Float[Array, " B"]:
    """EBPO / GRPO: `(r - mean) / (std + eps)` within each group of `group_size` rows (population
    std); exactly 0 for a group whose rewards are all equal."""
    r = _groups(rewards, group_size)
    adv = (r - r.mean(-1, keepdims=True)) / (r.std(-1, keepdims=True) + eps)
    return jnp.where(_has_signal(r), adv, 0.0).reshape(-1)


def leave_one_out_advantages(rewards: Float[Array, " B"], group_size: int) -> Float[Array, " B"]:
    """ESPO / RLOO: `r_i - mean_{j != i} r_j` within each group (needs group_size >= 2)."""
    if group_size < 2:
        raise ValueError(f"group_size: expected >= 2 for leave-one-out, found {group_size}")
    r = _groups(rewards, group_size)
    adv = r - (r.sum(-1, keepdims=True) - r) / (group_size - 1)
    return jnp.where(_has_signal(r), adv, 0.0).reshape(-1)


def zscore_advantages(rewards: Float[Array, " B"], group_size: int,
                      eps: float = 1e-6) -> tuple[Float[Array, " B"], Bool[Array, " B"]]:
    """DiPO: z-scores within each group and a keep mask that drops zero-variance groups (all
    rewards equal: no learning signal, and they would dilute the token mean). Dropped rows get 0."""
    r = _groups(rewards, group_size)
    keep = jnp.broadcast_to(_has_signal(r), r.shape)
    adv = jnp.where(keep, (r - r.mean(-1, keepdims=True)) / (r.std(-1, keepdims=True) + eps), 0.0)
    return adv.reshape(-1), keep.reshape(-1)
