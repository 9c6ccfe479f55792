"""Rewards for RL behind one interface, and `score`, which keeps the RL loop alive (REFERENCE §6).

A reward is `RewardFn = (completion, meta) -> float`: the decoded completion and the
problem's `meta` (what the verifier needs). `REWARDS` names them:

- `addition`, `countdown`, `sudoku4x4`: the offline tasks' verifiers of `llada_jax.data.tasks`,
- `gsm8k`: 1/0 on the final number (`\\boxed{}` content, else the last number in the text),
- `math`: 1/0 on the `\\boxed{}` answer, equal to the reference by the field's equivalence
  checker (`math-verify` on sympy, as open-r1 and verl use: sets, intervals, matrices, units) or,
  as a fallback, up to MATH-style normalisation or numerically / symbolically (a small safe
  parser, see `math_equal`),
- `code`: the fraction of unit tests passed in `llada_jax.rewards.sandbox`,
- `by_task`: dispatch on `meta["task"]` to one of the above.

`judge` gives one sample's reward with the reason it is not 1 (the sandbox's per-test
reasons for code), for evaluation reports.

`score` applies a reward to a batch and never raises for a reward that does: the sample gets
`on_error` (0) and is reported, with its index, text and meta, in the returned list and by
`logging.warning`. With `workers > 0` it scores in a pool of that many threads (the code reward
spends its time in a sandbox subprocess, so threads run programs in parallel) and cuts off a
sample still running after `timeout_s`: that sample gets `on_error` as a `TimeoutError` report,
a fresh thread takes its place, and the rest of the batch is scored (the stuck thread is a
daemon, abandoned: Python cannot kill a thread, and a sandboxed program dies at its own limit).

`reward_fn` resolves a reward's name, including `package.module:function` for a user's
verifier, with the code reward under given sandbox limits.
"""

from __future__ import annotations

import collections
import dataclasses
import fractions
import functools
import importlib
import logging
import math
import re
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import math_verify
import numpy as np

from llada_jax.rewards import sandbox
from llada_jax.data import tasks

RewardFn = Callable[[str, Mapping[str, Any]], float]

_log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ extraction
def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, nested braces matched;
    `\\boxed 5` (no braces) gives "5". None if there is none or it is unclosed."""
    matches = list(re.finditer(r"\\(?:boxed|fbox)\s*(\{)?", text))
    if not matches:
        return None
    last = matches[-1]
    if last.group(1) is None:
        word = re.match(r"[^\s$]+", text[last.end():])
        return word.group() if word else None
    depth = 1
    for i in range(last.end(), len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[last.end():i]
    return None


_NUMBER = re.compile(r"(?<![\w.)])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|(?<![\w.)])-?\.\d+")


def parse_number(text: str) -> fractions.Fraction | None:
    """The exact value of a number as written in an answer: `-1,234.5`, `$18`, `75%` (= 75),
    `3/4`, `\\frac{3}{4}`, `0.75.`; None unless `text` is one number (after dropping
    `$`, `%`, `\\text{...}` units and a trailing period)."""
    text = re.sub(r"\\(?:text|mbox|mathrm)\{[^{}]*\}", "", text)
    text = re.sub(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}", r"\1/\2", text)
    text = text.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "").strip().rstrip(".").strip()
    if not _NUMBER.fullmatch(text):
        return None
    try:
        return fractions.Fraction(text.replace(",", "").replace(" ", ""))
    except (ValueError, ZeroDivisionError):
        return None


def final_number(text: str) -> fractions.Fraction | None:
    """The answer of a GSM8K-style solution: the `\\boxed{}` content if any (the whole of it, or
    else its last number), otherwise the last number in the text."""
    boxed = extract_boxed(text)
    if boxed is not None:
        value = parse_number(boxed)
        return value if value is not None else final_number(boxed.replace("\\boxed", ""))
    text = re.sub(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}", r"\1/\2", text)
    matches = _NUMBER.findall(text)
    return parse_number(matches[-1]) if matches else None


def _reference(meta: Mapping[str, Any]) -> str:
    """The reference answer: `meta["answer"]`, after GSM8K's `####` or inside `\\boxed{}` if present."""
    answer = str(meta["answer"])
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip()
    return extract_boxed(answer) or answer


# -------------------------------------------------------------------------------- GSM8K
def gsm8k_reward(completion: str, meta: Mapping[str, Any]) -> float:
    """1.0 iff the completion's final number equals `meta["answer"]` exactly (3/4 == 0.75)."""
    got, want = final_number(tasks.answer_text(completion)), parse_number(_reference(meta))
    if want is None:
        raise ValueError(f"meta['answer']: expected a number, found {meta['answer']!r}")
    return float(got is not None and got == want)


# --------------------------------------------------------------------------------- MATH
_TEXT_COMMANDS = re.compile(r"\\(?:text|textbf|textit|mbox|mathrm|mathbf)\{([^{}]*)\}")


def normalise_math(answer: str) -> str:
    """A MATH answer in canonical spelling (after Hendrycks et al.'s `strip_string`): no
    spaces, `\\left`/`\\right`, thin spaces, `$`, degrees, percent, units in `\\text{}`, `x =`
    prefixes or thousands separators; `\\dfrac`/`\\tfrac` -> `\\frac`; `\\frac12` -> `\\frac{1}{2}`."""
    s = answer.strip().replace("\n", "")
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""),
                     ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("^{\\circ}", ""), ("^\\circ", ""), ("°", ""),
                     ("\\%", ""), ("%", ""), ("\\$", ""), ("$", ""), ("\\displaystyle", "")):
        s = s.replace(old, new)
    stripped = _TEXT_COMMANDS.sub("", s).strip()
    s = stripped if stripped else _TEXT_COMMANDS.sub(r"\1", s)  # "5\text{ cm}" -> "5"; "\text{(A)}" -> "(A)"
    s = s.replace(" ", "").rstrip(".")
    s = re.sub(r"^[a-zA-Z]\w*=", "", s) if s.count("=") == 1 else s
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\w)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


_MATH_TOKEN = re.compile(r"\d+\.?\d*|\.\d+|\\[a-zA-Z]+|[a-zA-Z]|[-+*/^(){}\[\]]")
_MAX_MATH_CHARS = 200
_MAX_EXPONENT = 64
_PROBES = (0.5772156649, 1.4142135623, -0.7390851332, 2.7182818284, -1.6180339887)


def _parse_math(text: str) -> Callable[[Mapping[str, float]], float]:
    """Compiles a normalised expression (numbers, single-letter variables, + - * / ^, `\\cdot`,
    `\\times`, `\\div`, `\\frac{}{}`, `\\sqrt{}`, `\\sqrt[n]{}`, `\\pi`, parentheses and braces,
    implicit multiplication) into a function of the variables' values. A recursive-descent
    parser, never `eval`; exponents above 64 in magnitude are refused. Raises ValueError if
    `text` is anything else."""
    if len(text) > _MAX_MATH_CHARS:
        raise ValueError("too long")
    tokens, pos = [], 0
    while pos < len(text):
        m = _MATH_TOKEN.match(text, pos)
        if m is None:
            raise ValueError(f"unexpected {text[pos:]!r}")
        tokens.append({"\\cdot": "*", "\\times": "*", "\\div": "/"}.get(m.group(), m.group()))
        pos = m.end()
    i = 0

    def peek():
        return tokens[i] if i < len(tokens) else None

    def take(expected=None):
        nonlocal i
        tok = peek()
        if tok is None or (expected is not None and tok != expected):
            raise ValueError(f"expected {expected or 'more'}, found {tok!r}")
        i += 1
        return tok

    def starts_primary(tok) -> bool:
        return tok is not None and (tok[0].isdigit() or tok[0] == "." or tok.isalpha()
                                    or tok in ("(", "{", "\\frac", "\\sqrt", "\\pi"))

    def group():
        take("{")
        inner = expr()
        take("}")
        return inner

    def primary():
        tok = take()
        if tok[0].isdigit() or tok[0] == ".":
            value = float(tok)
            return lambda env: value
        if tok.isalpha():
            return lambda env: env[tok]
        if tok in ("(", "{"):
            inner = expr()
            take(")" if tok == "(" else "}")
            return inner
        if tok == "\\pi":
            return lambda env: math.pi
        if tok == "\\frac":
            num, den = group(), group()
            return lambda env: num(env) / den(env)
        if tok == "\\sqrt":
            index = None
            if peek() == "[":
                take("[")
                index = expr()
                take("]")
            radicand = group()
            return (lambda env: math.sqrt(radicand(env))) if index is None else \
                (lambda env: _power(radicand(env), 1 / index(env)))
        raise ValueError(f"unexpected {tok!r}")

    def power():
        base = primary()
        if peek() != "^":
            return base
        take("^")
        exponent = unary()
        return lambda env: _power(base(env), exponent(env))

    def unary():
        if peek() in ("-", "+"):
            sign = -1.0 if take() == "-" else 1.0
            operand = unary()
            return lambda env: sign * operand(env)
        return power()

    def term():
        value = unary()
        while peek() in ("*", "/") or starts_primary(peek()):
            op = take() if peek() in ("*", "/") else "*"
            left, right = value, unary()
            value = (lambda l, r: lambda env: l(env) * r(env))(left, right) if op == "*" else \
                (lambda l, r: lambda env: l(env) / r(env))(left, right)
        return value

    def expr():
        value = term()
        while peek() in ("+", "-"):
            sign = 1.0 if take() == "+" else -1.0
            left, right = value, term()
            value = (lambda l, r, s: lambda env: l(env) + s * r(env))(left, right, sign)
        return value

    try:
        fn = expr()
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if i != len(tokens):
        raise ValueError(f"unexpected {tokens[i]!r}")
    return fn


def _power(base: float, exponent: float) -> float:
    if abs(exponent) > _MAX_EXPONENT:
        raise OverflowError(f"exponent {exponent} refused")
    return math.pow(base, exponent)


def _variables(text: str) -> list[str]:
    return sorted({t for t in _MATH_TOKEN.findall(text) if len(t) == 1 and t.isalpha()})


def _numerically_equal(a: str, b: str) -> bool:
    """Whether two normalised expressions agree at 3 fixed probe points of their variables
    (exact for numbers; for polynomials and rational functions a false positive needs the
    probes to hit a root of their difference). False if either does not parse."""
    try:
        fa, fb = _parse_math(a), _parse_math(b)
    except ValueError:
        return False
    names = sorted(set(_variables(a)) | set(_variables(b)))
    agreed = 0
    for k in range(3):
        env = {name: _PROBES[(k + j) % len(_PROBES)] * (j + 1) for j, name in enumerate(names)}
        try:
            x, y = fa(env), fb(env)
        except (ArithmeticError, ValueError):  # a pole or a negative sqrt: try the next point
            continue
        if not math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12):
            return False
        agreed += 1
    return agreed > 0


def _split_top_level(s: str) -> list[str]:
    """`s` split at the commas outside any bracket: the items of a tuple or list answer."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(s):
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    return parts + [s[start:]]


def math_equal(answer: str, reference: str) -> bool:
    """Whether a MATH answer matches the reference: equal after `normalise_math`, or, item by
    item for comma-separated answers, numerically equal (`\\frac{1}{2}` == 0.5 == 1/2,
    `2\\sqrt{2}` == `\\sqrt{8}`) or symbolically equal by probing (`(x+1)^2` == `x^2+2x+1`).
    Limits: no sets, intervals, matrices, inequalities or functions beyond `\\sqrt` and
    `\\pi` (those need string equality); variables are single letters, `e` and `i` included."""
    a, b = normalise_math(answer), normalise_math(reference)
    if a == b:
        return True
    items_a, items_b = _split_top_level(a), _split_top_level(b)
    if len(items_a) != len(items_b) or (len(items_a) > 1 and a[:1] + a[-1:] != b[:1] + b[-1:]):
        return False  # different lengths, or a tuple (1,2) against an interval (1,2]
    if len(items_a) > 1 and a[:1] in "([" and a[-1:] in ")]":
        items_a, items_b = _split_top_level(a[1:-1]), _split_top_level(b[1:-1])
    return all(x == y or _numerically_equal(x, y) for x, y in zip(items_a, items_b))


_EXPONENT = re.compile(r"\^\s*(\{(?:[^{}]|\{[^{}]*\})*\}|\d+)")
_FACTORIAL = re.compile(r"(\d+)\s*!")


def _sympy_safe(text: str) -> bool:
    """Whether sympy may evaluate `text` exactly in bounded time: short, no power of a power, no
    integer exponent above `_MAX_EXPONENT` and no factorial above 1000."""
    if len(text) > _MAX_MATH_CHARS:
        return False
    for exponent in _EXPONENT.findall(text):
        if "^" in exponent or any(int(n) > _MAX_EXPONENT for n in re.findall(r"\d+", exponent)):
            return False
    return all(int(n) <= 1000 for n in _FACTORIAL.findall(text))


def math_verify_equal(answer: str, reference: str) -> bool:
    """Whether `math-verify` (Hugging Face's checker on sympy, used by open-r1 and verl) finds the
    two LaTeX answers equivalent: unordered sets, intervals, matrices, units and sympy's
    simplification. Its own signal-based timeouts are off (they work only in the main thread and
    `score` runs rewards in a pool that has its own cut-off); inputs longer than a MATH answer
    are refused, as `math_equal` does, and so are towers of powers and huge exponents or factorials
    (`9^{9^{9}}`), which sympy would evaluate exactly for ever (`_sympy_safe`)."""
    if not (_sympy_safe(answer) and _sympy_safe(reference)):
        return False
    gold = math_verify.parse(f"${reference}$", parsing_timeout=None)
    pred = math_verify.parse(f"${answer}$", parsing_timeout=None)
    return bool(gold and pred and math_verify.verify(gold, pred, timeout_seconds=None))


def math_reward(completion: str, meta: Mapping[str, Any]) -> float:
    """1.0 iff the completion's `\\boxed{}` answer (else its last number) equals the reference by
    `math_verify_equal`, or by the fallback `math_equal` (MATH normalisation, numeric and probed
    symbolic equality) where math-verify cannot parse the answer's form."""
    text = tasks.answer_text(completion)
    answer = extract_boxed(text)
    if answer is None:
        numbers = _NUMBER.findall(text)
        answer = numbers[-1] if numbers else None
    if answer is None:
        return 0.0
    reference = _reference(meta)
    return float(math_verify_equal(answer, reference) or math_equal(answer, reference))


# --------------------------------------------------------------------------------- code
def extract_code(completion: str) -> str:
    """The program in a completion: the last ```python (or bare ```) fenced block, else the whole answer."""
    text = tasks.answer_text(completion)
    blocks = re.findall(r"```(?:python|py)?[^\n]*\n(.*?)```", text, flags=re.DOTALL)
    return blocks[-1] if blocks else text


def code_check(completion: str, meta: Mapping[str, Any],
               config: sandbox.SandboxConfig = sandbox.SandboxConfig()) -> sandbox.SandboxResult:
    """Runs the completion's program against `meta`'s tests in the sandbox: `tests` (assert
    statements) or `io_tests` ([stdin, expected stdout] pairs). The result says per test
    whether it passed and why not (`reasons`, `failure`). HumanEval-style metas also hold
    `prefix` (the function's signature and docstring) and `entry_point`: a program that does
    not define `entry_point` is a body, run after the prefix; one that does gets the prefix's
    import lines before it."""
    program = extract_code(completion)
    if "prefix" in meta:
        prefix = str(meta["prefix"])
        if re.search(rf"^\s*def\s+{re.escape(str(meta.get('entry_point', '')))}\s*\(", program, flags=re.MULTILINE):
            imports = [line for line in prefix.splitlines() if re.match(r"\s*(import|from)\s", line)]
            program = "\n".join(imports + [program])
        else:  # the body as written: its first line's indentation matters
            body = completion
            for marker in tasks._END_MARKERS:
                body = body.split(marker, 1)[0]
            fenced = re.findall(r"```(?:python|py)?[^\n]*\n(.*?)```", body, flags=re.DOTALL)
            program = prefix + (fenced[-1] if fenced else body.rstrip() + "\n")
    if "tests" in meta:
        return sandbox.run_assert_tests(program, meta["tests"], config)
    if "io_tests" in meta:
        return sandbox.run_io_tests(program, [tuple(case) for case in meta["io_tests"]], config)
    raise KeyError(f"code meta: expected a 'tests' or 'io_tests' key, found keys {sorted(meta)}")


def code_reward(completion: str, meta: Mapping[str, Any],
                config: sandbox.SandboxConfig = sandbox.SandboxConfig()) -> float:
    """Fraction of the unit tests the completion's program passes in the sandbox (`code_check`)."""
    return code_check(completion, meta, config).fraction


def code_reward_with(config: sandbox.SandboxConfig) -> RewardFn:
    """`code_reward` under other sandbox limits, as a `RewardFn`."""
    return functools.partial(code_reward, config=config)


# ----------------------------------------------------------------------------- registry
def by_task(completion: str, meta: Mapping[str, Any]) -> float:
    """The reward named by `meta["task"]`: one interface for a batch of mixed tasks."""
    return get_reward(meta["task"])(completion, meta)


REWARDS: dict[str, RewardFn] = {
    **{name: task.reward for name, task in tasks.TASKS.items()},
    "gsm8k": gsm8k_reward,
    "math": math_reward,
    "code": code_reward,
    "by_task": by_task,
}


def get_reward(name: str) -> RewardFn:
    """A reward by name: one of `REWARDS`, or `package.module:function` (`load_reward`)."""
    if ":" in name:
        return load_reward(name)
    if name not in REWARDS:
        raise ValueError(f"reward: expected one of {sorted(REWARDS)} or 'package.module:function', found {name!r}")
    return REWARDS[name]


def load_reward(spec: str) -> RewardFn:
    """The user's verifier `package.module:function` (a `RewardFn`), imported from `sys.path`."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward: expected 'package.module:function', found {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward: expected an importable module {module_name!r} (on PYTHONPATH), found "
                         f"{type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward: expected a function {attr!r} in module {module_name!r}, found "
                         f"{'nothing' if fn is None else type(fn).__name__}")
    return fn


def reward_fn(name: str, sandbox_config: sandbox.SandboxConfig | None = None) -> RewardFn:
    """`get_reward(name)`, with the code reward (alone or under `by_task`) run under `sandbox_config`."""
    if sandbox_config is None or name not in ("code", "by_task"):
        return get_reward(name)
    code = code_reward_with(sandbox_config)
    if name == "code":
        return code

    def by_task_with_sandbox(completion: str, meta: Mapping[str, Any]) -> float:
        return (code if meta["task"] == "code" else get_reward(meta["task"]))(completion, meta)

    return by_task_with_sandbox


def judge(completion: str, meta: Mapping[str, Any], reward: str = "by_task",
          code_config: sandbox.SandboxConfig = sandbox.SandboxConfig()) -> tuple[float, str]:
    """The reward of one sample and, unless it is 1, why: for code the sandbox's reasons per
    failed test, for GSM8K / MATH the expected and the extracted answer, for the toy tasks
    the answer text. Raises what the reward raises (bad meta)."""
    name = meta["task"] if reward == "by_task" else reward
    if name == "code":
        result = code_check(completion, meta, code_config)
        reason = result.failure
        if result.status != "ok" and not reason:
            reason = f"sandbox {result.status}: {result.stderr.strip()[-200:]}"
        return result.fraction, reason
    value = float(get_reward(name)(completion, meta))
    if value >= 1.0:
        return value, ""
    if name == "gsm8k":
        found = final_number(tasks.answer_text(completion))
        return value, f"expected {_reference(meta)}, found {'no number' if found is None else found}"
    if name == "math":
        text = tasks.answer_text(completion)
        found = extract_boxed(text)
        return value, f"expected {_reference(meta)!r}, found {'no answer' if found is None and not _NUMBER.findall(text) else found if found is not None else _NUMBER.findall(text)[-1]!r}"
    answer = tasks.answer_text(completion).strip()
    return value, f"reward {value:g} for answer {answer[:100]!r}"


@dataclasses.dataclass(frozen=True)
class RewardError:
    """A sample whose reward function raised (or returned a non-finite value)."""
    index: int
    completion: str  # truncated to `score`'s max_chars
    meta: Mapping[str, Any]
    error_type: str
    message: str


def score(completions: Sequence[str], metas: Sequence[Mapping[str, Any]], reward_fn: RewardFn | str = "by_task",
          *, on_error: float = 0.0, max_chars: int = 200, workers: int = 0,
          timeout_s: float | None = None) -> tuple[np.ndarray, list[RewardError]]:
    """Rewards of a batch, float32 [len(completions)], and the samples whose reward failed.

    A reward function that raises an `Exception`, returns a non-finite value or (with `workers`)
    runs longer than `timeout_s` seconds does not stop the caller: that sample gets `on_error`
    and is reported (index, completion truncated to `max_chars`, meta, exception type and
    message; `TimeoutError` for a cut-off one) in the returned list, ordered by index, and by
    `logging.warning`, so that an RL step survives a verifier bug, a hang or a hostile completion.
    `workers`: 0 scores one sample after another in the calling thread (no timeout possible);
    n > 0 scores in n threads, each sample's reward in its slot whatever the finishing order.
    """
    if len(completions) != len(metas):
        raise ValueError(f"score: {len(completions)} completions but {len(metas)} metas")
    scorer = Scorer(metas, reward_fn, on_error=on_error, max_chars=max_chars, workers=workers, timeout_s=timeout_s)
    for index, completion in enumerate(completions):
        scorer.add(index, completion)
    return scorer.result()


class Scorer:
    """`score` for completions that arrive one at a time (RL rollouts as they finish decoding).

    `add(index, completion)` queues sample `index` (its meta is `metas[index]`); with `workers`
    threads it starts scoring at once, beside the caller's work. `result()` waits for every
    sample (each index added once) and returns what `score` returns for the same completions:
    the same rewards, errors and logs, whatever the order of arrival. `timeout_s` counts from the
    moment a sample's scoring starts; a call past it is cut off when `result()` waits.
    """

    def __init__(self, metas: Sequence[Mapping[str, Any]], reward_fn: RewardFn | str = "by_task", *,
                 on_error: float = 0.0, max_chars: int = 200, workers: int = 0, timeout_s: float | None = None):
        if workers < 0 or (timeout_s is not None and not timeout_s > 0):
            raise ValueError(f"score: expected workers >= 0 and timeout_s None or > 0, found {workers}, {timeout_s}")
        self._fn = get_reward(reward_fn) if isinstance(reward_fn, str) else reward_fn
        self._metas, self._on_error, self._max_chars = list(metas), on_error, max_chars
        self._completions: list = [None] * len(self._metas)
        self._pool = _Pool(self._one, len(self._metas), workers, timeout_s)

    def _one(self, index: int):
        try:
            value = float(self._fn(self._completions[index], self._metas[index]))
            if not math.isfinite(value):
                raise ValueError(f"non-finite reward {value}")
            return value, None
        except Exception as e:  # noqa: BLE001 - any verifier failure is reported, not raised
            return None, e

    def add(self, index: int, completion: str) -> None:
        if not 0 <= index < len(self._metas) or self._completions[index] is not None:
            raise ValueError(f"Scorer.add: index: expected a new index in [0, {len(self._metas)}), found {index}")
        self._completions[index] = completion
        self._pool.submit(index)

    def result(self) -> tuple[np.ndarray, list[RewardError]]:
        missing = [i for i, c in enumerate(self._completions) if c is None]
        if missing:
            raise ValueError(f"Scorer.result: expected every sample added, found {len(missing)} missing "
                             f"(indices {missing[:5]})")
        outcomes = self._pool.wait()
        rewards = np.full(len(self._metas), self._on_error, np.float32)
        errors: list[RewardError] = []
        fn = self._fn
        for index, (value, e) in enumerate(outcomes):
            if e is None:
                rewards[index] = value
                continue
            completion = self._completions[index]
            shown = completion if len(completion) <= self._max_chars else completion[:self._max_chars] + "..."
            errors.append(RewardError(index, shown, self._metas[index], type(e).__name__, str(e)))
            _log.warning("reward %s failed on sample %d (%s: %s); reward set to %s. completion=%r meta=%r",
                         getattr(fn, "__name__", fn), index, type(e).__name__, e, self._on_error, shown,
                         self._metas[index])
        return rewards, errors


class _Pool:
    """`one(i)` for submitted indices: in `workers` daemon threads as they are submitted, or (0
    workers) one after another in `wait`. A call still running `timeout_s` after it started gives
    `(None, TimeoutError)` and its thread is replaced (and abandoned)."""

    def __init__(self, one: Callable[[int], tuple], n: int, workers: int, timeout_s: float | None):
        self._one, self._workers, self._timeout_s = one, workers, timeout_s
        self._outcomes: list = [None] * n
        self._started: dict[int, float] = {}  # running calls: index -> start time
        self._pending: collections.deque = collections.deque()
        self._closed = False
        self._lock = threading.Condition()
        for _ in range(min(workers, n)):
            self._spawn()

    def _spawn(self):
        threading.Thread(target=self._worker, name="reward-worker", daemon=True).start()

    def _worker(self):
        lock = self._lock
        while True:
            with lock:
                while not self._pending and not self._closed:
                    lock.wait()
                if not self._pending:
                    return
                index = self._pending.popleft()
                self._started[index] = time.monotonic()
                lock.notify_all()  # the waiter's deadline now includes this call
            outcome = self._one(index)
            with lock:
                if self._outcomes[index] is not None:  # cut off meanwhile: a replacement took over
                    return
                self._outcomes[index] = outcome
                del self._started[index]
                lock.notify_all()

    def submit(self, index: int):
        if not self._workers:
            self._pending.append(index)
            return
        with self._lock:
            self._pending.append(index)
            self._lock.notify_all()

    def wait(self) -> list[tuple]:
        """Every outcome, in index order (all indices submitted)."""
        if not self._workers:
            for index in self._pending:
                self._outcomes[index] = self._one(index)
            return self._outcomes
        lock, timeout_s = self._lock, self._timeout_s
        with lock:
            self._closed = True
            lock.notify_all()
            while True:
                now, wait = time.monotonic(), None
                if timeout_s is not None:
                    for index, t in list(self._started.items()):
                        if now - t >= timeout_s:
                            self._outcomes[index] = (None, TimeoutError(f"reward still running after {timeout_s:g} s"))
                            del self._started[index]
                            self._spawn()
                    if self._started:
                        wait = max(min(self._started.values()) + timeout_s - now, 1e-3)
                if all(o is not None for o in self._outcomes):  # checked after the cut-offs: the last may be one
                    break
                lock.wait(wait)
        return self._outcomes
