"""Benchmark evaluation: public JSONL formats in, a resumable per-sample record and a summary out.

LLaDA2.1 reports accuracy with TPF / TPS on GSM8K, MATH, HumanEval, MBPP, ... in S and Q modes,
with and without Multi-Block Editing. `run_eval` produces that table for any checkpoint:

- `read_benchmark` reads a JSONL file in its public format (detected from the first record's
  keys, or named): GSM8K `question` / `answer` (`#### n`), MATH `problem` / `solution`
  (`\\boxed{}`), HumanEval `prompt` / `test` / `entry_point`, MBPP `text` / `test_list`, and
  the project's own task records (`messages` or `prompt`, with `meta`), and chat records
  (`messages` up to the answer, the other keys as the verifier's meta). Each becomes an
  `Example`: the user turn(s), the reward's `meta`, a gold answer text (for few-shot turns).
- `parse_mode` names a decoding setting: a preset of `decode.PRESETS` (`S`, `Q`, `no_edit`,
  `llada20`), `+mbe` for Multi-Block Editing (its window's attention, bidirectional or
  block-causal, is `parse_mode`'s argument), and `:threshold=..,editing_threshold=..`
  overrides (`Q+mbe`, `S:threshold=0.6`).
- `decoder` is the completion source that runs `decode.generate` on a batch (padded to a
  fixed size so that the compiled program is reused, and to a multiple of the mesh's batch
  axes; decoded inside the mesh, which shards the batch over `data`). A batch whose static
  shape is new is decoded once untimed first, so TPS excludes compilation (that warm-up
  time is reported apart). Any function with its signature can stand in for it (tests do).
- `run_eval` decodes each mode's missing samples, scores them with `rewards.judge` in a
  thread pool (code runs in sandbox subprocesses, so threads give parallel workers), and
  appends one JSON line per sample (prompt, completion, reward, why not 1, tokens, forwards,
  seconds) to `<out>/samples/<mode>.jsonl`. A rerun skips the samples already there, so an
  interrupted run resumes; the summary (`summary.json`, `table.md`) is computed from the
  sample files alone, hence the same for any sequence of interruptions.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import re
import time
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from llada_jax import decode, rewards
from llada_jax.rewards import sandbox
from llada_jax.train import metrics

FORMATS = ("gsm8k", "math", "humaneval", "mbpp", "task", "chat")
_MATH_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
_CODE_FENCE = "```"


class BenchmarkError(ValueError):
    """A benchmark file, mode or resumed run that does not fit: the message names the field."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One evaluation item: the turns before the answer, the reward's meta, a gold answer text."""
    id: str
    messages: list
    meta: dict
    reference: str = ""


# ------------------------------------------------------------------------------ formats
def detect_format(record: Mapping[str, Any]) -> str:
    """The format of a record from its keys (see the module docstring)."""
    keys = set(record)
    if {"question", "answer"} <= keys:
        return "gsm8k"
    if {"problem", "solution"} <= keys:
        return "math"
    if {"prompt", "test", "entry_point"} <= keys:
        return "humaneval"
    if {"text", "test_list"} <= keys:
        return "mbpp"
    if "meta" in keys and ({"messages", "prompt"} & keys):
        return "task"
    if "messages" in keys:
        return "chat"
    raise BenchmarkError(f"record keys: expected those of one of {FORMATS} (gsm8k: question/answer, math: "
                         f"problem/solution, humaneval: prompt/test/entry_point, mbpp: text/test_list, task: "
                         f"messages or prompt with meta, chat: messages), found {sorted(keys)}")


def _user(content: str) -> list:
    return [{"role": "user", "content": content}]


def to_example(record: Mapping[str, Any], fmt: str, index: int) -> Example:
    """`record` in format `fmt` as an `Example`; its id is the record's own id field if any, else `index`."""
    rid = str(record.get("task_id", record.get("id", record.get("unique_id", index))))
    if fmt == "gsm8k":
        answer = str(record["answer"])
        final = answer.rsplit("####", 1)[1].strip() if "####" in answer else answer
        reference = (answer.rsplit("####", 1)[0].rstrip() + f"\nThe answer is \\boxed{{{final}}}.").lstrip()
        return Example(rid, _user(record["question"] + _MATH_INSTRUCTION), {"task": "gsm8k", "answer": answer}, reference)
    if fmt == "math":
        return Example(rid, _user(record["problem"] + _MATH_INSTRUCTION),
                       {"task": "math", "answer": record["solution"]}, record["solution"])
    if fmt == "humaneval":
        prompt = record["prompt"]
        content = ("Complete the following Python function. Answer with the whole function in one ```python "
                   f"code block.\n\n{_CODE_FENCE}python\n{prompt}{_CODE_FENCE}")
        meta = {"task": "code", "tests": [f"{record['test']}\ncheck({record['entry_point']})"],
                "prefix": prompt, "entry_point": record["entry_point"]}
        solution = record.get("canonical_solution")
        reference = f"{_CODE_FENCE}python\n{prompt}{solution}{_CODE_FENCE}" if solution else ""
        return Example(rid, _user(content), meta, reference)
    if fmt == "mbpp":
        tests = list(record["test_list"])
        setup = record.get("test_setup_code") or ""
        content = f"{record['text']}\nYour code should pass these tests:\n\n" + "\n".join(tests) + "\n"
        meta = {"task": "code", "tests": [f"{setup}\n{t}" if setup else t for t in tests]}
        code = record.get("code")
        return Example(rid, _user(content), meta, f"{_CODE_FENCE}python\n{code}\n{_CODE_FENCE}" if code else "")
    if fmt == "task":
        meta = dict(record["meta"])
        if "task" not in meta:
            raise BenchmarkError(f"record {index}: meta: expected a 'task' key, found keys {sorted(meta)}")
        if "messages" in record:
            messages = list(record["messages"])
            if messages and messages[-1].get("role") == "assistant":
                return Example(rid, messages[:-1], meta, messages[-1].get("content", ""))
            return Example(rid, messages, meta)
        return Example(rid, _user(record["prompt"]), meta, str(record.get("response", "")))
    if fmt == "chat":  # turns up to the answer; the record's other keys are the verifier's meta
        messages = list(record["messages"])
        meta = {k: v for k, v in record.items() if k != "messages"}
        if messages and messages[-1].get("role") == "assistant":
            return Example(rid, messages[:-1], meta, messages[-1].get("content", ""))
        return Example(rid, messages, meta)
    raise BenchmarkError(f"format: expected one of {FORMATS}, found {fmt!r}")


def read_benchmark(path: str, fmt: str = "auto", limit: Optional[int] = None) -> list[Example]:
    """The examples of a JSONL file (`fmt`: one of FORMATS, or "auto" from the first record)."""
    examples, chosen = [], None if fmt == "auto" else fmt
    if chosen is not None and chosen not in FORMATS:
        raise BenchmarkError(f"format: expected 'auto' or one of {FORMATS}, found {fmt!r}")
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise BenchmarkError(f"{path}:{n}: not JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise BenchmarkError(f"{path}:{n}: expected a JSON object, found {type(record).__name__}")
            chosen = chosen or detect_format(record)
            try:
                examples.append(to_example(record, chosen, len(examples)))
            except KeyError as err:
                raise BenchmarkError(f"{path}:{n}: format {chosen}: missing field {err}") from None
            if limit is not None and len(examples) >= limit:
                break
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise BenchmarkError(f"{path}: example ids must be unique, found duplicates "
                             f"{sorted({i for i in ids if ids.count(i) > 1})[:5]}")
    return examples


def with_fewshot(examples: Sequence[Example], shots: Sequence[Example]) -> list[Example]:
    """Each example preceded by the shots as user / assistant turns (their gold answers)."""
    missing = [s.id for s in shots if not s.reference]
    if missing:
        raise BenchmarkError(f"few-shot examples: expected a gold answer, found none for ids {missing}")
    turns = [m for s in shots for m in (*s.messages, {"role": "assistant", "content": s.reference})]
    return [dataclasses.replace(e, messages=turns + list(e.messages)) for e in examples]


# -------------------------------------------------------------------------------- modes
@dataclasses.dataclass(frozen=True)
class Mode:
    """A decoding setting, named by the spec it was parsed from."""
    name: str
    threshold: float
    editing_threshold: float
    mbe_window: int = 0
    llada20: bool = False
    mbe_attention: str = "bidirectional"  # the MBE window's attention (`decode.MBE_ATTENTION`)

    def generate_kwargs(self) -> dict:
        return dict(threshold=self.threshold, editing_threshold=self.editing_threshold, mbe_window=self.mbe_window,
                    llada20=self.llada20, mbe_attention=self.mbe_attention)


def parse_mode(spec: str, mbe_window: int = 2, mbe_attention: str = "bidirectional") -> Mode:
    """`PRESET[+mbe][:key=value,...]`: a preset of `decode.PRESETS`, Multi-Block Editing over
    `mbe_window` blocks whose window attends as `mbe_attention` says ("bidirectional" or
    "block_causal"), and overrides of threshold / editing_threshold / mbe_window."""
    if mbe_attention not in decode.MBE_ATTENTION:
        raise BenchmarkError(f"mbe_attention: expected one of {decode.MBE_ATTENTION}, found {mbe_attention!r}")
    head, _, tail = spec.partition(":")
    preset, plus, extra = head.partition("+")
    if preset not in decode.PRESETS:
        raise BenchmarkError(f"mode {spec!r}: expected a preset in {sorted(decode.PRESETS)}, found {preset!r}")
    if plus and extra != "mbe":
        raise BenchmarkError(f"mode {spec!r}: expected '+mbe' after the preset, found '+{extra}'")
    values = {**decode.PRESETS[preset], "mbe_window": mbe_window if plus else 0}
    for item in filter(None, tail.split(",")):
        key, eq, value = item.partition("=")
        if key not in ("threshold", "editing_threshold", "mbe_window") or not eq:
            raise BenchmarkError(f"mode {spec!r}: expected key=value with key in threshold, editing_threshold, "
                                 f"mbe_window; found {item!r}")
        try:
            values[key] = int(value) if key == "mbe_window" else float(value)
        except ValueError:
            raise BenchmarkError(f"mode {spec!r}: {key}: expected a number, found {value!r}") from None
    window = int(values["mbe_window"])
    return Mode(spec, float(values["threshold"]), float(values["editing_threshold"]), window,
                bool(values.get("llada20", False)), mbe_attention if window else "bidirectional")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)


# ---------------------------------------------------------------------- completion source
class Prompt(NamedTuple):
    id: str
    ids: list[int]
    text: str


class Completion(NamedTuple):
    text: str
    tokens: int  # generated tokens (EOS and padding excluded)
    forwards: int  # model forwards the row took part in


class Batch(NamedTuple):
    completions: list[Completion]
    seconds: float  # decoding time, compilation excluded
    warmup_seconds: float  # time of the untimed first decode of a new program (compilation + one run)


CompleteFn = Callable[[Sequence[Prompt], Mode], Batch]


def decoder(params, model_config, tokenizer, *, gen_length: int, block_length: int, batch_size: int,
            mesh=None, max_post_steps: int = 16, eos_early_stop: bool = True) -> CompleteFn:
    """A `CompleteFn` running `decode.generate` (greedy) on the model; see the module docstring.
    With `mesh` (`params` as sharded there), on one process or several, every process calls it
    with the same prompts and gets every completion."""
    import jax
    import flax.linen as nn

    from llada_jax.evaluation import heldout
    from llada_jax.parallel import sharding

    rows_multiple = 1
    if mesh is not None:
        rows_multiple = math.prod(mesh.shape[a] for a in ("data", "fsdp", "expert") if a in mesh.shape)
        if batch_size % rows_multiple:
            raise BenchmarkError(f"batch_size: expected a multiple of the mesh's batch axes (data x fsdp x expert = "
                                 f"{rows_multiple}), found {batch_size}")
    compiled: set = set()

    def run(ids, mode):
        kw = dict(gen_length=gen_length, block_length=block_length, max_post_steps=max_post_steps,
                  eos_early_stop=eos_early_stop, **mode.generate_kwargs())
        if mesh is None:
            return decode.generate(params, model_config, ids, **kw)
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
            # Each process decodes its rows of the batch; every process gets every row back.
            return heldout.generate_everywhere(params, model_config, ids, mesh=mesh, **kw)

    def complete(prompts: Sequence[Prompt], mode: Mode) -> Batch:
        ids = [p.ids for p in prompts]
        ids = ids + [ids[0]] * (batch_size - len(ids))  # a fixed batch: one compiled program
        longest = max(len(i) for i in ids)
        key = (len(ids), math.ceil((longest + gen_length) / block_length), longest // block_length, mode.mbe_window,
               mode.mbe_attention)
        warmup = 0.0
        if key not in compiled:
            t0 = time.perf_counter()
            jax.block_until_ready(run(ids, mode).canvas)
            warmup = time.perf_counter() - t0
            compiled.add(key)
        t0 = time.perf_counter()
        out = run(ids, mode)
        seconds = time.perf_counter() - t0
        completions = [Completion(heldout.completion_text(out.tokens[r], tokenizer), int(out.num_generated[r]),
                                  int(out.forwards[r])) for r in range(len(prompts))]
        return Batch(completions, seconds, warmup)

    return complete


# ---------------------------------------------------------------------------------- run
def render_prompts(examples: Sequence[Example], tokenizer, template: str = "chat") -> list[Prompt]:
    """Each example's prompt ids in `template` ("chat", or "plain" for the toy tasks) and text."""
    out = []
    for e in examples:
        ids = tokenizer.encode_prompt(e.messages, template=template)
        out.append(Prompt(e.id, ids, tokenizer.decode(ids)))
    return out


def _read_samples(path: str) -> dict[str, dict]:
    """The finished samples of a mode; a last line cut by an interruption is dropped (and rewritten)."""
    if not os.path.exists(path):
        return {}
    done, good, cut = {}, [], False
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                cut = True
                continue
            done[row["id"]] = row
            good.append(line if line.endswith("\n") else line + "\n")
    if cut:
        with open(path, "w") as f:
            f.writelines(good)
    return done


def _judge(completion: str, meta: Mapping[str, Any], reward: str, code_config: sandbox.SandboxConfig):
    try:
        return rewards.judge(completion, meta, reward, code_config)
    except Exception as e:  # noqa: BLE001 - a verifier failure is this sample's failure, reported
        return 0.0, f"reward error: {type(e).__name__}: {e}"


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict:
    """Accuracy (reward == 1), mean reward, TPF (tokens / forwards), TPS (tokens / decoding
    seconds, compilation excluded) and totals of one mode's sample rows."""
    n = len(rows)
    reward = np.array([r["reward"] for r in rows], np.float64)
    tokens = sum(r["tokens"] for r in rows)
    forwards = sum(r["forwards"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    return {"n": n, "accuracy": float(np.mean(reward >= 1.0)) if n else 0.0, "reward": float(reward.mean()) if n else 0.0,
            "tpf": tokens / forwards if forwards else 0.0, "tps": tokens / seconds if seconds > 0 else 0.0,
            "tokens": int(tokens), "forwards": int(forwards), "decode_seconds": round(seconds, 4),
            "warmup_seconds": round(sum(r.get("warmup_seconds", 0.0) for r in rows), 4),
            "failed": int(np.sum(reward < 1.0))}


def _settings_check(out_dir: str, settings: Mapping[str, Any]) -> None:
    """A resumed run must decode and score as the first one did: its settings are compared field by field."""
    path = os.path.join(out_dir, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        # Both ways: a setting only recorded when it is not the default (mbe_attention) is
        # missing from one side when a run is resumed with the default.
        keys = [*settings, *(k for k in before if k not in settings)]
        changed = {k: (before.get(k), settings.get(k)) for k in keys if before.get(k) != settings.get(k)}
        if changed:
            field, (old, new) = next(iter(changed.items()))
            raise BenchmarkError(f"{out_dir}: resumed with other settings; {field}: expected {old!r} (the run's), "
                                 f"found {new!r}. Use another output directory.")
    else:
        with open(path, "w") as f:
            json.dump(settings, f, indent=1, sort_keys=True)


def run_eval(examples: Sequence[Example], prompts: Sequence[Prompt], complete: CompleteFn, modes: Sequence[Mode],
             out_dir: str, *, batch_size: int, reward: str = "by_task", workers: int = 4,
             code_config: sandbox.SandboxConfig = sandbox.SandboxConfig(), settings: Optional[Mapping] = None,
             progress: bool = True, on_batch: Optional[Callable[[str, int], None]] = None, step: int = 0) -> dict:
    """Decodes and scores every example in every mode (skipping samples already written),
    then writes `summary.json`, `table.md` and the summary's scalars (metrics.jsonl and
    TensorBoard events under `tb/`, at `step`) in `out_dir`; returns the summary {mode: stats}.
    On several processes every process calls it alike (`complete` decodes across them) and
    process 0 alone scores, writes and returns the summary (the others return {}).
    `settings` (what decoding depends on: checkpoint, lengths, template, ...) must match the
    ones of a run being resumed. `on_batch(mode, samples_done)` is called after each batch."""
    from tqdm import tqdm

    if len(examples) != len(prompts):
        raise BenchmarkError(f"prompts: expected one per example ({len(examples)}), found {len(prompts)}")
    from llada_jax.parallel import hosts

    primary = hosts.is_primary()
    os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
    # Process 0 writes (or checks) the settings and cuts a torn last sample line; then the
    # others read the same files, so every process decodes the same missing samples.
    hosts.on_primary_then_all("eval/settings", _settings_check, out_dir,
                              {**(settings or {}), "reward": reward, "ids": [e.id for e in examples]})
    summary = {}
    with concurrent.futures.ThreadPoolExecutor(max(workers, 1)) as pool:
        for mode in modes:
            path = os.path.join(out_dir, "samples", _slug(mode.name) + ".jsonl")
            done = hosts.on_primary_then_all(f"eval/samples/{_slug(mode.name)}", _read_samples, path)
            todo = [i for i, e in enumerate(examples) if e.id not in done]
            bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc=f"eval {mode.name}",
                       disable=not (progress and primary), dynamic_ncols=True)
            with open(path, "a") if primary else contextlib.nullcontext() as f:
                for start in range(0, len(todo), batch_size):
                    chunk = todo[start:start + batch_size]
                    batch = complete([prompts[i] for i in chunk], mode)
                    if len(batch.completions) != len(chunk):
                        raise BenchmarkError(f"completion source: expected {len(chunk)} completions, "
                                             f"found {len(batch.completions)}")
                    if not primary:
                        continue
                    judged = list(pool.map(lambda ic: _judge(ic[1].text, examples[ic[0]].meta, reward, code_config),
                                           zip(chunk, batch.completions)))
                    share, warm = batch.seconds / len(chunk), batch.warmup_seconds / len(chunk)
                    for i, c, (value, why) in zip(chunk, batch.completions, judged):
                        row = {"id": examples[i].id, "mode": mode.name, "prompt": prompts[i].text, "completion": c.text,
                               "reward": value, "correct": value >= 1.0, "why": why, "tokens": c.tokens,
                               "forwards": c.forwards, "seconds": share, "warmup_seconds": warm,
                               "meta": examples[i].meta}
                        f.write(json.dumps(row) + "\n")
                        done[row["id"]] = row
                    f.flush()
                    os.fsync(f.fileno())
                    bar.update(len(chunk))
                    if on_batch is not None:
                        on_batch(mode.name, len(examples) - len(todo) + start + len(chunk))
            bar.close()
            if not primary:
                continue
            summary[mode.name] = {**summarize([done[e.id] for e in examples]),
                                  **{k: v for k, v in dataclasses.asdict(mode).items() if k != "name"}}
    if not primary:
        return {}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log = metrics.MetricsLog(out_dir, resume_step=-1)  # the summary replaces any earlier run's
    log.write(step, {f"eval/{mode}/{k}": v for mode, s in summary.items() for k, v in s.items()
                     if k in ("accuracy", "reward", "tpf", "tps", "tokens")})
    log.close()
    table = format_table(summary)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    return summary


def format_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table of the summary: one row per mode."""
    lines = ["| mode | n | accuracy | reward | TPF | TPS | tokens |", "|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['n']} | {s['accuracy']:.4f} | {s['reward']:.4f} | {s['tpf']:.2f} | "
                     f"{s['tps']:.1f} | {s['tokens']} |")
    return "\n".join(lines)


def iter_jsonl(path: str) -> Iterable[dict]:
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
