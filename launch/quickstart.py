r"""The main job on its built-in default: train a tiny LLaDA2 model from scratch on an offline task,
align it with RL against the task's verifier, and measure both with Draft-and-Edit decoding.
Minutes on a CPU, nothing downloaded.

  python launch/quickstart.py --workdir=/tmp/llada_quickstart
  python launch/quickstart.py --config.rl.algorithm=espo   # or dipo: same task, same stages

Stages (configs/quickstart.py):
  1. SFT: block-diffusion M2T + T2T training from scratch (<workdir>/sft).
  2. Held-out evaluation of the SFT model in S and Q modes (accuracy, mean reward, TPF).
  3. RL from the SFT params (EBPO by default) with rollouts from the jitted decoder
     (<workdir>/rl_<algorithm>), and the cost of EBPO's vectorized likelihood terms against the
     per-block loop on a rollout batch of the run's shape.
  4. The same evaluation of the RL model.
Prints a table and writes <workdir>/report.json. Rerunning resumes each stage from its last
checkpoint; rerunning with another `--config.rl.algorithm` reuses the SFT stage and adds that
algorithm's results to the report's `rl_by_algorithm`. `--rl_steps=0` stops after stage 2.

On several processes (the hosts flags, or none on a TPU pod / under SLURM; README "Many
hosts") every stage runs across them: each process trains on and decodes its share, the
held-out evaluation gathers every process's rows, and process 0 alone prints and writes the
report and the curves. The likelihood cost (stage 3's timing) is measured on one process only
(launch/bench_rl.py measures it on its own).

  for i in 0 1; do XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
    python launch/quickstart.py --workdir=/tmp/qs_two_hosts \
      --coordinator_address=127.0.0.1:12355 --num_processes=2 --process_id=$i & done; wait
"""

import json
import os
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from llada_jax import evaluate, hosts, plots, rl, rl_loop, train
from llada_jax.timing import time_call

FLAGS = flags.FLAGS
hosts.define_flags()  # --coordinator_address, --num_processes, --process_id
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart.py")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Run config (configs/*.py[:args]).", lock_config=True)
flags.DEFINE_string("workdir", "/tmp/llada_quickstart", "Checkpoints, metrics, tokenizer, data and report.json.")
flags.DEFINE_integer("eval_examples", 256, "Held-out examples decoded per mode.")
flags.DEFINE_list("modes", ["S", "Q"], "Decoding presets to evaluate.")
flags.DEFINE_integer("rl_steps", None, "RL steps (default: the config's rl_stage.steps; 0 skips RL).")


def rl_stage_config(cfg, workdir: str):
    """The RL stage's run config (`rl_loop.stage_config`, --rl_steps) reading the SFT run's data."""
    out = rl_loop.stage_config(cfg, FLAGS.rl_steps)
    with out.unlocked():
        out.data.data_dir = cfg.data.data_dir or os.path.join(workdir, "data")
        out.rl.eval_every = 0  # stage 4 evaluates
    return out


def held_out(params, model_config, tokenizer, cfg, examples, mesh) -> dict:
    """Accuracy, mean reward and TPF per mode; every process decodes its share on `mesh`."""
    gen_length = cfg.data.seq_len - max(len(p) for p in evaluate.prompts_and_metas(examples, tokenizer,
                                                                                     cfg.data.template)[0])
    out = {}
    for mode in FLAGS.modes:
        r = evaluate.evaluate(params, model_config, tokenizer, examples, mode=mode, gen_length=max(gen_length, 1),
                              block_length=cfg.objective.block_size, template=cfg.data.template, mesh=mesh)
        out[mode] = {"accuracy": r["accuracy"], "reward": r["reward"], "tpf": r["tpf"]}
    return out


def likelihood_cost(params, model_config, tokenizer, cfg, examples) -> dict:
    """EBPO's vectorized likelihood terms against the per-block loop they replace, timed side by
    side on one rollout batch of the run's shape (P prompts x G samples from `params`)."""
    r = cfg.rl
    prompts = evaluate.prompts_and_metas(examples[:r.prompts_per_step], tokenizer, cfg.data.template)[0]
    out = rl_loop.rollout(params, model_config, prompts, cfg, jax.random.key(cfg.seed))
    length = rl_loop.bucket(cfg.data.seq_len, cfg.objective.block_size)
    batch = rl.pack_rollouts([p for p in prompts for _ in range(r.group_size)], out.tokens, length,
                             pad_id=tokenizer.pad_id, gen_length=r.gen_length)
    lik = rl_loop.build_rl_config(dict_to_ebpo(cfg)).likelihood
    noise = rl.sample_noise(jax.random.key(1), jax.numpy.asarray(batch["completion_mask"]), lik)
    tokens, mask = jax.numpy.asarray(batch["tokens"]), jax.numpy.asarray(batch["completion_mask"])
    fast = jax.jit(lambda p, t, nz, m: rl.likelihood_terms(p, model_config, t, nz, lik, m))
    slow = rl.per_block_likelihood_terms(model_config, lik)
    sec_fast, _, a = time_call(fast, params, tokens, noise, mask, repeats=5)
    sec_slow, _, b = time_call(slow, params, tokens, noise, mask, repeats=5)
    blocks = length // cfg.objective.block_size
    return {"rollouts": len(batch["tokens"]), "length": length, "block": cfg.objective.block_size,
            "completion_blocks": float(batch["completion_mask"].reshape(len(tokens), blocks, -1).any(-1).sum(-1).mean()),
            "timesteps": lik.num_timesteps, "forwards": {"vectorized": 1, "per_block_loop": blocks},
            "vectorized_s": round(sec_fast, 4), "per_block_loop_s": round(sec_slow, 4),
            "loop_over_vectorized": round(sec_slow / sec_fast, 2),
            "max_abs_term_diff": float(np.max(np.abs(np.asarray(a) - np.asarray(b))))}


def dict_to_ebpo(cfg):
    """The run config with the EBPO likelihood (the cost is EBPO's whatever the RL algorithm)."""
    out = cfg.copy_and_resolve_references()
    with out.unlocked():
        out.rl.algorithm = "ebpo"
    return out


def main(argv):
    del argv
    hosts.initialize_from_flags()  # before anything touches a device
    logging.set_verbosity(logging.WARNING)
    t0 = time.perf_counter()
    cfg, workdir = FLAGS.config, FLAGS.workdir
    train.enable_compilation_cache()
    model_config = train.build_model_config(cfg)
    tokenizer = train.load_tokenizer(cfg, workdir)
    train.check_tokenizer(model_config, tokenizer)
    obj = train.build_objective(cfg, model_config, extra_special_ids=tokenizer.special_ids)
    rl_cfg = rl_stage_config(cfg, workdir)
    stages = 4 if rl_cfg.total_steps > 0 else 2
    mesh = train.mesh_from_config(cfg)
    say = print if hosts.is_primary() else (lambda *args, **kw: None)  # process 0 alone reports
    # Params stay global arrays on several processes (no process holds them all); one process
    # brings them to the host, as before, to free the device for the next stage.
    to_host = jax.device_get if jax.process_count() == 1 else (lambda params: params)

    say(f"[1/{stages}] SFT: {cfg.model.preset} model ({model_config.param_counts()['total']:,} parameters) on "
        f"'{cfg.data.task}', {cfg.total_steps} steps, batch {cfg.data.batch_size}, block {cfg.objective.block_size}",
        flush=True)
    sft_dir = os.path.join(workdir, "sft")
    state = train.run_training(cfg, sft_dir, model_config, obj, train.train_iterator(cfg, workdir, tokenizer))
    sft_params = to_host(state.params)
    del state

    examples = list(train.open_examples(cfg, workdir, "test"))[:FLAGS.eval_examples]
    say(f"[2/{stages}] evaluation of the SFT model on {len(examples)} held-out examples", flush=True)
    t_eval = time.perf_counter()
    results = {"SFT": held_out(sft_params, model_config, tokenizer, cfg, examples, mesh)}
    eval_seconds = time.perf_counter() - t_eval

    cost = None
    if rl_cfg.total_steps > 0:
        r = rl_cfg.rl
        say(f"[3/{stages}] RL: {r.algorithm.upper()} from the SFT model, {rl_cfg.total_steps} steps of "
            f"{r.prompts_per_step} prompts x {r.group_size} rollouts ({r.preset} mode, temperature {r.temperature}), "
            f"{rl_loop.inner_updates(rl_cfg)} updates each, lr {rl_cfg.optim.lr:g}", flush=True)
        rl_dir = os.path.join(workdir, f"rl_{r.algorithm}")  # each algorithm resumes its own run
        state = rl_loop.run_rl(rl_cfg, rl_dir, model_config, tokenizer, init_params=sft_params)
        rl_params = to_host(state.params)
        del state
        say(f"[4/{stages}] evaluation of the RL model", flush=True)
        results["RL"] = held_out(rl_params, model_config, tokenizer, cfg, examples, mesh)
        if jax.process_count() == 1:  # a timing of one process's programs
            cost = likelihood_cost(rl_params, model_config, tokenizer, rl_cfg, examples)
    if not hosts.is_primary():
        return

    last = train.read_metrics(sft_dir)[-1]
    report = {"task": cfg.data.task, "sft": results["SFT"],
              "train": {"steps": cfg.total_steps, "final_loss": last["loss"], "masked_acc": last.get("masked_acc")}}
    if "RL" in results:
        rows = train.read_metrics(rl_dir)
        report["rl"] = results["RL"]
        report["rl_run"] = {"algorithm": r.algorithm, "steps": rl_cfg.total_steps,
                            "inner_updates": rl_loop.inner_updates(rl_cfg),
                            "rollout_reward_first": rows[0].get("reward_mean"),
                            "rollout_reward_last": rows[-1].get("reward_mean")}
        if cost is not None:
            report["likelihood_cost"] = cost
    report.update(eval_examples=len(examples), eval_seconds_per_model=round(eval_seconds, 1),
                  seconds=round(time.perf_counter() - t0, 1))
    path = os.path.join(workdir, "report.json")
    # Runs of other algorithms from the same SFT stage (--config.rl.algorithm=...) stay in the report.
    previous = {}
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f).get("rl_by_algorithm", {})
    if "rl" in report:
        previous[report["rl_run"]["algorithm"]] = dict(report["rl"], steps=report["rl_run"]["steps"])
    report["rl_by_algorithm"] = previous
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)

    print(f"\nheld-out {cfg.data.task}, {len(examples)} examples, greedy decoding")
    print(f"{'stage':<6} {'mode':<5} {'accuracy':>9} {'reward':>8} {'TPF':>6}")
    for stage, by_mode in results.items():
        for mode, m in by_mode.items():
            print(f"{stage:<6} {mode:<5} {m['accuracy']:>9.3f} {m['reward']:>8.3f} {m['tpf']:>6.2f}")
    if "likelihood_cost" in report:
        c = report["likelihood_cost"]
        print(f"likelihood terms on a rollout batch ({c['rollouts']} x {c['length']} tokens, {c['completion_blocks']:.1f} "
              f"completion blocks of {c['block']}, N={c['timesteps']}): vectorized {c['vectorized_s'] * 1e3:.1f} ms, "
              f"per-block loop {c['per_block_loop_s'] * 1e3:.1f} ms ({c['loop_over_vectorized']:.2f}x)")
    print(f"\nSFT: final train loss {last['loss']:.4f}, masked-token accuracy {last.get('masked_acc', float('nan')):.3f}; "
          f"{report['seconds']:.0f} s in all")
    print(f"report: {path}")
    plots.training_curves(workdir, rl_dir=f"rl_{rl_cfg.rl.algorithm}" if "rl" in report else None)
    print(f"training curves: {workdir}/training_curves.png")


if __name__ == "__main__":
    app.run(main)
