"""Reinforcement learning for block diffusion: likelihood estimators and the EBPO / ESPO / DiPO losses.

Everything here is a pure function of arrays, static configs and explicit keys (REFERENCE §6):

* Vectorized likelihood (`sample_noise`, `likelihood_terms`): the block-level ELBO terms
  `elbo[b, n, k] = sum_{masked completion tokens i in block k} log p(y_i | z_n, x; M) / t[b, n, k]`
  (the ELBO weighting of REFERENCE §4) for every block k and timestep n, from ONE composite
  `[x_t ; x_0]` forward per timestep under the BD3-LM mask (REFERENCE §3, via
  `objectives.per_token_logprobs`). The N timesteps run as one batched call or a `lax.scan`.
* Losses, each `(loss, metrics)` and differentiable in `params`:
  EBPO (`ebpo_loss`, LLaDA2.1), ESPO (`espo_loss`, sequence level) and DiPO (`dipo_loss`, token
  level on the exact decoding trajectory). EBPO and ESPO are functions of the ELBO terms only, so
  `loss_and_grad` also offers the memory-saving "replay" gradient (REFERENCE §6, Memory).
* Group advantages, KL estimators, the clipped surrogate, and `make_rl_step`, the update step a
  loop jits.

Noise scheme (project choice, REFERENCE §6 "noise drawn per block and stratified across the N
rows"). For example e (key `fold_in(key, example_id[e])`), block k and row n of S strata:
    t[e, n, k] = t_floor + (1 - t_floor) * (n + u[e, n, k]) / S,   u ~ U[0, 1) iid,
so each block's S rates cover [t_floor, 1] one stratum each (row n always holds stratum n), and
completion token i of block k is masked in row n iff `v[e, n, i] < t[e, n, k]`, v ~ U[0, 1) iid.
Prompt and padding outside `completion_mask` are never masked. The coupled (antithetic) variant
of ESPO draws S = N/2 base rates in `[t_floor, 1 - t_floor]` and appends, for each row, its
complement: the completion tokens it left visible, at rate `1 - t`. Every row is an unbiased ELBO
estimate on its own (E[masked_i / t] = 1), so the likelihood is their mean (`w_n = 1/N`).

Common random numbers: the noise is a function of (key, example ids, completion mask) alone.
Pass the same key when computing the θ_old and reference terms and in every inner update of a
rollout batch, or the ratio measures noise instead of the policy change.

Batch layout (all losses): `tokens [B, L]` is prompt, completion, then EOS fill, laid out like the
decoder's canvas (`pack_rollouts`), L a multiple of the block size; `completion_mask [B, L]` marks
the scored tokens; `advantages [B]`; optional `sample_mask [B]` (False drops a sample) and
`example_ids [B]` (noise folding; default the row). Rows come in contiguous groups of G
completions of one prompt. `old_terms` / `ref_terms` hold θ_old's and the reference's
`policy_terms` for the same batch and key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from llada_jax import objectives
from llada_jax.config import ConfigError, ModelConfig
from llada_jax.train import TrainState

VECTORIZE = ("batch", "scan")
RATIO_LEVELS = ("sequence", "block")
KL_ESTIMATORS = ("k1", "k2", "k3")
GRAD_MODES = ("direct", "replay")
# commit_step value of a decoded position whose step is unknown: masked at every DiPO step.
NEVER = 2 ** 30
# log-ratios are clamped here before exp: beyond it the update has already diverged and an inf
# ratio would turn the surrogate (and its gradient) into inf/NaN.
_MAX_LOG_RATIO = 20.0

Batch = Mapping[str, Any]


def _fail(owner: str, field: str, expected: str, found: Any):
    raise ConfigError(f"{owner}.{field}: expected {expected}, found {found!r}")


def _check_int(owner, obj, field, minimum=1):
    v = getattr(obj, field)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        _fail(owner, field, f"an integer >= {minimum}", v)


def _check_choice(owner, obj, field, choices):
    if getattr(obj, field) not in choices:
        _fail(owner, field, f"one of {choices}", getattr(obj, field))


def _check_eps(owner, obj):
    if not 0.0 <= obj.eps_low < 1.0:
        _fail(owner, "eps_low", "a value in [0, 1)", obj.eps_low)
    if not obj.eps_high >= 0.0:
        _fail(owner, "eps_high", "a value >= 0", obj.eps_high)
    if not obj.beta >= 0.0:
        _fail(owner, "beta", "a value >= 0", obj.beta)


# ---------------------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class LikelihoodConfig:
    """The block-level ELBO estimator (REFERENCE §3, §6). Hashable: static under `jit`.

    num_timesteps: N rows of noise per sample (the coupled variant: N/2 masks and their complements).
    coupled: antithetic mask + complement pairs (ESPO).
    t_floor: smallest mask rate; keeps the 1/t weight bounded.
    vectorize: "batch" runs the N composite forwards as one [B*N, 2L] call (fastest, N x the
      activations); "scan" runs them one after another under `lax.scan`.
    """

    block_size: int = 32
    num_timesteps: int = 8
    coupled: bool = False
    t_floor: float = 1e-3
    vectorize: str = "batch"

    def __post_init__(self):
        owner = "LikelihoodConfig"
        _check_int(owner, self, "block_size")
        _check_int(owner, self, "num_timesteps")
        if self.coupled and self.num_timesteps % 2:
            _fail(owner, "num_timesteps", "an even number with coupled=True (mask + complement pairs)",
                  self.num_timesteps)
        if not 0.0 < self.t_floor < (0.5 if self.coupled else 1.0):
            _fail(owner, "t_floor", f"a value in (0, {0.5 if self.coupled else 1.0})", self.t_floor)
        _check_choice(owner, self, "vectorize", VECTORIZE)

    @property
    def num_strata(self) -> int:
        return self.num_timesteps // 2 if self.coupled else self.num_timesteps


@dataclasses.dataclass(frozen=True)
class EBPOConfig:
    """EBPO (LLaDA2.1, REFERENCE §6) with the project defaults.

    ratio_level: "sequence" takes one ratio per completion, `log rho = sum_n w_n sum_k Δelbo`, as
      the paper's J does; "block" clips each block's ratio `sum_n w_n Δelbo_k` separately (a
      variant) and averages a sample's blocks before averaging samples.
    kl_estimator / beta: KL to the reference at the ratio's level (k1, k2 or k3 of
      `log pi_ref - log pi_theta` estimated with the same ELBO terms); off at beta = 0.
    grad_mode: "direct" differentiates through the N forwards; "replay" computes the terms
      without gradient and replays one forward at a time with its cotangent (same gradient,
      activation memory of one timestep).
    """

    likelihood: LikelihoodConfig = LikelihoodConfig()
    eps_low: float = 0.2
    eps_high: float = 0.28
    ratio_level: str = "sequence"
    kl_estimator: str = "k2"
    beta: float = 0.0
    grad_mode: str = "direct"

    def __post_init__(self):
        _check_eps("EBPOConfig", self)
        _check_choice("EBPOConfig", self, "ratio_level", RATIO_LEVELS)
        _check_choice("EBPOConfig", self, "kl_estimator", KL_ESTIMATORS)
        _check_choice("EBPOConfig", self, "grad_mode", GRAD_MODES)


@dataclasses.dataclass(frozen=True)
class ESPOConfig:
    """ESPO (REFERENCE §6): the completion is one action, `rho = exp(ΔELBO / L)`, k2 KL
    `0.5 * (ELBO_theta - ELBO_ref)^2 / L`, coupled estimator with num_mc = likelihood.num_timesteps
    (default 2: one mask and its complement). L is each sample's number of completion tokens (the
    generation length when `completion_mask` covers the whole generated canvas, as
    `pack_rollouts` does by default). ESPO's mu = 8 inner updates per rollout batch is a loop
    setting: call the step mu times with the same batch, old terms and key."""

    likelihood: LikelihoodConfig = LikelihoodConfig(num_timesteps=2, coupled=True)
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 1e-3
    grad_mode: str = "direct"

    def __post_init__(self):
        _check_eps("ESPOConfig", self)
        _check_choice("ESPOConfig", self, "grad_mode", GRAD_MODES)


@dataclasses.dataclass(frozen=True)
class DiPOConfig:
    """DiPO (DiRL, REFERENCE §6): per-token ratios on the exact decoding trajectory.

    num_steps: the composite forwards per update, one per within-block step index; it must cover
      the batch's longest block (`dipo_num_steps`); tokens committed at a later index are not
      scored and counted in the `unscored_tokens` metric. Static: bucket it to limit recompiles.
    beta: k3 KL to the reference per token (0 = off).
    """

    block_size: int = 32
    num_steps: int = 32
    eps_low: float = 0.2
    eps_high: float = 0.28
    beta: float = 0.0
    vectorize: str = "scan"

    def __post_init__(self):
        _check_int("DiPOConfig", self, "block_size")
        _check_int("DiPOConfig", self, "num_steps")
        _check_eps("DiPOConfig", self)
        _check_choice("DiPOConfig", self, "vectorize", VECTORIZE)


RLConfig = Union[EBPOConfig, ESPOConfig, DiPOConfig]


# ---------------------------------------------------------------------------------------- batches
def pack_rollouts(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], length: int, *,
                  pad_id: int, commit_steps: Optional[Sequence[Sequence[int]]] = None,
                  score_padding: bool = True) -> dict[str, np.ndarray]:
    """Host-side packing of rollouts into the RL batch layout, like the decoder's canvas.

    Row i is `prompts[i] + completions[i]` then `pad_id` (EOS) up to `length`. `completion_mask`
    covers the completion and, with `score_padding` (LLaDA fills the canvas with EOS and SFT trains
    on that fill), the fill too. With `commit_steps` (from `decoding.generate`), also returns
    `commit_step [B, L]`: -1 on the prompt (always visible), the decoder's step on the completion,
    and `NEVER` on the fill, whose steps `generate` does not return (DiPO keeps it masked).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"pack_rollouts: expected as many completions as prompts ({len(prompts)}), "
                         f"found {len(completions)}")
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    steps = np.full((len(prompts), length), NEVER, np.int32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n_p, n_c = len(p), len(c)
        if n_p + n_c > length:
            raise ValueError(f"pack_rollouts: row {i}: expected prompt + completion <= length={length}, "
                             f"found {n_p} + {n_c}")
        tokens[i, :n_p], tokens[i, n_p:n_p + n_c] = p, c
        mask[i, n_p:n_p + n_c] = True
        mask[i, n_p + n_c:] = score_padding
        steps[i, :n_p] = -1
        if commit_steps is not None:
            if len(commit_steps[i]) != n_c:
                raise ValueError(f"pack_rollouts: commit_steps[{i}]: expected {n_c} steps, found {len(commit_steps[i])}")
            steps[i, n_p:n_p + n_c] = commit_steps[i]
    out = {"tokens": tokens, "completion_mask": mask}
    if commit_steps is not None:
        out["commit_step"] = steps
    return out


def _batch_arrays(batch: Batch, block_size: int, required: Sequence[str] = ()) -> dict[str, Array]:
    """Checks shapes and fills the defaults (`sample_mask`, `example_ids`)."""
    for k in ("tokens", "completion_mask", *required):
        if k not in batch:
            raise KeyError(f"batch: expected a {k!r} entry, found keys {sorted(batch)}")
    tokens = jnp.asarray(batch["tokens"])
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"batch['tokens']: expected an integer array [B, L], found {tokens.dtype}{tokens.shape}")
    b, length = tokens.shape
    if length % block_size:
        raise ValueError(f"batch['tokens']: expected a length that is a multiple of block_size={block_size}, "
                         f"found {length}")
    out = dict(batch, tokens=tokens)
    out.setdefault("sample_mask", jnp.ones((b,), bool))
    out.setdefault("example_ids", jnp.arange(b, dtype=jnp.int32))
    shapes = {"completion_mask": (b, length), "advantages": (b,), "sample_mask": (b,), "example_ids": (b,),
              "commit_step": (b, length)}
    for k, shape in shapes.items():
        if k in out and jnp.shape(out[k]) != shape:
            raise ValueError(f"batch[{k!r}]: expected shape {shape}, found {jnp.shape(out[k])}")
    return out


# ---------------------------------------------------------------------------------------- likelihood
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Noise:
    """The masks of one update: row n of sample b masks `masked[b, n]` at per-block rates `t[b, n]`."""

    masked: Bool[Array, "B N L"]
    t: Float[Array, "B N K"]


def sample_noise(key: PRNGKeyArray, completion_mask: Bool[Array, "B L"], config: LikelihoodConfig,
                 example_ids: Optional[Int[Array, " B"]] = None) -> Noise:
    """Per-block stratified masks (scheme in the module docstring); a pure function of the key."""
    b, length = completion_mask.shape
    bs, s = config.block_size, config.num_strata
    k = -(-length // bs)
    example_ids = jnp.arange(b) if example_ids is None else example_ids
    hi = 1.0 - config.t_floor if config.coupled else 1.0

    def draw(example_id):
        k_t, k_v = jax.random.split(jax.random.fold_in(key, example_id))
        u = jax.random.uniform(k_t, (s, k))
        t = config.t_floor + (hi - config.t_floor) * (jnp.arange(s)[:, None] + u) / s  # [S, K]
        return t, jax.random.uniform(k_v, (s, length))

    t, v = jax.vmap(draw)(example_ids)  # [B, S, K], [B, S, L]
    t_tok = jnp.repeat(t, bs, axis=-1)[..., :length]  # each token's block rate
    masked = completion_mask[:, None] & (v < t_tok)
    if config.coupled:
        masked = jnp.concatenate([masked, completion_mask[:, None] & ~masked], axis=1)
        t = jnp.concatenate([t, 1.0 - t], axis=1)
    return Noise(masked=masked, t=t)


def _elbo_rows(params, model_config: ModelConfig, tokens: Int[Array, "R L"], masked: Bool[Array, "R L"],
               t: Float[Array, "R K"], block_size: int) -> Float[Array, "R K"]:
    """Per-block masked-token ELBO of R noised rows from one composite forward."""
    x_t = jnp.where(masked, model_config.mask_token_id, tokens)
    logp = objectives.per_token_logprobs(params, model_config, x_t, tokens, block_size)
    return objectives.per_block_sums(jnp.where(masked, logp, 0.0), block_size) / t


def likelihood_terms(params, model_config: ModelConfig, tokens: Int[Array, "B L"], noise: Noise,
                     config: LikelihoodConfig) -> Float[Array, "B N K"]:
    """The ELBO terms `elbo[b, n, k]` of every block and timestep, one composite forward per n.

    Block k's term conditions on the clean blocks before it (prompt included) and on its own
    unmasked tokens; its sum over k is timestep n's ELBO estimate of `log p(completion | prompt)`.
    """
    b, n, length = noise.masked.shape
    bs = config.block_size
    if config.vectorize == "batch":
        rows = _elbo_rows(params, model_config, jnp.repeat(tokens, n, axis=0), noise.masked.reshape(b * n, length),
                          noise.t.reshape(b * n, -1), bs)
        return rows.reshape(b, n, -1)

    def body(_, xs):
        masked, t = xs
        return None, _elbo_rows(params, model_config, tokens, masked, t, bs)

    _, terms = jax.lax.scan(body, None, (noise.masked.swapaxes(0, 1), noise.t.swapaxes(0, 1)))
    return terms.swapaxes(0, 1)


def replay_value_and_grad(objective: Callable[[Array], tuple[Array, dict]], params, model_config: ModelConfig,
                          tokens: Int[Array, "B L"], noise: Noise, config: LikelihoodConfig):
    """`((loss, metrics), grads)` of `objective(likelihood_terms(params))` in activation memory of
    one timestep (REFERENCE §6, Memory).

    The terms are computed without gradient; `c = d loss / d elbo` ([B, N, K], one scalar per
    sample, timestep and block) comes from differentiating the cheap objective; then each
    timestep's forward is replayed under `lax.scan` and `grad sum(elbo_n(params) * c_n)` is
    accumulated. By the chain rule this is the exact gradient; it costs one extra forward per
    timestep.
    """
    terms = likelihood_terms(params, model_config, tokens, noise, config)
    (loss, metrics), cotangent = jax.value_and_grad(objective, has_aux=True)(terms)

    def body(acc, xs):
        masked, t, c = xs
        g = jax.grad(lambda p: jnp.sum(_elbo_rows(p, model_config, tokens, masked, t, config.block_size) * c))(params)
        return jax.tree.map(jnp.add, acc, g), None

    xs = (noise.masked.swapaxes(0, 1), noise.t.swapaxes(0, 1), cotangent.swapaxes(0, 1))
    grads, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), xs)
    return (loss, metrics), grads


# ---------------------------------------------------------------------------------------- advantages
def _groups(rewards: Float[Array, " B"], group_size: int) -> Float[Array, "P G"]:
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards: expected shape [num_prompts * group_size] with group_size={group_size}, "
                         f"found {rewards.shape}")
    return rewards.reshape(-1, group_size).astype(jnp.float32)


def group_normalized_advantages(rewards: Float[Array, " B"], group_size: int, eps: float = 1e-6) -> Float[Array, " B"]:
    """EBPO / GRPO: `(r - mean) / (std + eps)` within each group of `group_size` rows (population std)."""
    r = _groups(rewards, group_size)
    return ((r - r.mean(-1, keepdims=True)) / (r.std(-1, keepdims=True) + eps)).reshape(-1)


def leave_one_out_advantages(rewards: Float[Array, " B"], group_size: int) -> Float[Array, " B"]:
    """ESPO / RLOO: `r_i - mean_{j != i} r_j` within each group (needs group_size >= 2)."""
    if group_size < 2:
        raise ValueError(f"group_size: expected >= 2 for leave-one-out, found {group_size}")
    r = _groups(rewards, group_size)
    return (r - (r.sum(-1, keepdims=True) - r) / (group_size - 1)).reshape(-1)


def zscore_advantages(rewards: Float[Array, " B"], group_size: int,
                      eps: float = 1e-6) -> tuple[Float[Array, " B"], Bool[Array, " B"]]:
    """DiPO: z-scores within each group and a keep mask that drops zero-variance groups (all
    rewards equal: no learning signal, and they would dilute the token mean). Dropped rows get 0."""
    r = _groups(rewards, group_size)
    std = r.std(-1, keepdims=True)
    keep = jnp.broadcast_to(std > 0, r.shape)
    adv = jnp.where(keep, (r - r.mean(-1, keepdims=True)) / (std + eps), 0.0)
    return adv.reshape(-1), keep.reshape(-1)


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
        d = jnp.clip(d, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return jnp.expm1(d) - d
    raise ConfigError(f"kl_estimator: expected one of {KL_ESTIMATORS}, found {estimator!r}")


def clipped_surrogate(log_ratio: Array, advantages: Array, eps_low: float,
                      eps_high: float) -> tuple[Array, Array, Array]:
    """PPO's `min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)` per unit.

    Returns (objective, clipped, rho); `clipped` marks units whose gradient the clip removes
    (rho above 1 + eps_high with A > 0, or below 1 - eps_low with A < 0).
    """
    ratio = jnp.exp(jnp.clip(log_ratio, -_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    objective = jnp.minimum(ratio * advantages, jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages)
    clipped = ((ratio > 1.0 + eps_high) & (advantages > 0)) | ((ratio < 1.0 - eps_low) & (advantages < 0))
    return objective, clipped, ratio


def policy_loss(log_ratio: Array, advantages: Array, weight: Array, eps_low: float, eps_high: float,
                kl: Optional[Array] = None, beta: float = 0.0) -> tuple[Float[Array, ""], dict[str, Array]]:
    """`-sum(weight * surrogate) + beta * sum(weight * kl)` over units (samples, blocks or tokens).

    `weight` is zero on units that do not count and sums to one over the rest (a mean); metrics
    are weighted the same way, ratio min/max over counted units.
    """
    objective, clipped, ratio = clipped_surrogate(log_ratio, advantages, eps_low, eps_high)
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


def _mean_weight(counted: Array) -> Array:
    counted = counted.astype(jnp.float32)
    return counted / jnp.maximum(counted.sum(), 1.0)


def _ref_terms(batch: Batch, beta: float) -> Optional[Array]:
    """The reference terms when the KL is on (`_batch_arrays` has checked that they are there)."""
    return batch["ref_terms"] if beta > 0 else None


# ---------------------------------------------------------------------------------------- EBPO / ESPO
def ebpo_objective(terms: Float[Array, "B N K"], batch: Batch,
                   config: EBPOConfig) -> tuple[Float[Array, ""], dict[str, Array]]:
    """EBPO's loss as a function of θ's ELBO terms (batch from `_batch_arrays`)."""
    bs = config.likelihood.block_size
    adv, keep = batch["advantages"].astype(jnp.float32), batch["sample_mask"]
    delta = (terms - batch["old_terms"]).mean(1)  # [B, K]: sum_n w_n with w_n = 1/N
    ref = _ref_terms(batch, config.beta)
    ref_delta = None if ref is None else (ref - terms).mean(1)
    if config.ratio_level == "sequence":
        log_ratio, weight, a = delta.sum(-1), _mean_weight(keep), adv
        ref_lr = None if ref is None else ref_delta.sum(-1)
    else:
        blocks = objectives.per_block_sums(batch["completion_mask"].astype(jnp.float32), bs) > 0  # [B, K]
        per_sample = blocks / jnp.maximum(blocks.sum(-1, keepdims=True), 1)
        log_ratio, weight, a = delta, per_sample * _mean_weight(keep)[:, None], adv[:, None]
        ref_lr = ref_delta
    kl = None if ref is None else kl_estimate(ref_lr, config.kl_estimator)
    loss, metrics = policy_loss(log_ratio, a, weight, config.eps_low, config.eps_high, kl, config.beta)
    metrics["elbo_per_token"] = jnp.sum(_mean_weight(keep) * terms.mean(1).sum(-1) /
                                        jnp.maximum(batch["completion_mask"].sum(-1), 1))
    return loss, metrics


def espo_objective(terms: Float[Array, "B N K"], batch: Batch,
                   config: ESPOConfig) -> tuple[Float[Array, ""], dict[str, Array]]:
    """ESPO's loss as a function of θ's ELBO terms: sequence ratio exp(ΔELBO / L), k2 KL / L."""
    length = jnp.maximum(batch["completion_mask"].sum(-1), 1).astype(jnp.float32)  # [B]
    elbo = terms.mean(1).sum(-1)  # [B]
    log_ratio = (elbo - batch["old_terms"].mean(1).sum(-1)) / length
    ref = _ref_terms(batch, config.beta)
    kl = None if ref is None else 0.5 * (elbo - ref.mean(1).sum(-1)) ** 2 / length
    weight = _mean_weight(batch["sample_mask"])
    loss, metrics = policy_loss(log_ratio, batch["advantages"].astype(jnp.float32), weight, config.eps_low,
                                config.eps_high, kl, config.beta)
    metrics["elbo_per_token"] = jnp.sum(weight * elbo / length)
    return loss, metrics


_OBJECTIVES = {EBPOConfig: ebpo_objective, ESPOConfig: espo_objective}


def _elbo_setup(batch: Batch, key: PRNGKeyArray, config: Union[EBPOConfig, ESPOConfig]):
    required = ("advantages", "old_terms") + (("ref_terms",) if config.beta > 0 else ())
    batch = _batch_arrays(batch, config.likelihood.block_size, required)
    noise = sample_noise(key, batch["completion_mask"], config.likelihood, batch["example_ids"])
    return batch, noise


def ebpo_loss(params, batch: Batch, key: PRNGKeyArray, *, model_config: ModelConfig,
              config: EBPOConfig) -> tuple[Float[Array, ""], dict[str, Array]]:
    """EBPO (REFERENCE §6): clipped surrogate on the vectorized-ELBO ratio; `key` is the update's
    noise key, the one `policy_terms` used for `batch['old_terms']` (and `ref_terms`)."""
    batch, noise = _elbo_setup(batch, key, config)
    terms = likelihood_terms(params, model_config, batch["tokens"], noise, config.likelihood)
    return ebpo_objective(terms, batch, config)


def espo_loss(params, batch: Batch, key: PRNGKeyArray, *, model_config: ModelConfig,
              config: ESPOConfig) -> tuple[Float[Array, ""], dict[str, Array]]:
    """ESPO (REFERENCE §6): clipped surrogate on exp(ΔELBO / L) with a coupled ELBO and k2 KL."""
    batch, noise = _elbo_setup(batch, key, config)
    terms = likelihood_terms(params, model_config, batch["tokens"], noise, config.likelihood)
    return espo_objective(terms, batch, config)


# ---------------------------------------------------------------------------------------- DiPO
def dipo_local_steps(commit_step: Int[Array, "B L"], block_size: int) -> Int[Array, "B L"]:
    """Within-block step indices: `commit_step` minus the earliest known step of its block.

    The decoder's steps count over the whole row, so block k's steps start after block k-1's; only
    the order inside a block matters for visibility, and shifting by the block's first step lets one
    forward per within-block index serve every block. -1 (prompt) and `NEVER` stay as they are.
    """
    b, length = commit_step.shape
    known = (commit_step >= 0) & (commit_step < NEVER)
    first = jnp.where(known, commit_step, NEVER).reshape(b, length // block_size, block_size).min(-1)
    return jnp.where(known, commit_step - jnp.repeat(first, block_size, axis=-1), commit_step)


def dipo_inputs(tokens: Int[Array, "B L"], local_step: Int[Array, "B L"], step: Int[Array, ""],
                mask_id: int) -> Int[Array, "B L"]:
    """The noisy half of the composite input for within-block step `step`, every block at once.

    Visibility rule: a position shows its final token iff it is prompt (-1) or was committed at an
    earlier step of its block (`local_step < step`); everything else is the mask id. Under the
    composite mask each noisy block sees only itself and the clean earlier blocks, so the logits at
    a token committed at `step` are those the decoder had when it committed it (see `dipo_loss`
    for where that is approximate).
    """
    return jnp.where(local_step < step, tokens, mask_id)


def dipo_num_steps(commit_step: np.ndarray, block_size: int) -> int:
    """Host-side: the `DiPOConfig.num_steps` that covers every token of a packed batch."""
    local = np.asarray(dipo_local_steps(jnp.asarray(commit_step), block_size))
    known = (local >= 0) & (local < NEVER)
    return int(local[known].max()) + 1 if known.any() else 1


def dipo_token_logprobs(params, model_config: ModelConfig, tokens: Int[Array, "B L"],
                        local_step: Int[Array, "B L"], config: DiPOConfig) -> Float[Array, "B L"]:
    """log p(token | what was visible when it was committed) at each committed position (0 elsewhere),
    one composite forward per within-block step index (batched or scanned)."""
    b, length = tokens.shape
    mc, bs, s = model_config, config.block_size, config.num_steps
    steps = jnp.arange(s)
    if config.vectorize == "batch":
        x_t = jax.vmap(lambda j: dipo_inputs(tokens, local_step, j, mc.mask_token_id))(steps)  # [S, B, L]
        logp = objectives.per_token_logprobs(params, mc, x_t.reshape(s * b, length), jnp.tile(tokens, (s, 1)), bs)
        logp = logp.reshape(s, b, length)
    else:
        def body(_, j):
            x_t = dipo_inputs(tokens, local_step, j, mc.mask_token_id)
            return None, objectives.per_token_logprobs(params, mc, x_t, tokens, bs)

        _, logp = jax.lax.scan(body, None, steps)
    pick = local_step[None] == steps[:, None, None]  # [S, B, L]
    return jnp.sum(jnp.where(pick, logp, 0.0), axis=0)


def dipo_loss(params, batch: Batch, *, model_config: ModelConfig,
              config: DiPOConfig) -> tuple[Float[Array, ""], dict[str, Array]]:
    """DiPO (REFERENCE §6): token-mean clipped surrogate of per-token ratios conditioned on the
    decoding trajectory, z-score advantages, dropped groups via `sample_mask`, optional k3 KL.

    `batch['commit_step']` is `pack_rollouts`'s; `old_terms` / `ref_terms` are `policy_terms`
    ([B, L] token log-probs). Approximations, all from what the trajectory does not record: a
    token rewritten by T2T editing is scored once, as its final value at its last commit step, and
    is masked (not its earlier value) at the steps before; positions with unknown steps (the EOS
    fill after a truncated answer) stay masked; Multi-Block Editing is not modelled (decode with
    `mbe_window=0`). No randomness: the trajectory fixes every input.
    """
    required = ("advantages", "old_terms", "commit_step") + (("ref_terms",) if config.beta > 0 else ())
    batch = _batch_arrays(batch, config.block_size, required)
    local = dipo_local_steps(batch["commit_step"], config.block_size)
    logp = dipo_token_logprobs(params, model_config, batch["tokens"], local, config)
    committed = batch["completion_mask"] & (local >= 0) & (local < NEVER) & batch["sample_mask"][:, None]
    scored = committed & (local < config.num_steps)
    ref = _ref_terms(batch, config.beta)
    kl = None if ref is None else kl_estimate(ref - logp, "k3")
    adv = jnp.broadcast_to(batch["advantages"].astype(jnp.float32)[:, None], logp.shape)
    loss, metrics = policy_loss(logp - batch["old_terms"], adv, _mean_weight(scored), config.eps_low,
                                config.eps_high, kl, config.beta)
    metrics.update(scored_tokens=scored.sum(), unscored_tokens=(committed & ~scored).sum())
    return loss, metrics


# ---------------------------------------------------------------------------------------- the update
def policy_terms(params, batch: Batch, key: PRNGKeyArray, *, model_config: ModelConfig,
                 config: RLConfig) -> Array:
    """What the losses compare θ against: run it on θ_old (before the inner updates) for
    `batch['old_terms']` and on the reference for `batch['ref_terms']`, with the update's key.
    EBPO / ESPO: ELBO terms [B, N, K]; DiPO: trajectory token log-probs [B, L] (`key` unused)."""
    if isinstance(config, DiPOConfig):
        b = _batch_arrays(batch, config.block_size, ("commit_step",))
        local = dipo_local_steps(b["commit_step"], config.block_size)
        return dipo_token_logprobs(params, model_config, b["tokens"], local, config)
    b = _batch_arrays(batch, config.likelihood.block_size)
    noise = sample_noise(key, b["completion_mask"], config.likelihood, b["example_ids"])
    return likelihood_terms(params, model_config, b["tokens"], noise, config.likelihood)


def loss_and_grad(params, batch: Batch, key: PRNGKeyArray, *, model_config: ModelConfig, config: RLConfig):
    """`((loss, metrics), grads)` of the method that `config` names, in its `grad_mode`."""
    if isinstance(config, DiPOConfig):
        return jax.value_and_grad(dipo_loss, has_aux=True)(params, batch, model_config=model_config, config=config)
    objective = _OBJECTIVES[type(config)]
    batch, noise = _elbo_setup(batch, key, config)
    lik = config.likelihood
    if config.grad_mode == "replay":
        return replay_value_and_grad(lambda terms: objective(terms, batch, config), params, model_config,
                                     batch["tokens"], noise, lik)
    return jax.value_and_grad(
        lambda p: objective(likelihood_terms(p, model_config, batch["tokens"], noise, lik), batch, config),
        has_aux=True)(params)


def make_rl_step(model_config: ModelConfig, config: RLConfig, tx: optax.GradientTransformation) -> Callable:
    """`step(state, batch, key) -> (state, metrics)`, one optimizer update, not yet jitted.

    `state` is `train.TrainState` (so checkpointing and shardings are the trainer's); `batch`
    holds the rollouts with `advantages`, `old_terms` (and `ref_terms`), and `key` is the rollout
    batch's noise key: the same one for the old / reference terms and all mu inner updates (common
    random numbers). `tx` is e.g. `train.make_optimizer(cfg)`. Jit with `model_config` and
    `config` closed over and `donate_argnums=0`.
    """

    def step(state: TrainState, batch: Batch, key: PRNGKeyArray):
        (_, metrics), grads = loss_and_grad(state.params, batch, key, model_config=model_config, config=config)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), \
            dict(metrics, grad_norm=optax.tree.norm(grads))

    return step
