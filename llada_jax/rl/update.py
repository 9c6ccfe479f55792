"""The RL update step a loop jits (`make_rl_step`): θ_old's terms, the loss and its gradient (direct or replay)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, PRNGKeyArray

from llada_jax.model import lora
from llada_jax.model.config import ModelConfig
from llada_jax.rl.batches import batch_arrays
from llada_jax.rl.configs import Batch, DiPOConfig, RLConfig
from llada_jax.rl.likelihood import likelihood_terms, replay_value_and_grad, sample_noise
from llada_jax.rl.losses import (METRIC_REDUCTIONS, OBJECTIVES, dipo_batch, dipo_objective, dipo_token_logprobs,
                                weight_count)
from llada_jax.train.trainer import TrainState


def policy_terms(params, batch: Batch, key: PRNGKeyArray, *, model_config: ModelConfig,
                 config: RLConfig) -> Array:
    """What the losses compare θ against, e.g. the reference's `batch['ref_terms']` (and θ_old's
    when it is computed apart from the update: `make_rl_step` computes θ_old's own terms in the
    update program, see there). EBPO / ESPO: ELBO terms [B, N, K] with the update's key; DiPO:
    per-write log-probs [B, L, W] (`key` unused)."""
    if isinstance(config, DiPOConfig):
        return dipo_token_logprobs(params, model_config, dipo_batch(batch, config), config)
    b = batch_arrays(batch, config.likelihood.block_size)
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
                  on_policy=None, to_model: Optional[Callable] = None, total=None):
    """`((loss, metrics), grads)` of the method that `config` names, in its `grad_mode`.

    `on_policy` (a bool, traced or not): θ_old == θ, so θ_old's terms are θ's own from this same
    program (gradient stopped) and `batch['old_terms']` is ignored (it may be absent). Computing
    them in a separate forward-only program is not enough in bf16: XLA fuses the two programs
    differently and the ratio at θ == θ_old drifts from 1 with the completion length. `metrics`
    carries θ's terms under "policy_terms" (the next inner update's θ_old). `to_model` maps the
    differentiated tree to the model's params (LoRA: adapters -> `lora.combine(base, ...)`).
    `total`: the whole update's `losses.weight_count` when `batch` is one micro-batch of it (the
    loss and gradient are then this micro-batch's share of the update's; None: `batch` is all).
    """
    if to_model is not None and getattr(config, "grad_mode", "direct") == "replay":
        raise ValueError("rl.grad_mode: expected 'direct' with lora.rank > 0 (replay differentiates the model's "
                         "own params), found 'replay'")
    to_model = to_model or (lambda p: p)
    if isinstance(config, DiPOConfig):
        required = ("advantages",) + (("old_terms",) if on_policy is None else ()) + \
                   (("ref_terms",) if config.beta > 0 else ())
        batch = dipo_batch(batch, config, required)

        def dipo(p):
            logp = dipo_token_logprobs(to_model(p), model_config, batch, config)
            loss, metrics = dipo_objective(logp, _with_old(batch, logp, on_policy), config, total)
            return loss, dict(metrics, policy_terms=jax.lax.stop_gradient(logp))

        return jax.value_and_grad(dipo, has_aux=True)(params)
    objective = OBJECTIVES[type(config)]
    required = ("advantages",) + (("old_terms",) if on_policy is None else ()) + \
               (("ref_terms",) if config.beta > 0 else ())
    batch = batch_arrays(batch, config.likelihood.block_size, required)
    noise = sample_noise(key, batch["completion_mask"], config.likelihood, batch["example_ids"])
    lik = config.likelihood

    def of_terms(terms):
        loss, metrics = objective(terms, _with_old(batch, terms, on_policy), config, total)
        return loss, dict(metrics, policy_terms=jax.lax.stop_gradient(terms))

    if config.grad_mode == "replay":
        return replay_value_and_grad(of_terms, params, model_config, batch["tokens"], noise, lik,
                                     batch["completion_mask"])
    return jax.value_and_grad(
        lambda p: of_terms(likelihood_terms(to_model(p), model_config, batch["tokens"], noise, lik,
                                            batch["completion_mask"])),
        has_aux=True)(params)


def make_rl_step(model_config: ModelConfig, config: RLConfig, tx: optax.GradientTransformation,
                 lora_config: Optional[lora.LoraConfig] = None, accum_steps: int = 1) -> Callable:
    """`step(state, batch, key, on_policy=None) -> (state, metrics, terms)`, one optimizer update,
    not yet jitted.

    `state` is `train.TrainState` (so checkpointing and shardings are the trainer's); `batch`
    holds the rollouts with `advantages` (and `ref_terms`); `key` is the rollout batch's noise
    key, the same one for all mu inner updates (common random numbers). θ_old's terms: pass
    `on_policy=True` on the first inner update (θ == θ_old: the step uses its own terms, so the
    ratio is exactly 1 in any precision) and feed the FIRST update's returned `terms` as
    `batch['old_terms']` to every later one with `on_policy=False` (`run_inner_updates` does;
    a later update's own returned terms are θ_{i-1}'s, not the rollout policy's); keeping `old_terms` in the batch throughout (any
    values on the first update) lets one compiled program serve all mu updates. `on_policy=None`
    reads `batch['old_terms']` as given. `tx` is e.g. `train.make_optimizer(cfg)`. Jit with
    `model_config` and `config` closed over and the state donated.

    With `accum_steps > 1` the update is accumulated over that many micro-batches (activation
    memory of one) with the objective unchanged, as the trainer's SFT step does: the objective's
    count (`losses.weight_count`: kept samples, DiPO's scored writes) is taken over the whole
    batch first, each micro-batch's loss, gradient and metrics are its share against that total,
    and they are summed (`ratio_min` / `ratio_max` reduced by min / max). Micro-batch a holds rows
    a, a + A, a + 2A, ... (A = `accum_steps`): a batch split over devices by rows keeps every
    micro-batch on every device. The examples keep their `example_ids`, so the noise is the
    unaccumulated step's; `terms` come back in the batch's row order. The batch's rows must be a
    multiple of `accum_steps`.

    With an enabled `lora_config` the state's params are the adapters and the step is
    `step(state, batch, key, on_policy, base)`: the policy is `lora.combine(base, adapters)` (no
    dropout: the scored policy is the one that sampled), the base a frozen argument.
    """
    use_lora = lora_config is not None and lora_config.enabled
    if not (isinstance(accum_steps, (int, np.integer)) and accum_steps >= 1):
        raise ValueError(f"optim.accum_steps: expected an integer >= 1, found {accum_steps!r}")
    block = config.block_size if isinstance(config, DiPOConfig) else config.likelihood.block_size

    def step(state: TrainState, batch: Batch, key: PRNGKeyArray, on_policy=None, base=None):
        to_model = (lambda ad: lora.combine(base, lora.prepare(ad, lora_config))) if use_lora else None
        grad_of = lambda mb, total=None: loss_and_grad(state.params, mb, key, model_config=model_config,
                                                       config=config, on_policy=on_policy, to_model=to_model,
                                                       total=total)
        if accum_steps == 1:
            (_, metrics), grads = grad_of(batch)
            terms = metrics.pop("policy_terms")
        else:
            # Row ids and the sample mask filled in over the whole batch: the noise is keyed by them.
            full = batch_arrays(batch, block)
            b = full["tokens"].shape[0]
            if b % accum_steps:
                raise ValueError(f"optim.accum_steps: expected a divisor of the update's {b} rollouts, found "
                                 f"{accum_steps}")
            total = weight_count(full, config)
            split = lambda x: jnp.swapaxes(jnp.reshape(x, (b // accum_steps, accum_steps) + x.shape[1:]), 0, 1)
            micro = jax.tree_util.tree_map(split, full)  # [A, B/A, ...]: micro-batch a = rows a, a + A, ...

            def body(acc, mb):
                (_, m), g = grad_of(mb, total)
                t = m.pop("policy_terms")
                m = {k: METRIC_REDUCTIONS.get(k, (jnp.add,))[0](acc[1][k], v) for k, v in m.items()}
                return (jax.tree_util.tree_map(jnp.add, acc[0], g), m), t

            shapes = jax.eval_shape(lambda mb: grad_of(mb, total), jax.tree_util.tree_map(lambda x: x[0], micro))
            (_, m_shape), g_shape = shapes
            init = (jax.tree_util.tree_map(jnp.zeros_like, g_shape),
                    {k: jnp.full(v.shape, METRIC_REDUCTIONS.get(k, (None, 0.0))[1], v.dtype)
                     for k, v in m_shape.items() if k != "policy_terms"})
            (grads, metrics), terms = jax.lax.scan(body, init, micro)
            terms = jnp.reshape(jnp.swapaxes(terms, 0, 1), (b,) + terms.shape[2:])
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), \
            dict(metrics, grad_norm=optax.tree.norm(grads)), terms

    return step


def run_updates(step: Callable, state: TrainState, batches: Sequence[dict], key: PRNGKeyArray, mu: int,
                on_policy_first: bool = True) -> tuple[TrainState, list]:
    """μ epochs over a rollout batch's mini-batches (verl's `ppo_mini_batch_size`): μ x len(batches)
    updates with `step` (`make_rl_step`'s, jitted), mini-batches in order within each epoch, one
    noise key throughout.

    θ_old is the policy that drew the rollouts in every update, so each mini-batch's
    `old_terms` stay as given for all μ epochs. With `on_policy_first` (θ == θ_old at the first
    update) the first mini-batch's come from the first update's own program (`on_policy=True`:
    exact ratio 1 in any precision) and are set in `batches[0]`; the other mini-batches must
    bring θ_old's terms, taken before the first update (`policy_terms`). Without it (pipelining:
    the rollouts are from the params before the previous update) every mini-batch brings its
    own. Returns the new state and each update's metrics, in order.
    """
    metrics = []
    for epoch in range(mu):
        for j, batch in enumerate(batches):
            first = on_policy_first and epoch == 0 and j == 0
            state, m, terms = step(state, batch, key, np.bool_(first))
            if first:
                batch["old_terms"] = terms
            metrics.append(m)
    return state, metrics


def run_inner_updates(step: Callable, state: TrainState, batch: dict, key: PRNGKeyArray,
                      mu: int) -> tuple[TrainState, list]:
    """The μ inner updates of one rollout batch with `step` (`make_rl_step`'s, jitted).

    θ_old is the policy that drew the rollouts, for every update: the first update computes its
    terms in its own program (`on_policy=True`) and they stay `batch['old_terms']` for updates
    2..μ. (Feeding each update's returned terms to the next would clip update i against θ_{i-1}:
    the clip would bound each step and not the drift from the rollout policy.) `batch` gets
    `old_terms`; returns the new state and each update's metrics. One mini-batch of `run_updates`.
    """
    return run_updates(step, state, [batch], key, mu)
