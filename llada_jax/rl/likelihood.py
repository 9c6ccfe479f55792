"""Likelihood estimators for block diffusion: the vectorized block-level ELBO terms and their per-block oracle.

Everything here is a pure function of arrays, static configs and explicit keys (REFERENCE §6):

* Vectorized likelihood (`sample_noise`, `likelihood_terms`): the block-level ELBO terms
  `elbo[b, n, k] = sum_{masked completion tokens i in block k} log p(y_i | z_n, x; M) / t[b, n, k]`
  (the ELBO weighting of REFERENCE §4) for every block k and timestep n, from ONE composite
  `[x_t ; x_0]` forward per timestep under the BD3-LM mask (REFERENCE §3, via
  `objectives.per_token_logprobs`). The N timesteps run as one batched call or a `lax.scan`.

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
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from llada_jax.model.config import ModelConfig
from llada_jax.rl.configs import LikelihoodConfig
from llada_jax.train import objectives


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
    distribution and weighting as `likelihood_terms`; the cost comparison is `bench/rl.py`'s
    and the quickstart's."""
    from llada_jax import model  # the model import stays out of the pure-function API
    from llada_jax.model import masks

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
