"""The policy losses (REFERENCE §6), each `(loss, metrics)` and differentiable in `params`: KL estimators and
the clipped surrogate, EBPO (`ebpo_loss`, LLaDA2.1), ESPO (`espo_loss`, sequence level) and DiPO
(`dipo_loss`, token level on the exact decoding trajectory)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from llada_jax.model.config import ConfigError, ModelConfig
from llada_jax.rl.batches import batch_arrays
from llada_jax.rl.configs import (Batch, DiPOConfig, EBPOConfig, ESPOConfig, KL_ESTIMATORS, MAX_LOG_RATIO, NEVER,
                                  RLConfig)
from llada_jax.rl.likelihood import likelihood_terms, policy_logprobs, sample_noise
from llada_jax.train import objectives


# ---------------------------------------------------------------------------------------- surrogate
def kl_estimate(log_ratio_ref: Array, estimator: str) -> Array:
    """Schulman's estimators of KL(pi_theta || pi_ref) from `log_ratio_ref = log pi_ref - log pi_theta`
    at samples of pi_theta: k1 = -d, k2 = d^2 / 2, k3 = exp(d) - 1 - d (unbiased and >= 0)."""
    d = log_ratio_ref
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        d = jnp.clip(d, -MAX_LOG_RATIO, MAX_LOG_RATIO)
        return jnp.expm1(d) - d
    raise ConfigError(f"kl_estimator: expected one of {KL_ESTIMATORS}, found {estimator!r}")


def clipped_surrogate(log_ratio: Array, advantages: Array, eps_low: float, eps_high: float,
                      dual_clip: Optional[float] = None) -> tuple[Array, Array, Array]:
    """PPO's `min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)` per unit; with `dual_clip = c`,
    floored at `c A` where A < 0 (dual-clip PPO: the gradient vanishes once rho > c).

    Returns (objective, clipped, rho); `clipped` marks units whose gradient the clip removes
    (rho above 1 + eps_high with A > 0, below 1 - eps_low or above c with A < 0).
    """
    ratio = jnp.exp(jnp.clip(log_ratio, -MAX_LOG_RATIO, MAX_LOG_RATIO))
    objective = jnp.minimum(ratio * advantages, jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages)
    clipped = ((ratio > 1.0 + eps_high) & (advantages > 0)) | ((ratio < 1.0 - eps_low) & (advantages < 0))
    if dual_clip is not None:
        negative = advantages < 0
        objective = jnp.where(negative, jnp.maximum(objective, dual_clip * advantages), objective)
        clipped |= negative & (ratio > dual_clip)
    return objective, clipped, ratio


def policy_loss(log_ratio: Array, advantages: Array, weight: Array, eps_low: float, eps_high: float,
                kl: Optional[Array] = None, beta: float = 0.0,
                dual_clip: Optional[float] = None) -> tuple[Float[Array, ""], dict[str, Array]]:
    """`-sum(weight * surrogate) + beta * sum(weight * kl)` over units (samples, blocks or tokens).

    `weight` is zero on units that do not count and sums to one over the rest (a mean); metrics
    are weighted the same way, ratio min/max over counted units.
    """
    objective, clipped, ratio = clipped_surrogate(log_ratio, advantages, eps_low, eps_high, dual_clip)
    pg = -jnp.sum(weight * objective)
    counted = weight > 0
    metrics = {
        "pg_loss": pg,
        "clip_frac": jnp.sum(weight * clipped),
        "ratio_mean": jnp.sum(weight * ratio),
        "ratio_min": jnp.min(jnp.where(counted, ratio, jnp.inf)),
        "ratio_max": jnp.max(jnp.where(counted, ratio, -jnp.inf)),
        "log_ratio_abs": jnp.sum(weight * jnp.abs(log_ratio)),
    }
    loss = pg
    if kl is not None:
        metrics["kl"] = jnp.sum(weight * kl)
        loss = loss + beta * metrics["kl"]
    metrics["loss"] = loss
    return loss, metrics


def _mean_weight(counted: Array, total: Optional[Array] = None) -> Array:
    """`counted` over its count: over `total` when given (the whole update's count, of which
    `counted` is one micro-batch's share: `make_rl_step`'s accumulation)."""
    counted = counted.astype(jnp.float32)
    return counted / jnp.maximum(counted.sum() if total is None else total, 1.0)


def _ref_terms(batch: Batch, beta: float) -> Optional[Array]:
    """The reference terms when the KL is on (`batch_arrays` has checked that they are there)."""
    return batch["ref_terms"] if beta > 0 else None


# ---------------------------------------------------------------------------------------- EBPO / ESPO
def ebpo_objective(terms: Float[Array, "B N K"], batch: Batch, config: EBPOConfig,
                   total: Optional[Array] = None) -> tuple[Float[Array, ""], dict[str, Array]]:
    """EBPO's loss as a function of θ's ELBO terms (batch from `batch_arrays`); `total`: the
    update's `weight_count` when `batch` is one micro-batch of it (None: this batch's own)."""
    bs = config.likelihood.block_size
    adv, keep = batch["advantages"].astype(jnp.float32), batch["sample_mask"]
    delta = (terms - batch["old_terms"]).mean(1)  # [B, K]: sum_n w_n with w_n = 1/N
    ref = _ref_terms(batch, config.beta)
    ref_delta = None if ref is None else (ref - terms).mean(1)
    tokens_per_block = objectives.per_block_sums(batch["completion_mask"].astype(jnp.float32), bs)  # [B, K]
    if config.ratio_level == "sequence":
        log_ratio, weight, a = delta.sum(-1), _mean_weight(keep, total), adv
        ref_lr = None if ref is None else ref_delta.sum(-1)
        if config.normalize == "token":
            n = jnp.maximum(tokens_per_block.sum(-1), 1.0)
            log_ratio, ref_lr = log_ratio / n, None if ref_lr is None else ref_lr / n
    else:
        blocks = tokens_per_block > 0
        per_sample = blocks / jnp.maximum(blocks.sum(-1, keepdims=True), 1)
        log_ratio, weight, a = delta, per_sample * _mean_weight(keep, total)[:, None], adv[:, None]
        ref_lr = ref_delta
        if config.normalize == "token":
            n = jnp.maximum(tokens_per_block, 1.0)
            log_ratio, ref_lr = log_ratio / n, None if ref_lr is None else ref_lr / n
    kl = None if ref is None else kl_estimate(ref_lr, config.kl_estimator)
    loss, metrics = policy_loss(log_ratio, a, weight, config.eps_low, config.eps_high, kl, config.beta,
                                config.dual_clip)
    metrics["elbo_per_token"] = jnp.sum(_mean_weight(keep, total) * terms.mean(1).sum(-1) /
                                        jnp.maximum(batch["completion_mask"].sum(-1), 1))
    return loss, metrics


def espo_objective(terms: Float[Array, "B N K"], batch: Batch, config: ESPOConfig,
                   total: Optional[Array] = None) -> tuple[Float[Array, ""], dict[str, Array]]:
    """ESPO's loss as a function of θ's ELBO terms: sequence ratio exp(ΔELBO / L), k2 KL / L
    (`total` as in `ebpo_objective`)."""
    length = jnp.maximum(batch["completion_mask"].sum(-1), 1).astype(jnp.float32)  # [B]
    elbo = terms.mean(1).sum(-1)  # [B]
    log_ratio = (elbo - batch["old_terms"].mean(1).sum(-1)) / length
    ref = _ref_terms(batch, config.beta)
    kl = None if ref is None else 0.5 * (elbo - ref.mean(1).sum(-1)) ** 2 / length
    weight = _mean_weight(batch["sample_mask"], total)
    loss, metrics = policy_loss(log_ratio, batch["advantages"].astype(jnp.float32), weight, config.eps_low,
                                config.eps_high, kl, config.beta)
    metrics["elbo_per_token"] = jnp.sum(weight * elbo / length)
    return loss, metrics


OBJECTIVES = {EBPOConfig: ebpo_objective, ESPOConfig: espo_objective}


def weight_count(batch: Batch, config: RLConfig) -> Array:
    """The count an objective's mean divides by: kept samples (EBPO, ESPO), scored writes (DiPO).
    Summed over an update's micro-batches it is the `total` that keeps the accumulated objective
    the unaccumulated one (`make_rl_step`)."""
    if isinstance(config, DiPOConfig):
        return _dipo_scored(batch, config)[1].sum().astype(jnp.float32)
    return batch["sample_mask"].sum().astype(jnp.float32)


# Update metrics that are not additive over micro-batches, with their reduction and its identity
# (all others are sums of weighted shares, from 0).
METRIC_REDUCTIONS = {"ratio_min": (jnp.minimum, np.inf), "ratio_max": (jnp.maximum, -np.inf)}


def _elbo_setup(batch: Batch, key: PRNGKeyArray, config: Union[EBPOConfig, ESPOConfig]):
    required = ("advantages", "old_terms") + (("ref_terms",) if config.beta > 0 else ())
    batch = batch_arrays(batch, config.likelihood.block_size, required)
    noise = sample_noise(key, batch["completion_mask"], config.likelihood, batch["example_ids"])
    return batch, noise


def ebpo_loss(params, batch: Batch, key: PRNGKeyArray, *, model_config: ModelConfig,
              config: EBPOConfig) -> tuple[Float[Array, ""], dict[str, Array]]:
    """EBPO (REFERENCE §6): clipped surrogate on the vectorized-ELBO ratio; `key` is the update's
    noise key, the one `policy_terms` used for `batch['old_terms']` (and `ref_terms`)."""
    batch, noise = _elbo_setup(batch, key, config)
    terms = likelihood_terms(params, model_config, batch["tokens"], noise, config.likelihood, batch["completion_mask"])
    return ebpo_objective(terms, batch, config)


def espo_loss(params, batch: Batch, key: PRNGKeyArray, *, model_config: ModelConfig,
              config: ESPOConfig) -> tuple[Float[Array, ""], dict[str, Array]]:
    """ESPO (REFERENCE §6): clipped surrogate on exp(ΔELBO / L) with a coupled ELBO and k2 KL."""
    batch, noise = _elbo_setup(batch, key, config)
    terms = likelihood_terms(params, model_config, batch["tokens"], noise, config.likelihood, batch["completion_mask"])
    return espo_objective(terms, batch, config)


# ---------------------------------------------------------------------------------------- DiPO
def dipo_local_steps(write_step: Int[Array, "B L W"], block_size: int) -> Int[Array, "B L W"]:
    """Within-block step index of every write: its step minus the first step of its block.

    The decoder counts steps over the whole row, so block k's steps start after block k-1's. The
    first denoising step of a block always writes (at least one masked position is filled), so
    the block's earliest write is its first step. Shifting by it lets one forward per
    within-block index serve every block. Empty slots (-1) become `NEVER`.
    """
    b, length, w = write_step.shape
    known = write_step >= 0
    first = jnp.where(known, write_step, NEVER).reshape(b, length // block_size, block_size * w).min(-1)
    first = jnp.repeat(first, block_size, axis=-1)[:, :, None]  # [B, L, 1]
    return jnp.where(known, write_step - first, NEVER)


def dipo_inputs(tokens: Int[Array, "B L"], decoded: Bool[Array, "B L"], local: Int[Array, "B L W"],
                write_token: Int[Array, "B L W"], step: Int[Array, ""], mask_id: int) -> Int[Array, "B L"]:
    """The noisy half of the composite input at within-block step `step`, every block at once.

    A decoded position shows its last write at an earlier step of its block (an edited token shows
    the value it had, not its final one) and the mask id before its first write; prompt and
    padding show `tokens`. Under the composite mask a noisy block sees only itself and the clean
    (final) earlier blocks, so this is the canvas the decoder attended at that step.
    """
    n = jnp.sum(local < step, axis=-1)  # writes before the step (slots are in step order)
    last = jnp.take_along_axis(write_token, jnp.maximum(n - 1, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(decoded, jnp.where(n > 0, last, mask_id), tokens)


def dipo_num_steps(write_step: np.ndarray, block_size: int) -> int:
    """Host-side: the `DiPOConfig.num_steps` that covers every write of a packed batch."""
    local = np.asarray(dipo_local_steps(jnp.asarray(write_step), block_size))
    known = local < NEVER
    return int(local[known].max()) + 1 if known.any() else 1


def dipo_token_logprobs(params, model_config: ModelConfig, batch: Batch, config: DiPOConfig) -> Float[Array, "B L W"]:
    """log q(write | the canvas the decoder saw when it wrote it) for every recorded write (0 on
    empty slots), q the sampling distribution; one composite forward per within-block step index
    (batched or scanned), all blocks at once."""
    tokens, decoded, write_token = batch["tokens"], batch["completion_mask"], batch["write_token"]
    local = dipo_local_steps(batch["write_step"], config.block_size)
    b, length = tokens.shape
    mc, bs, s = model_config, config.block_size, config.num_steps
    kw = dict(temperature=config.temperature, exclude_mask=config.exclude_mask)

    def at_step(j, x_t):
        hit = local == j  # [B, L, W]
        target = jnp.sum(jnp.where(hit, write_token, 0), axis=-1)
        logp = policy_logprobs(params, mc, x_t, tokens, target, bs, **kw)  # [B, L]
        return jnp.where(hit, logp[..., None], 0.0)

    steps = jnp.arange(s)
    x_ts = jax.vmap(lambda j: dipo_inputs(tokens, decoded, local, write_token, j, mc.mask_token_id))
    if config.vectorize == "batch":
        x_t = x_ts(steps).reshape(s * b, length)
        hit = (local[None] == steps[:, None, None, None])  # [S, B, L, W]
        target = jnp.sum(jnp.where(hit, write_token[None], 0), axis=-1).reshape(s * b, length)
        logp = policy_logprobs(params, mc, x_t, jnp.tile(tokens, (s, 1)), target, bs, **kw).reshape(s, b, length)
        return jnp.sum(jnp.where(hit, logp[..., None], 0.0), axis=0)

    def body(acc, j):
        return acc + at_step(j, dipo_inputs(tokens, decoded, local, write_token, j, mc.mask_token_id)), None

    out, _ = jax.lax.scan(body, jnp.zeros(write_token.shape, jnp.float32), steps)
    return out


def dipo_batch(batch: Batch, config: DiPOConfig, required: Sequence[str] = ()) -> dict[str, Array]:
    return batch_arrays(batch, config.block_size, ("write_step", "write_token", *required))


def _dipo_scored(batch: Batch, config: DiPOConfig) -> tuple[Array, Array]:
    """`(written, scored)` [B, L, W]: the recorded writes of kept samples, and those within `num_steps`."""
    local = dipo_local_steps(batch["write_step"], config.block_size)
    written = (local < NEVER) & batch["completion_mask"][..., None] & batch["sample_mask"][:, None, None]
    return written, written & (local < config.num_steps)


def dipo_objective(logp: Float[Array, "B L W"], batch: Batch, config: DiPOConfig,
                   total: Optional[Array] = None) -> tuple[Float[Array, ""], dict[str, Array]]:
    """DiPO's loss as a function of θ's per-write log-probs (batch from `dipo_batch`; `total` as
    in `ebpo_objective`)."""
    written, scored = _dipo_scored(batch, config)
    ref = _ref_terms(batch, config.beta)
    kl = None if ref is None else kl_estimate(ref - logp, "k3")
    adv = jnp.broadcast_to(batch["advantages"].astype(jnp.float32)[:, None, None], logp.shape)
    loss, metrics = policy_loss(logp - batch["old_terms"], adv, _mean_weight(scored, total), config.eps_low,
                                config.eps_high, kl, config.beta)
    metrics.update(scored_tokens=scored.sum(), unscored_tokens=(written & ~scored).sum())
    return loss, metrics


def dipo_loss(params, batch: Batch, *, model_config: ModelConfig,
              config: DiPOConfig) -> tuple[Float[Array, ""], dict[str, Array]]:
    """DiPO (REFERENCE §6): token-mean clipped surrogate of per-write ratios, each conditioned on
    the canvas exactly as the decoder saw it when it made that write (`pack_trajectory`): every
    write of every position is a decision, a T2T edit scored as an edit (the old value visible),
    the EOS fill and the canvas past `P + gen_length` included. z-score advantages with
    zero-variance groups dropped via `sample_mask`, optional k3 KL. Multi-Block Editing's window
    forwards see later blocks, which the composite mask does not show: decode with `mbe_window=0`.
    No randomness: the trajectory fixes every input.
    """
    required = ("advantages", "old_terms") + (("ref_terms",) if config.beta > 0 else ())
    batch = dipo_batch(batch, config, required)
    return dipo_objective(dipo_token_logprobs(params, model_config, batch, config), batch, config)
