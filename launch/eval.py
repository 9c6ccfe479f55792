r"""Evaluate a checkpoint on benchmark files in their public formats, in several decoding modes.

  python launch/eval.py --checkpoint=/ckpt/LLaDA2.1-mini --benchmark=gsm8k_test.jsonl \
      --modes=S,Q,Q+mbe --gen_length=512 --block_length=32 --out_dir=/tmp/eval_gsm8k
  python launch/eval.py --checkpoint=/tmp/llada_quickstart/rl_ebpo/checkpoints \
      --benchmark=/tmp/llada_quickstart/data/addition_test.jsonl --template=plain --modes=S,Q,no_edit

Formats (detected from the first record, or --format): GSM8K question/answer, MATH
problem/solution, HumanEval prompt/test/entry_point, MBPP text/test_list, and the project's
task records (messages or prompt, with meta). Modes: S, Q, no_edit, llada20, `+mbe` for
Multi-Block Editing (--mbe_window blocks, --mbe_attention bidirectional or block_causal),
`:threshold=..,editing_threshold=..` overrides (`Q:threshold=0.8`).

Writes to --out_dir: samples/<mode>.jsonl (every sample: prompt, completion, reward, why it
failed, tokens, forwards), summary.json (per mode: accuracy, reward, TPF, TPS with compilation
excluded, tokens) and table.md, printed at the end. A rerun with the same --out_dir skips the
samples already written (an interrupted run resumes). Decodes on --mesh=data,fsdp,tensor,expert
(default every device on data; tensor / expert shard the weights instead of replicating them),
the batch split over the batch axes, parameters loaded straight into their shards. --dtype
(default: the checkpoint's) and --quantize=int8|fp8 (weight-only, per-block scales) choose how
the model runs.

On several hosts (the same command on every one: no extra flags on a TPU pod or under SLURM,
--coordinator_address/--num_processes/--process_id elsewhere; README "Many hosts") each
process decodes its rows of every batch, the completions are gathered, and process 0 alone
scores them and writes --out_dir (which it alone needs to see).

Speed-accuracy sweep: --sweep_thresholds and --sweep_editing add the grid of modes
`Q:threshold=t,editing_threshold=e` to --modes, and the Pareto plot of accuracy vs TPF is
written as <out_dir>/speed_accuracy.png beside summary.json (also with --plot alone):

  python launch/eval.py --checkpoint=... --benchmark=... --out_dir=/tmp/sweep \
      --modes=S,Q,no_edit,S+mbe,Q+mbe --sweep_thresholds=0.5,0.7,0.9 --sweep_editing=0.0,0.5,0.9
"""

import json
import sys

from absl import app, flags

from llada_jax import launcher
from llada_jax.evaluation import benchmarks, plots
from llada_jax.parallel import hosts
from llada_jax.rewards import sandbox

FLAGS = flags.FLAGS
hosts.define_flags()  # --coordinator_address, --num_processes, --process_id
flags.DEFINE_string("checkpoint", None, "Orbax checkpoint directory or Hugging Face directory.", required=True)
flags.DEFINE_string("tokenizer", None, "tokenizer.json (file or directory); default: the checkpoint's.")
flags.DEFINE_string("benchmark", None, "JSONL benchmark file.", required=True)
flags.DEFINE_enum("format", "auto", ["auto", *benchmarks.FORMATS], "Record format.")
flags.DEFINE_integer("limit", None, "Evaluate the first N examples only.")
flags.DEFINE_enum("template", "chat", ["chat", "plain"], "Prompt template (plain: the toy tasks' format).")
flags.DEFINE_string("fewshot_file", None, "JSONL (same formats) whose first --num_fewshot examples precede each prompt.")
flags.DEFINE_integer("num_fewshot", 0, "Few-shot turns taken from --fewshot_file.")
flags.DEFINE_list("modes", ["S", "Q"], "Decoding modes (see the module docstring).")
flags.DEFINE_integer("mbe_window", 2, "Blocks edited by Multi-Block Editing in a '+mbe' mode.")
flags.DEFINE_enum("mbe_attention", "bidirectional", ["bidirectional", "block_causal"],
                  "Attention inside the MBE window of a '+mbe' mode (block_causal: REFERENCE §5's first form).")
flags.DEFINE_integer("gen_length", 256, "Tokens to generate per prompt (at most).")
flags.DEFINE_integer("block_length", 32, "Block size B.")
flags.DEFINE_integer("max_post_steps", 16, "Editing steps allowed after a block has no masks.")
flags.DEFINE_integer("batch_size", 16, "Prompts decoded together (a multiple of the device count).")
flags.DEFINE_integer("workers", 4, "Parallel scoring workers (code runs in sandbox subprocesses).")
flags.DEFINE_float("code_timeout_s", 10.0, "Wall-clock limit of one program's tests in the sandbox.")
flags.DEFINE_string("moe_impl", None, "Override the MoE back end (dense is faster on CPU).")
flags.DEFINE_string("out_dir", None, "Where samples, summary.json and table.md go.", required=True)
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_list("sweep_thresholds", [], "Grid of unmasking thresholds tau_mask (with --sweep_editing).")
flags.DEFINE_list("sweep_editing", [], "Grid of editing thresholds tau_edit (with --sweep_thresholds).")
flags.DEFINE_bool("plot", False, "Write speed_accuracy.png (always on with a sweep).")
flags.DEFINE_string("mesh", "-1,1,1,1", "Mesh as data,fsdp,tensor,expert sizes (-1: the remaining devices); "
                    "weights sharded by the rule table, batches over data x fsdp x expert.")
launcher.define_model_flags()  # --dtype, --quantize, --quant_block


def main(argv):
    del argv
    examples = benchmarks.read_benchmark(FLAGS.benchmark, FLAGS.format, FLAGS.limit)
    if FLAGS.num_fewshot:
        if not FLAGS.fewshot_file:
            raise app.UsageError("--num_fewshot needs --fewshot_file")
        shots = benchmarks.read_benchmark(FLAGS.fewshot_file, FLAGS.format, FLAGS.num_fewshot)
        examples = benchmarks.with_fewshot(examples, shots)
    if bool(FLAGS.sweep_thresholds) != bool(FLAGS.sweep_editing):
        raise app.UsageError("--sweep_thresholds and --sweep_editing go together")
    grid = [f"Q:threshold={t},editing_threshold={e}" for t in FLAGS.sweep_thresholds for e in FLAGS.sweep_editing]
    modes = [benchmarks.parse_mode(m, FLAGS.mbe_window, FLAGS.mbe_attention) for m in [*FLAGS.modes, *grid]]
    launcher.start_runtime()  # before the mesh touches a device
    mesh = launcher.parse_mesh(FLAGS.mesh)
    config, params, tok, _ = launcher.load(FLAGS.checkpoint, FLAGS.tokenizer, FLAGS.moe_impl, mesh=mesh,
                                           **launcher.model_flag_values())
    prompts = benchmarks.render_prompts(examples, tok, FLAGS.template)
    complete = benchmarks.decoder(params, config, tok, gen_length=FLAGS.gen_length, block_length=FLAGS.block_length,
                                  batch_size=FLAGS.batch_size, mesh=mesh, max_post_steps=FLAGS.max_post_steps)
    settings = {"checkpoint": FLAGS.checkpoint, "benchmark": FLAGS.benchmark, "template": FLAGS.template,
                "num_fewshot": FLAGS.num_fewshot, "gen_length": FLAGS.gen_length,
                "block_length": FLAGS.block_length, "max_post_steps": FLAGS.max_post_steps}
    if FLAGS.mbe_attention != "bidirectional":  # only then, so that runs from before the flag still resume
        settings["mbe_attention"] = FLAGS.mbe_attention
    if FLAGS.dtype:  # likewise: a different precision is a different run
        settings["dtype"] = FLAGS.dtype
    if FLAGS.quantize:
        settings.update(quantize=FLAGS.quantize, quant_block=FLAGS.quant_block)
    code_config = sandbox.SandboxConfig(timeout_s=FLAGS.code_timeout_s)
    summary = benchmarks.run_eval(examples, prompts, complete, modes, FLAGS.out_dir, batch_size=FLAGS.batch_size,
                                  workers=FLAGS.workers, code_config=code_config, settings=settings,
                                  progress=FLAGS.progress)
    if not hosts.is_primary():
        return
    print(benchmarks.format_table(summary))
    print(json.dumps(summary))
    print(f"wrote {FLAGS.out_dir}/summary.json, table.md and samples/", file=sys.stderr)
    if grid or FLAGS.plot:
        path = f"{FLAGS.out_dir}/speed_accuracy.png"
        plots.speed_accuracy(summary, path, title=f"{FLAGS.benchmark.rsplit('/', 1)[-1]}: accuracy vs TPF")
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
