"""The RL settings: likelihood, EBPO, ESPO and DiPO configs, validated on construction (field, expected, found)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Union

from llada_jax.model.config import ConfigError


VECTORIZE = ("batch", "scan")
RATIO_LEVELS = ("sequence", "block")
WEIGHTINGS = ("rate", "count")
NORMALIZATIONS = ("none", "token")
KL_ESTIMATORS = ("k1", "k2", "k3")
GRAD_MODES = ("direct", "replay")
# Local step of an empty slot of the DiPO write record: never visible, never scored.
NEVER = 2 ** 30
# log-ratios are clamped here before exp: beyond it the update has already diverged and an inf
# ratio would turn the surrogate (and its gradient) into inf/NaN.
MAX_LOG_RATIO = 20.0

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


def _check_temperature(owner, obj):
    if not obj.temperature > 0.0:
        _fail(owner, "temperature", "a value > 0 (the rollout temperature; 1.0 for greedy rollouts)",
              obj.temperature)


def _check_dual_clip(owner, obj):
    if obj.dual_clip is not None and not obj.dual_clip > 1.0:
        _fail(owner, "dual_clip", "None or a value > 1", obj.dual_clip)


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
    t_floor: smallest mask rate; bounds the 1/t weight of the "rate" weighting.
    vectorize: "batch" runs the N composite forwards as one [B*N, 2L] call (fastest, N x the
      activations); "scan" runs them one after another under `lax.scan`.
    weighting: how a block's masked log-probs are scaled into its ELBO term. "rate": by 1/t (the
      ELBO of REFERENCE §4; unbiased, its variance grows as t -> t_floor). "count": by
      (completion tokens of the block) / (masked tokens of the block), the realised rate instead
      of the drawn one (what MDLM-style token-mean objectives do; lower variance, a block with no
      masked token contributes 0).
    temperature, exclude_mask: the token distribution scored, which should be the one the
      rollouts sampled from: `softmax(logits / temperature)` with the mask id removed from the
      normaliser (the decoder never proposes it). Pass the rollout temperature (greedy rollouts
      have no density: keep 1.0). Top-k / top-p sampling is not modelled: its support depends on
      the decoding-time context, which the ELBO's random masks do not reproduce.
    """

    block_size: int = 32
    num_timesteps: int = 8
    coupled: bool = False
    t_floor: float = 1e-3
    vectorize: str = "batch"
    weighting: str = "rate"
    temperature: float = 1.0
    exclude_mask: bool = True

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
        _check_choice(owner, self, "weighting", WEIGHTINGS)
        _check_temperature(owner, self)

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
    normalize: "none" is the paper's `log rho = sum_n w_n sum_k Δelbo`; "token" divides it by the
      sample's completion tokens (ESPO's per-token normalisation), so a long completion's ratio
      does not grow with its length.
    dual_clip: None (the paper's PPO clip), or c > 1: for A < 0 the objective is floored at c*A
      (dual-clip PPO), which bounds d loss / d log rho by c|A| where the plain clip lets rho*A grow
      without limit.
    """

    likelihood: LikelihoodConfig = LikelihoodConfig()
    eps_low: float = 0.2
    eps_high: float = 0.28
    ratio_level: str = "sequence"
    kl_estimator: str = "k2"
    beta: float = 0.0
    grad_mode: str = "direct"
    normalize: str = "none"
    dual_clip: Optional[float] = None

    def __post_init__(self):
        _check_eps("EBPOConfig", self)
        _check_choice("EBPOConfig", self, "normalize", NORMALIZATIONS)
        _check_dual_clip("EBPOConfig", self)
        _check_choice("EBPOConfig", self, "ratio_level", RATIO_LEVELS)
        _check_choice("EBPOConfig", self, "kl_estimator", KL_ESTIMATORS)
        _check_choice("EBPOConfig", self, "grad_mode", GRAD_MODES)


@dataclasses.dataclass(frozen=True)
class ESPOConfig:
    """ESPO (REFERENCE §6): the completion is one action, `rho = exp(ΔELBO / L)`, k2 KL
    `0.5 * (ELBO_theta - ELBO_ref)^2 / L`, coupled estimator with num_mc = likelihood.num_timesteps
    (default 2: one mask and its complement). L is each sample's number of completion tokens (the
    generation length when `completion_mask` covers the whole generated canvas, as
    `pack_rollouts` scores). ESPO's mu = 8 inner updates per rollout batch is a loop setting
    (`rl.inner_updates`, whose default is 8 for ESPO): the step runs mu times with the same batch,
    old terms and key."""

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
      the batch's longest block (`dipo_num_steps`); writes at a later index are not scored and
      counted in the `unscored_tokens` metric. Static: bucket it to limit recompiles.
    beta: k3 KL to the reference per write (0 = off).
    temperature, exclude_mask: the sampling distribution of the rollouts (see `LikelihoodConfig`).
    """

    block_size: int = 32
    num_steps: int = 32
    eps_low: float = 0.2
    eps_high: float = 0.28
    beta: float = 0.0
    vectorize: str = "scan"
    temperature: float = 1.0
    exclude_mask: bool = True

    def __post_init__(self):
        _check_int("DiPOConfig", self, "block_size")
        _check_int("DiPOConfig", self, "num_steps")
        _check_eps("DiPOConfig", self)
        _check_choice("DiPOConfig", self, "vectorize", VECTORIZE)
        _check_temperature("DiPOConfig", self)


RLConfig = Union[EBPOConfig, ESPOConfig, DiPOConfig]
