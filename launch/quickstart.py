r"""The main job on its built-in default: train a tiny LLaDA2 model from scratch on an offline task
and measure it with Draft-and-Edit decoding. Minutes on a CPU, nothing downloaded.

  python launch/quickstart.py --workdir=/tmp/llada_quickstart

Stages: SFT (block-diffusion M2T + T2T, configs/quickstart.py), then held-out evaluation in S and
Q modes (accuracy, mean reward, tokens per forward). Prints a table and writes
<workdir>/report.json. Rerunning resumes training from its last checkpoint. Any config field can
be overridden, e.g. --config.total_steps=1000 or --config=configs/quickstart.py:task=sudoku4x4.
"""

import json
import os
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from llada_jax import evaluate, train

FLAGS = flags.FLAGS
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart.py")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Run config (configs/*.py[:args]).", lock_config=True)
flags.DEFINE_string("workdir", "/tmp/llada_quickstart", "Checkpoints, metrics, tokenizer and report.json.")
flags.DEFINE_integer("eval_examples", 256, "Held-out examples decoded per mode.")
flags.DEFINE_list("modes", ["S", "Q"], "Decoding presets to evaluate.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    t0 = time.perf_counter()
    cfg, workdir = FLAGS.config, FLAGS.workdir
    train.enable_compilation_cache()
    model_config = train.build_model_config(cfg)
    tokenizer = train.load_tokenizer(cfg, workdir)
    train.check_tokenizer(model_config, tokenizer)
    obj = train.build_objective(cfg, model_config, extra_special_ids=tokenizer.special_ids)

    print(f"[1/2] SFT: {cfg.model.preset} model ({model_config.param_counts()['total']:,} parameters) on "
          f"'{cfg.data.task}', {cfg.total_steps} steps, batch {cfg.data.batch_size}, block {cfg.objective.block_size}",
          flush=True)
    state = train.run_training(cfg, workdir, model_config, obj, train.train_iterator(cfg, workdir, tokenizer))
    params = jax.device_get(state.params)
    last = train.read_metrics(workdir)[-1]

    print(f"[2/2] evaluation on {FLAGS.eval_examples} held-out examples", flush=True)
    examples = list(train.open_examples(cfg, workdir, "test"))[:FLAGS.eval_examples]
    gen_length = cfg.data.seq_len - max(len(p) for p in evaluate.prompts_and_metas(examples, tokenizer, cfg.data.template)[0])
    results = {}
    for mode in FLAGS.modes:
        results[mode] = evaluate.evaluate(params, model_config, tokenizer, examples, mode=mode,
                                          gen_length=max(gen_length, 1), block_length=cfg.objective.block_size,
                                          template=cfg.data.template)

    report = {
        "task": cfg.data.task,
        "sft": {m: {"accuracy": r["accuracy"], "reward": r["reward"], "tpf": r["tpf"]} for m, r in results.items()},
        "train": {"steps": int(state.step), "final_loss": last["loss"], "masked_acc": last.get("masked_acc")},
        "eval_examples": len(examples),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    path = os.path.join(workdir, "report.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)

    print(f"\n{'stage':<6} {'mode':<5} {'accuracy':>9} {'reward':>8} {'TPF':>6}")
    for mode, r in results.items():
        print(f"{'SFT':<6} {mode:<5} {r['accuracy']:>9.3f} {r['reward']:>8.3f} {r['tpf']:>6.2f}")
    print(f"\nfinal train loss {last['loss']:.4f}, masked-token accuracy {last.get('masked_acc', float('nan')):.3f}; "
          f"{report['seconds']:.0f} s in all")
    print(f"report: {path}")


if __name__ == "__main__":
    app.run(main)
