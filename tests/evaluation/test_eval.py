"""Benchmark evaluation (llada_jax.evaluation.benchmarks, launch/eval.py): each public format read from a
file made here, scored as a hand check scores it (with a stub completion source), resumed
after an interruption without re-decoding, and one real end-to-end decode on a 2-device mesh."""

import json
import os
import subprocess
import sys

import pytest

from helpers import xla_flags
from llada_jax import launcher, rewards
from llada_jax.evaluation import benchmarks
from llada_jax.rewards import sandbox
from llada_jax.train import metrics

pytestmark = pytest.mark.usefixtures("sandbox_lock")  # runs sandboxed programs: see tests/rewards/test_rewards.py

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = sandbox.SandboxConfig(timeout_s=4.0, test_timeout_s=1.0, cpu_s=4)


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from llada_jax.data.tokenizer import build_task_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_task_tokenizer().save(path)
    from llada_jax.data.tokenizer import Tokenizer

    return Tokenizer.from_file(path), str(path)


_HE_PROMPT = 'from typing import List\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs."""\n'
_HE_TEST = "def check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n"


def _files(tmp_path):
    """One small file per format, and the completion each example gets with its hand-checked reward."""
    files = {
        "gsm8k": [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=7\n#### 7"},
                  {"question": "Half of 10?", "answer": "#### 5"}],
        "math": [{"problem": "Compute 1/2+1/4.", "solution": "It is $\\boxed{\\frac{3}{4}}$."},
                 {"problem": "Expand (x+1)^2.", "solution": "$\\boxed{x^2+2x+1}$"}],
        "humaneval": [{"task_id": f"HE/{i}", "prompt": _HE_PROMPT, "test": _HE_TEST, "entry_point": "total"}
                      for i in range(4)],
        "mbpp": [{"task_id": 11, "text": "Write a function to square a number.",
                  "test_list": ["assert sq(3) == 9", "assert sq(-2) == 4"], "code": "def sq(x):\n    return x * x"},
                 {"task_id": 12, "text": "Write a function to reverse a string.",
                  "test_list": ["assert rev('ab') == 'ba'"]}],
        "task": [{"prompt": "12+34=", "response": "46", "meta": {"task": "addition", "a": 12, "b": 34}},
                 {"messages": [{"role": "user", "content": "5+7="}, {"role": "assistant", "content": "12"}],
                  "meta": {"task": "addition", "a": 5, "b": 7}}],
    }
    completions = {  # (format, index) -> (completion, hand-checked reward, a word of the reason)
        ("gsm8k", 0): ("3 and 4 make \\boxed{7}.", 1.0, ""),
        ("gsm8k", 1): ("Half is 6.", 0.0, "expected 5, found 6"),
        ("math", 0): ("\\boxed{0.75}", 1.0, ""),
        ("math", 1): ("\\boxed{x^2+1}", 0.0, "expected 'x^2+2x+1'"),
        ("humaneval", 0): ("```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```", 1.0, ""),
        ("humaneval", 1): ("    return sum(xs)\n", 1.0, ""),  # a body after the prompt, HumanEval's convention
        ("humaneval", 2): ("```python\ndef total(xs):\n    while True:\n        pass\n```", 0.0, "timeout"),
        ("humaneval", 3): ("```python\ndef total(xs):\n    return xs[0] / 0\n```", 0.0, "ZeroDivisionError: division by zero"),
        ("mbpp", 0): ("```python\ndef sq(x):\n    return x * abs(x)\n```", 0.5, "AssertionError"),
        ("mbpp", 1): ("```python\ndef rev(s):\n    return s[::-1]\n```", 1.0, ""),
        ("task", 0): ("46", 1.0, ""),
        ("task", 1): ("13", 0.0, "13"),
    }
    paths = {fmt: _write(tmp_path / f"{fmt}.jsonl", recs) for fmt, recs in files.items()}
    return paths, completions


def _stub(by_prompt, calls):
    """A completion source answering from a table keyed by prompt id; counts what it decodes."""
    def complete(prompts, mode):
        calls.extend((mode.name, p.id) for p in prompts)
        return benchmarks.Batch([benchmarks.Completion(by_prompt[p.id], 3, 2) for p in prompts], 0.01 * len(prompts), 0.0)
    return complete


def test_each_format_scores_as_a_hand_check_does(tmp_path, tokenizer):
    tok, _ = tokenizer
    paths, completions = _files(tmp_path)
    for fmt, path in paths.items():
        examples = benchmarks.read_benchmark(path)
        assert {e.meta["task"] for e in examples} == {"gsm8k": {"gsm8k"}, "math": {"math"}, "humaneval": {"code"},
                                                      "mbpp": {"code"}, "task": {"addition"}}[fmt]
        template = "plain" if fmt == "task" else "chat"
        prompts = benchmarks.render_prompts(examples, tok, template)
        by_prompt = {e.id: completions[fmt, i][0] for i, e in enumerate(examples)}
        calls = []
        out = tmp_path / f"out_{fmt}"
        summary = benchmarks.run_eval(examples, prompts, _stub(by_prompt, calls), [benchmarks.parse_mode("S")], str(out),
                                      batch_size=3, code_config=FAST, progress=False)
        expected = [completions[fmt, i][1] for i in range(len(examples))]
        rows = [json.loads(line) for line in open(out / "samples" / "S.jsonl")]
        assert [r["reward"] for r in rows] == expected, fmt
        for i, r in enumerate(rows):
            word = completions[fmt, i][2]
            assert (word in r["why"]) if word else r["why"] == "", (fmt, i, r["why"])
            assert r["completion"] == completions[fmt, i][0] and r["prompt"] == prompts[i].text
        s = summary["S"]
        assert s["n"] == len(examples) and s["accuracy"] == sum(e >= 1 for e in expected) / len(examples)
        assert s["reward"] == pytest.approx(sum(expected) / len(examples))
        assert s["tpf"] == 1.5 and s["tokens"] == 3 * len(examples) and s["tps"] == pytest.approx(300)
        assert json.load(open(out / "summary.json")) == summary
        assert "| S |" in (out / "table.md").read_text()
    he = benchmarks.read_benchmark(paths["humaneval"])[2]
    assert he.messages[0]["content"].endswith(_HE_PROMPT + "```")


def test_interrupted_eval_resumes_without_redecoding(tmp_path, tokenizer):
    tok, _ = tokenizer
    paths, completions = _files(tmp_path)
    examples = benchmarks.read_benchmark(paths["gsm8k"]) + benchmarks.read_benchmark(paths["task"])
    examples = [benchmarks.Example(f"{i}", e.messages, e.meta, e.reference) for i, e in enumerate(examples)]
    texts = [completions["gsm8k", 0][0], completions["gsm8k", 1][0], "46", "13"]
    by_prompt = {e.id: t for e, t in zip(examples, texts)}
    prompts = benchmarks.render_prompts(examples, tok)
    modes = [benchmarks.parse_mode("S"), benchmarks.parse_mode("Q+mbe")]
    run = dict(batch_size=1, code_config=FAST, progress=False, settings={"gen_length": 8})

    whole = benchmarks.run_eval(examples, prompts, _stub(by_prompt, []), modes, str(tmp_path / "whole"), **run)

    class Interrupt(Exception):
        pass

    def stop_in_q_mode(mode, done):
        if mode == "Q+mbe" and done == 1:
            raise Interrupt
    first = []
    with pytest.raises(Interrupt):
        benchmarks.run_eval(examples, prompts, _stub(by_prompt, first), modes, str(tmp_path / "cut"),
                            on_batch=stop_in_q_mode, **run)
    with open(tmp_path / "cut" / "samples" / "Q_mbe.jsonl", "a") as f:
        f.write('{"id": "1", "mode": "Q+m')  # a line cut by the kill
    second = []
    resumed = benchmarks.run_eval(examples, prompts, _stub(by_prompt, second), modes, str(tmp_path / "cut"), **run)
    assert len(first) == 5 and sorted(second) == [("Q+mbe", "1"), ("Q+mbe", "2"), ("Q+mbe", "3")]
    assert resumed == whole  # the stub's timings are deterministic, so TPS too
    third = []
    assert benchmarks.run_eval(examples, prompts, _stub(by_prompt, third), modes, str(tmp_path / "cut"), **run) == whole
    assert third == []
    with pytest.raises(benchmarks.BenchmarkError, match="gen_length: expected 8"):
        benchmarks.run_eval(examples, prompts, _stub(by_prompt, []), modes, str(tmp_path / "cut"),
                            **{**run, "settings": {"gen_length": 16}})


def test_a_checkpoints_tokenizer_is_its_runs(tmp_path):
    """Beside the checkpoints directory (launch/train.py's workdir) first, then one level up (the
    quickstart's workdir, shared by its sft/ and rl_<algorithm>/ runs); neither is an error naming both."""
    run = tmp_path / "quickstart"
    ckpt = run / "rl_ebpo" / "checkpoints"
    ckpt.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="rl_ebpo/tokenizer.json or .*quickstart/tokenizer.json"):
        launcher.run_tokenizer(str(ckpt))
    (run / "tokenizer.json").write_text("{}")
    assert launcher.run_tokenizer(str(ckpt)) == str(run / "tokenizer.json")
    (run / "rl_ebpo" / "tokenizer.json").write_text("{}")
    assert launcher.run_tokenizer(str(ckpt)) == str(run / "rl_ebpo" / "tokenizer.json")


def test_formats_and_modes_report_bad_input(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [{"q": 1}])
    with pytest.raises(benchmarks.BenchmarkError, match="record keys: expected"):
        benchmarks.read_benchmark(bad)
    with pytest.raises(benchmarks.BenchmarkError, match="missing field 'answer'"):
        benchmarks.read_benchmark(_write(tmp_path / "g.jsonl", [{"question": "x", "answer": "1"}, {"question": "y"}]))
    assert benchmarks.parse_mode("Q+mbe", 3) == benchmarks.Mode("Q+mbe", 0.7, 0.5, 3)
    assert benchmarks.parse_mode("S:threshold=0.6,editing_threshold=0.9").threshold == 0.6
    causal = benchmarks.parse_mode("Q+mbe", 2, "block_causal")
    assert causal.generate_kwargs()["mbe_attention"] == "block_causal" and causal.mbe_window == 2
    assert benchmarks.parse_mode("S", 2, "block_causal").generate_kwargs()["mbe_attention"] == "bidirectional"
    assert benchmarks.parse_mode("S:mbe_window=1", 2, "block_causal").mbe_attention == "block_causal"
    with pytest.raises(benchmarks.BenchmarkError, match="mbe_attention: expected one of"):
        benchmarks.parse_mode("Q+mbe", 2, "causal")
    benchmarks._settings_check(str(tmp_path), {"gen_length": 16, "mbe_attention": "block_causal"})
    with pytest.raises(benchmarks.BenchmarkError, match="mbe_attention: expected 'block_causal'"):
        benchmarks._settings_check(str(tmp_path), {"gen_length": 16})  # resumed with the default
    with pytest.raises(benchmarks.BenchmarkError, match="expected a preset"):
        benchmarks.parse_mode("fast")
    shots = benchmarks.read_benchmark(_write(tmp_path / "shots.jsonl", [{"question": "1+1?", "answer": "#### 2"}]))
    ex = benchmarks.with_fewshot(benchmarks.read_benchmark(_write(tmp_path / "q.jsonl", [{"question": "2+2?", "answer": "#### 4"}])), shots)
    assert [m["role"] for m in ex[0].messages] == ["user", "assistant", "user"]
    assert ex[0].messages[1]["content"] == "The answer is \\boxed{2}."


def test_eval_launcher_decodes_end_to_end_on_a_mesh(fixture_dir, tokenizer, tmp_path):
    """The real decoder with the tiny fixture model on 2 fake devices; the summary agrees with
    the samples it wrote, and each sample's reward is what the verifier gives its completion."""
    _, tok_path = tokenizer
    bench = _write(tmp_path / "add.jsonl", [{"prompt": f"{a}+{b}=", "meta": {"task": "addition", "a": a, "b": b}}
                                            for a, b in [(1, 2), (12, 30), (5, 5)]])
    env = dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu")
    args = [sys.executable, "launch/eval.py", f"--checkpoint={fixture_dir}", f"--tokenizer={tok_path}",
            f"--benchmark={bench}", "--template=plain", "--modes=S,Q+mbe", "--gen_length=16", "--block_length=8",
            "--batch_size=2", "--moe_impl=dense", f"--out_dir={tmp_path}/out", "--noprogress",
            "--sweep_thresholds=0.6", "--sweep_editing=0.5,1.0", "--mbe_attention=block_causal"]
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    grid = ["Q:threshold=0.6,editing_threshold=0.5", "Q:threshold=0.6,editing_threshold=1.0"]
    assert list(summary) == ["S", "Q+mbe", *grid] and summary["Q+mbe"]["mbe_window"] == 2
    assert summary["Q+mbe"]["mbe_attention"] == "block_causal" and summary["S"]["mbe_attention"] == "bidirectional"
    assert json.load(open(tmp_path / "out" / "settings.json"))["mbe_attention"] == "block_causal"
    assert summary[grid[1]]["threshold"] == 0.6 and summary[grid[1]]["editing_threshold"] == 1.0
    for mode, s in summary.items():
        rows = [json.loads(line) for line in open(tmp_path / "out" / "samples" / f"{benchmarks._slug(mode)}.jsonl")]
        assert len(rows) == 3 and s["n"] == 3
        for r in rows:
            assert r["reward"] == rewards.judge(r["completion"], r["meta"])[0] and r["forwards"] >= 1
        assert s["tokens"] == sum(r["tokens"] for r in rows) > 0
        assert s["tpf"] == pytest.approx(s["tokens"] / sum(r["forwards"] for r in rows))
        assert s["tps"] > 0
    assert summary["S"]["warmup_seconds"] > 0 and summary[grid[0]]["warmup_seconds"] == 0  # S compiled the grid's program
    assert "| S | 3 |" in out.stdout
    events = metrics.read_events(str(tmp_path / "out" / "tb"))
    assert events["eval/S/accuracy"] == [(0, summary["S"]["accuracy"])]
    png = tmp_path / "out" / "speed_accuracy.png"
    assert png.stat().st_size > 10_000 and f"wrote {png}" in out.stderr


def test_sampled_heldout_batches_draw_their_own_noise(tokenizer, tmp_path):
    """heldout.evaluate at temperature > 0: batch k decodes with fold_in(rng, k), as `generate`
    alone with that key does; the same prompts in two batches are not drawn with one key."""
    import jax
    import numpy as np

    from helpers import load_config
    from llada_jax import decode, model, train
    from llada_jax.data import tasks
    from llada_jax.evaluation import heldout

    cfg = load_config("quickstart.py")
    model_config = train.build_model_config(cfg)
    params = model.init_params(model_config, jax.random.key(0))
    tok = tokenizer[0]
    four = [{"messages": [{"role": "user", "content": ex["prompt"]}, {"role": "assistant", "content": ex["response"]}],
             "meta": ex["meta"]}
            for ex in tasks.addition_examples(4, "test", cfg=tasks.AdditionConfig(max_digits=2, zero_pad=True, num_pairs=4))]
    rng = jax.random.key(3)
    kw = dict(mode="S", gen_length=20, block_length=5, template="plain", batch_size=4, temperature=1.0)
    res = heldout.evaluate(params, model_config, tok, four + four, rng=rng, return_outputs=True, **kw)
    first, second = (np.asarray(o.tokens) for o in res["outputs"])
    assert not np.array_equal(first, second)  # one key for both batches drew them alike
    prompts, _ = heldout.prompts_and_metas(four, tok, "plain")
    alone = decode.generate(params, model_config, prompts, gen_length=20, block_length=5, preset="S",
                            temperature=1.0, rng=jax.random.fold_in(rng, 1))
    np.testing.assert_array_equal(second, np.asarray(alone.tokens))
