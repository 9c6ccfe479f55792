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
import functools
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
WEIGHTINGS = ("rate", "count")
NORMALIZATIONS = ("none", "token")
KL_ESTIMATORS = ("k1", "k2", "k3")
GRAD_MODES = ("direct", "replay")
# Local step of an empty slot of the DiPO write record: never visible, never scored.
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


# ---------------------------------------------------------------------------------------- batches
def pack_rollouts(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], length: int, *,
                  pad_id: int, gen_length: Optional[int] = None, score_padding: bool = True) -> dict[str, np.ndarray]:
    """Host-side packing of rollouts into the ELBO methods' batch layout, like the decoder's canvas.

    Row i is `prompts[i] + completions[i]` then `pad_id` (EOS) up to `length`. `completion_mask`
    covers exactly what the policy generated: the completion and, with `score_padding` (LLaDA
    fills the canvas with EOS and SFT trains on that fill), its EOS fill up to `gen_length`
    tokens after the prompt, the length `generate` returned (required then). Positions past
    `P + gen_length` are layout padding, never scored. DiPO takes the decoder's whole trajectory
    instead: `pack_trajectory`.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"pack_rollouts: expected as many completions as prompts ({len(prompts)}), "
                         f"found {len(completions)}")
    if score_padding and gen_length is None:
        raise ValueError("pack_rollouts: gen_length: expected the generation length the rollouts were decoded "
                         "with (the EOS fill is scored up to it), found None")
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n_p, n_c = len(p), len(c)
        end = n_p + (gen_length if score_padding else n_c)
        if n_p + n_c > length or end > length or (score_padding and n_c > gen_length):
            raise ValueError(f"pack_rollouts: row {i}: expected completion <= gen_length={gen_length} and prompt + "
                             f"generation <= length={length}, found prompt {n_p}, completion {n_c}")
        tokens[i, :n_p], tokens[i, n_p:n_p + n_c] = p, c
        mask[i, n_p:end] = True
    return {"tokens": tokens, "completion_mask": mask}


def pack_trajectory(out, length: int, *, pad_id: int) -> dict[str, np.ndarray]:
    """DiPO's batch from a `decoding.GenerateOutput` decoded with `record_trajectory=True`.

    tokens [B, L]: each row's final canvas up to its canvas length (everything the decoder wrote,
    past the answer's first EOS and past `P + gen_length` included), `pad_id` after.
    completion_mask [B, L]: the decoded positions (prompt end to canvas end).
    write_step / write_token [B, L, W]: every write of every position with its denoising step
    (-1 = empty slot), as the decoder recorded them. `length` must cover every canvas and be a
    multiple of the block size.
    """
    t = out.trajectory
    if t is None:
        raise ValueError("pack_trajectory: out.trajectory: expected the write record of "
                         "generate(..., record_trajectory=True), found None")
    n, canvas_len = out.canvas.shape
    longest = int(np.max(out.canvas_lengths))
    if length < longest:
        raise ValueError(f"pack_trajectory: length: expected >= the longest canvas ({longest}), found {length}")
    w = t.write_step.shape[-1]
    tokens = np.full((n, length), pad_id, np.int32)
    mask = np.zeros((n, length), bool)
    steps = np.full((n, length, w), -1, np.int32)
    written = np.full((n, length, w), pad_id, np.int32)
    for i in range(n):
        p, c = int(t.prompt_lengths[i]), int(out.canvas_lengths[i])
        tokens[i, :c] = out.canvas[i, :c]
        mask[i, p:c] = True
        steps[i, :c], written[i, :c] = t.write_step[i, :c], t.write_token[i, :c]
    return {"tokens": tokens, "completion_mask": mask, "write_step": steps, "write_token": written}


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
    shapes = {"completion_mask": (b, length), "advantages": (b,), "sample_mask": (b,), "example_ids": (b,)}
    if "write_step" in out:
        shapes["write_step"] = shapes["write_token"] = (b, length, jnp.shape(out["write_step"])[-1])
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


def sampling_logprobs(logits: Float[Array, "R L V"], targets: Int[Array, "R L"], *, temperature: float,
                      exclude_id: Optional[int]) -> Float[Array, "R L"]:
    """log q(target) under the decoder's sampling distribution: `softmax(logits / temperature)`
    with `exclude_id` (the mask id, which the decoder never proposes) out of the normaliser."""
    logits = logits.astype(jnp.float32)
    if exclude_id is not None:
        logits = jnp.where(jnp.arange(logits.shape[-1]) == exclude_id, -jnp.inf, logits)
    return objectives.token_logprobs(logits / temperature, targets)


def policy_logprobs(params, model_config: ModelConfig, x_t: Int[Array, "R L"], x_0: Int[Array, "R L"],
                    targets: Int[Array, "R L"], block_size: int, *, temperature: float = 1.0,
                    exclude_mask: bool = True) -> Float[Array, "R L"]:
    """`log q(targets[i] | x_t, clean blocks of x_0 before i's block)` from one composite forward,
    q the sampling distribution (`sampling_logprobs`), read from the noisy half's hidden states
    through the chunked lm_head (`model.output_stats`: no [R, L, V] logits)."""
    from llada_jax import model  # the model import stays out of the pure-function API

    hidden = objectives.denoiser_hidden(params, model_config, x_t, x_0, block_size)
    return model.output_stats(params, model_config, hidden, targets, temperature=temperature,
                              normaliser_exclude_id=model_config.mask_token_id if exclude_mask else None)["logp"]


def _elbo_rows(params, model_config: ModelConfig, tokens: Int[Array, "R L"], masked: Bool[Array, "R L"],
               t: Float[Array, "R K"], config: LikelihoodConfig,
               completion: Bool[Array, "R L"]) -> Float[Array, "R K"]:
    """Per-block masked-token ELBO of R noised rows from one composite forward."""
    bs = config.block_size
    x_t = jnp.where(masked, model_config.mask_token_id, tokens)
    logp = policy_logprobs(params, model_config, x_t, tokens, tokens, bs, temperature=config.temperature,
                           exclude_mask=config.exclude_mask)
    sums = objectives.per_block_sums(jnp.where(masked, logp, 0.0), bs)
    if config.weighting == "count":
        n_masked = objectives.per_block_sums(masked.astype(jnp.float32), bs)
        n_tokens = objectives.per_block_sums(completion.astype(jnp.float32), bs)
        return sums * n_tokens / jnp.maximum(n_masked, 1.0)
    return sums / t


def likelihood_terms(params, model_config: ModelConfig, tokens: Int[Array, "B L"], noise: Noise,
                     config: LikelihoodConfig,
                     completion_mask: Optional[Bool[Array, "B L"]] = None) -> Float[Array, "B N K"]:
    """The ELBO terms `elbo[b, n, k]` of every block and timestep, one composite forward per n.

    Block k's term conditions on the clean blocks before it (prompt included) and on its own
    unmasked tokens; its sum over k is timestep n's ELBO estimate of `log p(completion | prompt)`.
    `completion_mask` is needed by the "count" weighting (default: every position).
    """
    b, n, length = noise.masked.shape
    if completion_mask is None:
        completion_mask = jnp.ones((b, length), bool)
    if config.vectorize == "batch":
        rows = _elbo_rows(params, model_config, jnp.repeat(tokens, n, axis=0), noise.masked.reshape(b * n, length),
                          noise.t.reshape(b * n, -1), config, jnp.repeat(completion_mask, n, axis=0))
        return rows.reshape(b, n, -1)

    def body(_, xs):
        masked, t = xs
        return None, _elbo_rows(params, model_config, tokens, masked, t, config, completion_mask)

    _, terms = jax.lax.scan(body, None, (noise.masked.swapaxes(0, 1), noise.t.swapaxes(0, 1)))
    return terms.swapaxes(0, 1)


def per_block_likelihood_terms(model_config: ModelConfig, config: LikelihoodConfig) -> Callable:
    """The slow oracle of `likelihood_terms`: `fn(params, tokens, noise) -> [B, N, K]`, block by
    block. Per block k, one block-causal forward over [clean blocks < k, noisy block k] with all
    N timesteps as batch rows (K forwards of growing length instead of N composite ones), as a
    straightforward implementation runs it: a Python loop over one jitted program per prefix
    length (one program unrolling every block compiled for minutes at L = 2048). Same sampling
    distribution and weighting as `likelihood_terms`; the cost comparison is `launch/bench_rl.py`'s
    and the quickstart's."""
    from llada_jax import masks, model  # the model import stays out of the pure-function API

    block = config.block_size
    exclude = model_config.mask_token_id if config.exclude_mask else None

    @functools.partial(jax.jit, static_argnums=(4,))
    def one_block(params, x_0, x_t, masked, start):
        end = start + block
        inp = jnp.concatenate([x_0[:, :start], x_t[:, start:end]], axis=1)
        logits = model.forward(params, model_config, inp, mask=masks.block_causal(end, block))[:, start:]
        logp = sampling_logprobs(logits, x_0[:, start:end], temperature=config.temperature, exclude_id=exclude)
        return jnp.where(masked[:, start:end], logp, 0.0).sum(-1), masked[:, start:end].sum(-1)

    def fn(params, tokens, noise: Noise, completion_mask=None):
        b, n, length = noise.masked.shape
        x_0 = jnp.repeat(tokens, n, axis=0)  # [B*N, L]
        masked = noise.masked.reshape(b * n, length)
        x_t = jnp.where(masked, model_config.mask_token_id, x_0)
        sums, counts = zip(*(one_block(params, x_0, x_t, masked, start) for start in range(0, length, block)))
        sums, counts = jnp.stack(sums, -1), jnp.stack(counts, -1)
        if config.weighting == "count":
            comp = jnp.ones((b, length), bool) if completion_mask is None else completion_mask
            n_tok = jnp.repeat(objectives.per_block_sums(comp.astype(jnp.float32), block), n, axis=0)
            return (sums * n_tok / jnp.maximum(counts, 1)).reshape(b, n, -1)
        return (sums / noise.t.reshape(b * n, -1)).reshape(b, n, -1)

    return fn


def replay_value_and_grad(objective: Callable[[Array], tuple[Array, dict]], params, model_config: ModelConfig,
                          tokens: Int[Array, "B L"], noise: Noise, config: LikelihoodConfig,
                          completion_mask: Optional[Bool[Array, "B L"]] = None):
    """`((loss, metrics), grads)` of `objective(likelihood_terms(params))` in activation memory of
    one timestep (REFERENCE §6, Memory).

    The terms are computed without gradient; `c = d loss / d elbo` ([B, N, K], one scalar per
    sample, timestep and block) comes from differentiating the cheap objective; then each
    timestep's forward is replayed under `lax.scan` and `grad sum(elbo_n(params) * c_n)` is
    accumulated. By the chain rule this is the exact gradient; it costs one extra forward per
    timestep.
    """
    if completion_mask is None:
        completion_mask = jnp.ones(tokens.shape, bool)
    terms = likelihood_terms(params, model_config, tokens, noise, config, completion_mask)
    (loss, metrics), cotangent = jax.value_and_grad(objective, has_aux=True)(terms)

    def body(acc, xs):
        masked, t, c = xs
        g = jax.grad(lambda p: jnp.sum(_elbo_rows(p, model_config, tokens, masked, t, config, completion_mask) * c))(
            params)
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


def clipped_surrogate(log_ratio: Array, advantages: Array, eps_low: float, eps_high: float,
                      dual_clip: Optional[float] = None) -> tuple[Array, Array, Array]:
    """PPO's `min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)` per unit; with `dual_clip = c`,
    floored at `c A` where A < 0 (dual-clip PPO: the gradient vanishes once rho > c).

    Returns (objective, clipped, rho); `clipped` marks units whose gradient the clip removes
    (rho above 1 + eps_high with A > 0, below 1 - eps_low or above c with A < 0).
    """
    ratio = jnp.exp(jnp.clip(log_ratio, -_MAX_LOG_RATIO, _MAX_LOG_RATIO))
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
    tokens_per_block = objectives.per_block_sums(batch["completion_mask"].astype(jnp.float32), bs)  # [B, K]
    if config.ratio_level == "sequence":
        log_ratio, weight, a = delta.sum(-1), _mean_weight(keep), adv
        ref_lr = None if ref is None else ref_delta.sum(-1)
        if config.normalize == "token":
            n = jnp.maximum(tokens_per_block.sum(-1), 1.0)
            log_ratio, ref_lr = log_ratio / n, None if ref_lr is None else ref_lr / n
    else:
        blocks = tokens_per_block > 0
        per_sample = blocks / jnp.maximum(blocks.sum(-1, keepdims=True), 1)
        log_ratio, weight, a = delta, per_sample * _mean_weight(keep)[:, None], adv[:, None]
        ref_lr = ref_delta
        if config.normalize == "token":
            n = jnp.maximum(tokens_per_block, 1.0)
            log_ratio, ref_lr = log_ratio / n, None if ref_lr is None else ref_lr / n
    kl = None if ref is None else kl_estimate(ref_lr, config.kl_estimator)
    loss, metrics = policy_loss(log_ratio, a, weight, config.eps_low, config.eps_high, kl, config.beta,
                                config.dual_clip)
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


def _dipo_batch(batch: Batch, config: DiPOConfig, required: Sequence[str] = ()) -> dict[str, Array]:
    return _batch_arrays(batch, config.block_size, ("write_step", "write_token", *required))


def dipo_objective(logp: Float[Array, "B L W"], batch: Batch,
                   config: DiPOConfig) -> tuple[Float[Array, ""], dict[str, Array]]:
    """DiPO's loss as a function of θ's per-write log-probs (batch from `_dipo_batch`)."""
    local = dipo_local_steps(batch["write_step"], config.block_size)
    written = (local < NEVER) & batch["completion_mask"][..., None] & batch["sample_mask"][:, None, None]
    scored = written & (local < config.num_steps)
    ref = _ref_terms(batch, config.beta)
    kl = None if ref is None else kl_estimate(ref - logp, "k3")
    adv = jnp.broadcast_to(batch["advantages"].astype(jnp.float32)[:, None, None], logp.shape)
    loss, metrics = policy_loss(logp - batch["old_terms"], adv, _mean_weight(scored), config.eps_low,
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
    batch = _dipo_batch(batch, config, required)
    return dipo_objective(dipo_token_logprobs(params, model_config, batch, config), batch, config)


# ---------------------------------------------------------------------------------------- the update
def policy_terms(params, batch: Batch, key: PRNGKeyArray, *, model_config: ModelConfig,
                 config: RLConfig) -> Array:
    """What the losses compare θ against, e.g. the reference's `batch['ref_terms']` (and θ_old's
    when it is computed apart from the update: `make_rl_step` computes θ_old's own terms in the
    update program, see there). EBPO / ESPO: ELBO terms [B, N, K] with the update's key; DiPO:
    per-write log-probs [B, L, W] (`key` unused)."""
    if isinstance(config, DiPOConfig):
        return dipo_token_logprobs(params, model_config, _dipo_batch(batch, config), config)
    b = _batch_arrays(batch, config.likelihood.block_size)
    noise = sample_noise(key, b["completion_mask"], config.likelihood, b["example_ids"])
    return likelihood_terms(params, model_config, b["tokens"], noise, config.likelihood, b["completion_mask"])


def terms_shape(batch: Batch, config: RLConfig) -> tuple[int, ...]:
    """The shape of `policy_terms` for a batch: [B, N, K] ELBO terms, DiPO's [B, L, W] write log-probs."""
    if isinstance(config, DiPOConfig):
        return tuple(np.shape(batch["write_step"]))
    b, length = np.shape(batch["tokens"])
    return (b, config.likelihood.num_timesteps, -(-length // config.likelihood.block_size))


def _with_old(batch: dict, terms: Array, on_policy) -> dict:
    """θ_old's terms: θ's own (gradient stopped) when `on_policy`, else the batch's."""
    if on_policy is None:
        return batch
    old = jax.lax.stop_gradient(terms)
    if "old_terms" in batch:
        old = jnp.where(on_policy, old, batch["old_terms"])
    return dict(batch, old_terms=old)


def loss_and_grad(params, batch: Batch, key: PRNGKeyArray, *, model_config: ModelConfig, config: RLConfig,
                  on_policy=None):
    """`((loss, metrics), grads)` of the method that `config` names, in its `grad_mode`.

    `on_policy` (a bool, traced or not): θ_old == θ, so θ_old's terms are θ's own from this same
    program (gradient stopped) and `batch['old_terms']` is ignored (it may be absent). Computing
    them in a separate forward-only program is not enough in bf16: XLA fuses the two programs
    differently and the ratio at θ == θ_old drifts from 1 with the completion length. `metrics`
    carries θ's terms under "policy_terms" (the next inner update's θ_old).
    """
    if isinstance(config, DiPOConfig):
        required = ("advantages",) + (("old_terms",) if on_policy is None else ()) + \
                   (("ref_terms",) if config.beta > 0 else ())
        batch = _dipo_batch(batch, config, required)

        def dipo(p):
            logp = dipo_token_logprobs(p, model_config, batch, config)
            loss, metrics = dipo_objective(logp, _with_old(batch, logp, on_policy), config)
            return loss, dict(metrics, policy_terms=jax.lax.stop_gradient(logp))

        return jax.value_and_grad(dipo, has_aux=True)(params)
    objective = _OBJECTIVES[type(config)]
    required = ("advantages",) + (("old_terms",) if on_policy is None else ()) + \
               (("ref_terms",) if config.beta > 0 else ())
    batch = _batch_arrays(batch, config.likelihood.block_size, required)
    noise = sample_noise(key, batch["completion_mask"], config.likelihood, batch["example_ids"])
    lik = config.likelihood

    def of_terms(terms):
        loss, metrics = objective(terms, _with_old(batch, terms, on_policy), config)
        return loss, dict(metrics, policy_terms=jax.lax.stop_gradient(terms))

    if config.grad_mode == "replay":
        return replay_value_and_grad(of_terms, params, model_config, batch["tokens"], noise, lik,
                                     batch["completion_mask"])
    return jax.value_and_grad(
        lambda p: of_terms(likelihood_terms(p, model_config, batch["tokens"], noise, lik, batch["completion_mask"])),
        has_aux=True)(params)


def make_rl_step(model_config: ModelConfig, config: RLConfig, tx: optax.GradientTransformation) -> Callable:
    """`step(state, batch, key, on_policy=None) -> (state, metrics, terms)`, one optimizer update,
    not yet jitted.

    `state` is `train.TrainState` (so checkpointing and shardings are the trainer's); `batch`
    holds the rollouts with `advantages` (and `ref_terms`); `key` is the rollout batch's noise
    key, the same one for all mu inner updates (common random numbers). θ_old's terms: pass
    `on_policy=True` on the first inner update (θ == θ_old: the step uses its own terms, so the
    ratio is exactly 1 in any precision) and feed the returned `terms` as `batch['old_terms']` to
    the later ones with `on_policy=False`; keeping `old_terms` in the batch throughout (any
    values on the first update) lets one compiled program serve all mu updates. `on_policy=None`
    reads `batch['old_terms']` as given. `tx` is e.g. `train.make_optimizer(cfg)`. Jit with
    `model_config` and `config` closed over and the state donated.
    """

    def step(state: TrainState, batch: Batch, key: PRNGKeyArray, on_policy=None):
        (_, metrics), grads = loss_and_grad(state.params, batch, key, model_config=model_config, config=config,
                                            on_policy=on_policy)
        terms = metrics.pop("policy_terms")
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), \
            dict(metrics, grad_norm=optax.tree.norm(grads)), terms

    return step
