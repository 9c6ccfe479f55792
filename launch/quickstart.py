r"""The main job on its built-in default: train a tiny LLaDA2 model from scratch on an offline task,
align it with RL against the task's verifier, and measure both with Draft-and-Edit decoding.
Minutes on a CPU, nothing downloaded.

  python launch/quickstart.py --workdir=/tmp/llada_quickstart
  python launch/quickstart.py --config.rl.algorithm=espo   # or dipo: same task, same stages
  python launch/quickstart.py --seeds=0,1,2 --algorithms=ebpo,espo,dipo --sft_longer_steps=2000

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

The study behind the README's table: `--seeds` repeats the pipeline per training seed (the
config's seed in <workdir>, the others in <workdir>/seed_<s>), `--algorithms` runs several RL
algorithms from each seed's SFT model, and `--sft_longer_steps` adds the longer-SFT control
(<dir>/sft_longer: imitation given more steps instead of a verifier). The report keeps every
seed's results (`by_seed`, merged across commands) and their mean, std, min and max
(`summary`); the table prints them.

On several processes (the hosts flags, or none on a TPU pod / under SLURM; README "Many
hosts") every stage runs across them: each process trains on and decodes its share, the
held-out evaluation gathers every process's rows, and process 0 alone prints and writes the
report and the curves. The likelihood cost (stage 3's timing) is measured on one process only
(bench/rl.py measures it on its own).

  for i in 0 1; do XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
    python launch/quickstart.py --workdir=/tmp/qs_two_hosts \
      --coordinator_address=127.0.0.1:12355 --num_processes=2 --process_id=$i & done; wait
"""

import copy
import json
import os
import time
from typing import Optional

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from llada_jax import launcher, rl, train
from llada_jax.evaluation import heldout, plots
from llada_jax.parallel import hosts
from llada_jax.rl import loop as rl_loop
from llada_jax.timing import time_call

FLAGS = flags.FLAGS
hosts.define_flags()  # --coordinator_address, --num_processes, --process_id
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart.py")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Run config (configs/*.py[:args]).", lock_config=True)
flags.DEFINE_string("workdir", "/tmp/llada_quickstart", "Checkpoints, metrics, tokenizer, data and report.json.")
flags.DEFINE_integer("eval_examples", 256, "Held-out examples decoded per mode.")
flags.DEFINE_list("modes", ["S", "Q"], "Decoding presets to evaluate.")
flags.DEFINE_integer("rl_steps", None, "RL steps (default: the config's rl_stage.steps; 0 skips RL).")
flags.DEFINE_integer("rl_eval_every", 10, "RL stage: greedy held-out evaluation (validation split, first of "
                     "--modes) every this many steps and before the first, for the curves (0: off).")
flags.DEFINE_integer("rl_eval_examples", 64, "RL stage: validation examples of those evaluations.")
flags.DEFINE_list("seeds", [], "Training seeds, each a whole SFT -> RL pipeline (default: the config's seed); "
                  "the report gives the mean, std, min and max over them.")
flags.DEFINE_list("algorithms", [], "RL algorithms run from each seed's SFT model (default: config.rl.algorithm).")
flags.DEFINE_integer("sft_longer_steps", 0, "The longer-SFT control: also train SFT for total_steps + this "
                     "many steps (per seed, its own schedule) and evaluate it beside RL (0: off).")


def rl_stage_config(cfg, workdir: str):
    """The RL stage's run config (`rl_loop.stage_config`, --rl_steps) reading the SFT run's data."""
    out = rl_loop.stage_config(cfg, FLAGS.rl_steps)
    with out.unlocked():
        out.data.data_dir = cfg.data.data_dir or os.path.join(workdir, "data")
        # Stage 4 reports the test split; during RL, points on validation show the run working.
        out.rl.eval_every = FLAGS.rl_eval_every
        out.rl.eval_split = "validation"
        out.rl.eval_examples = FLAGS.rl_eval_examples
        out.rl.eval_modes = tuple(FLAGS.modes[:1])
    return out


def held_out(params, model_config, tokenizer, cfg, examples, mesh) -> dict:
    """Accuracy, mean reward and TPF per mode; with `mesh`, every process decodes its share."""
    gen_length = cfg.data.seq_len - max(len(p) for p in heldout.prompts_and_metas(examples, tokenizer,
                                                                                     cfg.data.template)[0])
    out = {}
    for mode in FLAGS.modes:
        r = heldout.evaluate(params, model_config, tokenizer, examples, mode=mode, gen_length=max(gen_length, 1),
                              block_length=cfg.objective.block_size, template=cfg.data.template, mesh=mesh)
        out[mode] = {"accuracy": r["accuracy"], "reward": r["reward"], "tpf": r["tpf"]}
    return out


def likelihood_cost(params, model_config, tokenizer, cfg, examples) -> dict:
    """EBPO's vectorized likelihood terms against the per-block loop they replace, timed side by
    side on one rollout batch of the run's shape (P prompts x G samples from `params`)."""
    r = cfg.rl
    prompts = heldout.prompts_and_metas(examples[:r.prompts_per_step], tokenizer, cfg.data.template)[0]
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


ROW_NAMES = {"sft": "SFT", "sft_longer": "SFT+", "ebpo": "EBPO", "espo": "ESPO", "dipo": "DiPO"}


def seed_dir(workdir: str, seed: int, config_seed: int) -> str:
    """Where one training seed's runs live: the workdir itself for the config's seed (so the
    default run's checkpoints are reused), `<workdir>/seed_<s>` for the others."""
    return workdir if seed == config_seed else os.path.join(workdir, f"seed_{seed}")


def with_seed(cfg, seed: int, **fields):
    """A copy of the run config with another seed and `section__name=value` fields."""
    out = copy.deepcopy(cfg)  # typed placeholders stay typed (rl_loop.stage_config)
    with out.unlocked():
        out.seed = seed
        for k, v in fields.items():
            section, name = k.split("__") if "__" in k else (None, k)
            (out[section] if section else out)[name] = v
    return out


def summarize(by_seed: dict) -> dict:
    """Per row (SFT, SFT+, each RL algorithm) and mode: mean, std, min and max over the seeds
    that have it."""
    rows: dict = {}
    for seed_result in by_seed.values():
        for row, by_mode in seed_result.items():
            for mode, m in by_mode.items():
                if isinstance(m, dict) and "accuracy" in m:
                    cell = rows.setdefault(row, {}).setdefault(mode, {})
                    for k in ("accuracy", "reward", "tpf"):
                        cell.setdefault(k, []).append(m[k])
    return {row: {mode: {k: heldout.spread(v) for k, v in cell.items()} for mode, cell in by_mode.items()}
            for row, by_mode in rows.items()}


def story(by_seed: dict, fast: str = "S", careful: Optional[str] = "Q") -> dict:
    """What the main job is meant to show, per training seed: each RL algorithm's lift of
    held-out accuracy over its SFT model (points, in mode `fast`), and for every row the speed
    of `fast` against `careful` (TPF ratio) with the accuracy it costs (points, careful - fast;
    none without `careful`). With the spread over seeds of each figure and its minimum (what
    holds on every seed)."""
    lift, speed = {}, {}
    for seed, result in sorted(by_seed.items()):
        sft = result.get("sft", {})
        for row, by_mode in result.items():
            if careful is not None and fast in by_mode and careful in by_mode:
                f, c = by_mode[fast], by_mode[careful]
                speed.setdefault(row, {})[seed] = {
                    "tpf_ratio": f["tpf"] / c["tpf"] if c["tpf"] > 0 else float("nan"),
                    "accuracy_cost_points": 100.0 * (c["accuracy"] - f["accuracy"])}
            if row in rl_loop.INNER_UPDATES and fast in by_mode and fast in sft:
                lift.setdefault(row, {})[seed] = 100.0 * (by_mode[fast]["accuracy"] - sft[fast]["accuracy"])
    out = {"modes": [fast, careful] if careful is not None else [fast],
           "rl_lift_points": {a: dict(by_seed=v, **heldout.spread(list(v.values()))) for a, v in lift.items()},
           "speed": {row: {"by_seed": v, "tpf_ratio": heldout.spread([x["tpf_ratio"] for x in v.values()]),
                           "accuracy_cost_points": heldout.spread([x["accuracy_cost_points"] for x in v.values()])}
                     for row, v in speed.items()}}
    return out


def main(argv):
    del argv
    t0 = time.perf_counter()
    cfg, workdir = FLAGS.config, FLAGS.workdir
    seeds = [int(s) for s in FLAGS.seeds] or [cfg.seed]
    algorithms = FLAGS.algorithms or [cfg.rl.algorithm]
    for a in algorithms:
        if a not in rl_loop.INNER_UPDATES:
            raise app.UsageError(f"--algorithms: expected names in {sorted(rl_loop.INNER_UPDATES)}, found {a!r}")
    run = launcher.setup(cfg, workdir)
    model_config, tokenizer = run.config, run.tokenizer
    obj = train.build_objective(cfg, model_config, extra_special_ids=tokenizer.special_ids)
    rl_steps = rl_stage_config(cfg, workdir).total_steps
    stages = 4 if rl_steps > 0 else 2
    say = print if hosts.is_primary() else (lambda *args, **kw: None)  # process 0 alone reports
    # On several processes the params stay global arrays (no process holds them all) and the
    # evaluation decodes across the run's mesh; one process brings them to the host, as
    # before, to free the device for the next stage, and decodes them on its default device.
    several = jax.process_count() > 1
    mesh = run.mesh if several else None
    to_host = (lambda params: params) if several else jax.device_get
    examples = list(train.open_examples(cfg, workdir, "test"))[:FLAGS.eval_examples]

    by_seed, runs, cost, eval_seconds = {}, {}, None, None
    for seed in seeds:
        base = seed_dir(workdir, seed, cfg.seed)
        scfg = with_seed(cfg, seed)
        tag = f" (seed {seed})" if len(seeds) > 1 or seed != cfg.seed else ""
        say(f"[1/{stages}] SFT{tag}: {cfg.model.preset} model ({model_config.param_counts()['total']:,} parameters) "
            f"on '{cfg.data.task}', {cfg.total_steps} steps, batch {cfg.data.batch_size}, block "
            f"{cfg.objective.block_size}", flush=True)
        sft_dir = os.path.join(base, "sft")
        state = train.run_training(scfg, sft_dir, model_config, obj, train.train_iterator(scfg, workdir, tokenizer))
        sft_params = to_host(state.params)
        del state
        say(f"[2/{stages}] evaluation of the SFT model on {len(examples)} held-out examples", flush=True)
        t_eval = time.perf_counter()
        result = {"sft": held_out(sft_params, model_config, tokenizer, cfg, examples, mesh)}
        eval_seconds = eval_seconds or time.perf_counter() - t_eval
        runs[seed] = {"sft_dir": sft_dir}
        if FLAGS.sft_longer_steps > 0:  # the control: the same SFT run, longer (its own schedule)
            longer = with_seed(cfg, seed, total_steps=cfg.total_steps + FLAGS.sft_longer_steps)
            say(f"      control: SFT for {longer.total_steps} steps{tag}", flush=True)
            state = train.run_training(longer, os.path.join(base, "sft_longer"), model_config, obj,
                                       train.train_iterator(longer, workdir, tokenizer))
            result["sft_longer"] = held_out(to_host(state.params), model_config, tokenizer, cfg, examples, mesh)
            del state
        for algorithm in algorithms if rl_steps > 0 else []:
            rl_cfg = rl_stage_config(with_seed(cfg, seed, rl__algorithm=algorithm), workdir)
            r = rl_cfg.rl
            say(f"[3/{stages}] RL{tag}: {r.algorithm.upper()} from the SFT model, {rl_cfg.total_steps} steps of "
                f"{r.prompts_per_step} prompts x {r.group_size} rollouts ({r.preset} mode, temperature "
                f"{r.temperature}), {rl_loop.inner_updates(rl_cfg)} updates each, lr {rl_cfg.optim.lr:g}", flush=True)
            rl_dir = os.path.join(base, f"rl_{algorithm}")  # each algorithm resumes its own run
            state = rl_loop.run_rl(rl_cfg, rl_dir, model_config, tokenizer, init_params=sft_params)
            rl_params = to_host(state.params)
            del state
            say(f"[4/{stages}] evaluation of the {r.algorithm.upper()} model", flush=True)
            result[algorithm] = dict(held_out(rl_params, model_config, tokenizer, cfg, examples, mesh),
                                     steps=rl_cfg.total_steps)
            runs[seed][algorithm] = rl_cfg, rl_dir
            if cost is None and jax.process_count() == 1:  # a timing of one process's programs
                cost = likelihood_cost(rl_params, model_config, tokenizer, rl_cfg, examples)
        by_seed[str(seed)] = result
    if not hosts.is_primary():
        return

    # The report's single-run fields (and the curves) come from the config's seed when it ran.
    first, alg0 = (cfg.seed if cfg.seed in seeds else seeds[0]), algorithms[0]
    path = os.path.join(workdir, "report.json")
    # Earlier commands' seeds and algorithms (other --seeds, --algorithms, --config.rl.algorithm)
    # stay in the report; this command's results replace theirs.
    previous = {}
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f).get("by_seed", {})
    merged = {s: dict(previous.get(s, {}), **res) for s, res in {**previous, **by_seed}.items()}
    last = train.read_metrics(runs[first]["sft_dir"])[-1]
    report = {"task": cfg.data.task, "seeds": sorted(int(s) for s in merged),
              "sft": by_seed[str(first)]["sft"],
              "train": {"steps": cfg.total_steps, "final_loss": last["loss"], "masked_acc": last.get("masked_acc")}}
    if alg0 in runs[first]:
        rl_cfg, rl_dir = runs[first][alg0]
        every = train.read_metrics(rl_dir)
        rows = [r for r in every if "reward_mean" in r]  # step 0 holds only the held-out point
        key = f"eval_{rl_cfg.rl.eval_modes[0]}_accuracy" if rl_cfg.rl.eval_modes else None
        report["rl"] = {m: v for m, v in by_seed[str(first)][alg0].items() if m != "steps"}
        report["rl_run"] = {"algorithm": alg0, "steps": rl_cfg.total_steps,
                            "inner_updates": rl_loop.inner_updates(rl_cfg),
                            "rollout_reward_first": rows[0].get("reward_mean"),
                            "rollout_reward_last": rows[-1].get("reward_mean"),
                            "validation_accuracy_by_step": {r["step"]: r[key] for r in every if key in r}}
    report["rl_by_algorithm"] = {a: m for a, m in merged.get(str(first), {}).items() if a in rl_loop.INNER_UPDATES}
    if cost is not None:
        report["likelihood_cost"] = cost
    report["by_seed"] = merged
    report["summary"] = summarize(merged)
    report["story"] = story(merged, *FLAGS.modes[:2]) if len(FLAGS.modes) > 1 else story(merged, FLAGS.modes[0], None)
    report.update(eval_examples=len(examples), eval_seconds_per_model=round(eval_seconds, 1),
                  seconds=round(time.perf_counter() - t0, 1))
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)

    n = len(merged)
    print(f"\nheld-out {cfg.data.task}, {len(examples)} examples, greedy decoding"
          + (f"; mean over {n} training seeds {report['seeds']}, ± the std, [min, max]" if n > 1 else ""))
    print(f"{'stage':<6} {'mode':<5} {'accuracy':>9} {'reward':>8} {'TPF':>6}" + ("  accuracy spread" if n > 1 else ""))
    order = ["sft", "sft_longer", *rl_loop.INNER_UPDATES]
    for row in sorted(report["summary"], key=order.index):
        for mode, m in report["summary"][row].items():
            acc = m["accuracy"]
            extra = f"  ±{acc['std']:.3f} [{acc['min']:.3f}, {acc['max']:.3f}] n={acc['n']}" if n > 1 else ""
            name = "RL" if n == 1 and len(report["rl_by_algorithm"]) <= 1 and row in rl_loop.INNER_UPDATES \
                else ROW_NAMES[row]
            print(f"{name:<6} {mode:<5} {acc['mean']:>9.3f} {m['reward']['mean']:>8.3f} {m['tpf']['mean']:>6.2f}{extra}")
    if "story" in report:
        st = report["story"]
        fast, careful = (st["modes"] + [None])[:2]
        for alg, v in st["rl_lift_points"].items():
            seeds = ", ".join(f"seed {s} {x:+.1f}" for s, x in v["by_seed"].items())
            print(f"{ROW_NAMES[alg]} lift of {fast} accuracy over SFT, points: {seeds} (min {v['min']:+.1f})")
        for row in sorted(st["speed"], key=order.index):
            v = st["speed"][row]
            print(f"{fast} vs {careful}, {ROW_NAMES[row]}: TPF {v['tpf_ratio']['mean']:.2f}x "
                  f"(min {v['tpf_ratio']['min']:.2f}x) at {v['accuracy_cost_points']['mean']:+.1f} points of accuracy "
                  f"(worst {v['accuracy_cost_points']['max']:+.1f})")
    if "likelihood_cost" in report:
        c = report["likelihood_cost"]
        print(f"likelihood terms on a rollout batch ({c['rollouts']} x {c['length']} tokens, {c['completion_blocks']:.1f} "
              f"completion blocks of {c['block']}, N={c['timesteps']}): vectorized {c['vectorized_s'] * 1e3:.1f} ms, "
              f"per-block loop {c['per_block_loop_s'] * 1e3:.1f} ms ({c['loop_over_vectorized']:.2f}x)")
    print(f"\nSFT: final train loss {last['loss']:.4f}, masked-token accuracy {last.get('masked_acc', float('nan')):.3f}; "
          f"{report['seconds']:.0f} s in all")
    print(f"report: {path}")
    curves_dir = seed_dir(workdir, first, cfg.seed)
    plots.training_curves(curves_dir, rl_dir=f"rl_{alg0}" if "rl" in report else None)
    print(f"training curves: {curves_dir}/training_curves.png")


if __name__ == "__main__":
    app.run(main)
