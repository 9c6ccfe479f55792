r"""Variance of EBPO's sequence log-ratio across noise draws, per estimator setting (REFERENCE §6).

  python launch/quickstart.py --workdir=/tmp/llada_quickstart       # makes the two checkpoints
  python bench/estimator.py --workdir=/tmp/llada_quickstart  # SFT as θ_old, RL as θ

The ratio EBPO clips is `log rho = sum_k mean_n (elbo_θ[n, k] - elbo_old[n, k])`, estimated with
random masks; the same masks serve θ and θ_old (common random numbers), so its spread across
noise keys is the estimator's, not the policy change's. For one rollout batch of the RL model
on held-out prompts (P x G samples, the run's shape), this prints one JSON object: per setting
(`t_floor` x `weighting`), the standard deviation of log rho across `--keys` noise keys,
averaged over samples, next to the mean |log rho| (the signal it measures).

One process on this machine's devices (a single-host measurement: no distributed runtime).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from llada_jax import rl, train
from llada_jax.evaluation import heldout
from llada_jax.rl import loop as rl_loop
from llada_jax.train import checkpoint

FLAGS = flags.FLAGS
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart.py")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "The quickstart's run config.", lock_config=True)
flags.DEFINE_string("workdir", "/tmp/llada_quickstart", "A finished quickstart run (sft/ and rl/ checkpoints).")
flags.DEFINE_integer("keys", 16, "Noise keys per setting.")
flags.DEFINE_list("t_floors", ["0.001", "0.05", "0.1", "0.2"], "Smallest mask rates to compare.")
flags.DEFINE_list("weightings", list(rl.WEIGHTINGS), "ELBO weightings to compare.")


def main(argv):
    del argv
    cfg, workdir = FLAGS.config, FLAGS.workdir
    model_config = train.build_model_config(cfg)
    tokenizer = train.load_tokenizer(cfg, workdir)
    _, old = checkpoint.load_params(os.path.join(workdir, "sft", "checkpoints"), config=model_config)
    _, new = checkpoint.load_params(os.path.join(workdir, "rl_ebpo", "checkpoints"), config=model_config)
    r = cfg.rl
    examples = list(train.open_examples(cfg, workdir, "validation"))[:r.prompts_per_step]
    prompts = heldout.prompts_and_metas(examples, tokenizer, cfg.data.template)[0]
    out = rl_loop.rollout(new, model_config, prompts, cfg, jax.random.key(0))
    length = rl_loop.bucket(cfg.data.seq_len, cfg.objective.block_size)
    batch = rl.pack_rollouts([p for p in prompts for _ in range(r.group_size)], out.tokens, length,
                             pad_id=tokenizer.pad_id, gen_length=r.gen_length)
    tokens, mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["completion_mask"])
    result = {"rollouts": int(tokens.shape[0]), "completion_tokens": int(mask.sum(-1).max()),
              "block": cfg.objective.block_size, "keys": FLAGS.keys, "settings": []}
    for weighting in FLAGS.weightings:
        for t_floor in map(float, FLAGS.t_floors):
            lik = rl.LikelihoodConfig(block_size=cfg.objective.block_size, t_floor=t_floor, weighting=weighting,
                                      temperature=float(r.temperature) if r.temperature > 0 else 1.0)
            terms = jax.jit(lambda p, k, lik=lik: rl.likelihood_terms(
                p, model_config, tokens, rl.sample_noise(k, mask, lik), lik, mask))
            log_rho = np.stack([np.asarray((terms(new, k) - terms(old, k)).mean(1).sum(-1))
                                for k in jax.random.split(jax.random.key(1), FLAGS.keys)])  # [keys, B]
            result["settings"].append({"weighting": weighting, "t_floor": t_floor,
                                       "std_log_rho": round(float(log_rho.std(0).mean()), 4),
                                       "mean_abs_log_rho": round(float(np.abs(log_rho.mean(0)).mean()), 4)})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    app.run(main)
