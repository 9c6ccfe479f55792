"""Reinforcement learning for block diffusion (REFERENCE §6), pure functions of arrays, static
configs and explicit keys, and the loop that drives them:

- `configs`: `LikelihoodConfig`, `EBPOConfig`, `ESPOConfig`, `DiPOConfig`, validated.
- `likelihood`: the vectorized block-level ELBO terms (one composite forward per timestep), the
  per-block oracle, the replay gradient.
- `losses`: KL estimators, the clipped surrogate, EBPO / ESPO / DiPO objectives and losses.
- `advantages`: group-normalised, leave-one-out and z-score advantages.
- `batches`: rollouts and DiPO trajectories into the losses' batch layout.
- `update`: `make_rl_step`, the jitted update with θ_old's terms (accumulated over micro-batches on
  request), and `run_updates`: μ epochs over a step's mini-batches.
- `loop`: `run_rl`, rollouts, rewards, updates, held-out evaluation and checkpoints.

May import everything below it (`evaluation`, `train`, `decode`, `rewards`, `model`, `data`,
`kernels`, `parallel`); only `serve` and the ahead-of-time tools sit above it.
"""

from llada_jax.rl.advantages import group_normalized_advantages, leave_one_out_advantages, zscore_advantages
from llada_jax.rl.batches import batch_arrays, pack_rollouts, pack_trajectory
from llada_jax.rl.configs import (GRAD_MODES, KL_ESTIMATORS, NEVER, NORMALIZATIONS, RATIO_LEVELS, VECTORIZE,
                                  WEIGHTINGS, DiPOConfig, EBPOConfig, ESPOConfig, LikelihoodConfig, RLConfig)
from llada_jax.rl.likelihood import (Noise, likelihood_terms, per_block_likelihood_terms, policy_logprobs,
                                     replay_value_and_grad, sample_noise, sampling_logprobs)
from llada_jax.rl.losses import (clipped_surrogate, dipo_inputs, dipo_local_steps, dipo_loss, dipo_num_steps,
                                 dipo_objective, dipo_token_logprobs, ebpo_loss, ebpo_objective, espo_loss,
                                 espo_objective, kl_estimate, policy_loss)
from llada_jax.rl.update import (loss_and_grad, make_rl_step, policy_terms, run_inner_updates, run_updates,
                                 terms_shape)

__all__ = [
    "DiPOConfig", "EBPOConfig", "ESPOConfig", "GRAD_MODES", "KL_ESTIMATORS", "LikelihoodConfig", "NEVER",
    "NORMALIZATIONS", "Noise", "RATIO_LEVELS", "RLConfig", "VECTORIZE", "WEIGHTINGS", "batch_arrays",
    "clipped_surrogate", "dipo_inputs", "dipo_local_steps", "dipo_loss", "dipo_num_steps", "dipo_objective",
    "dipo_token_logprobs", "ebpo_loss", "ebpo_objective", "espo_loss", "espo_objective",
    "group_normalized_advantages", "kl_estimate", "leave_one_out_advantages", "likelihood_terms", "loss_and_grad",
    "make_rl_step", "pack_rollouts", "pack_trajectory", "per_block_likelihood_terms", "policy_logprobs",
    "policy_loss", "policy_terms", "replay_value_and_grad", "run_inner_updates", "run_updates", "sample_noise",
    "sampling_logprobs", "terms_shape", "zscore_advantages",
]
