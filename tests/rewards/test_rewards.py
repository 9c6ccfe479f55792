"""Rewards (llada_jax.rewards) and the code sandbox (llada_jax.rewards.sandbox): parsing, dispatch,
error reporting, and hostile programs that must get reward 0 without hurting the caller."""

import dataclasses
import functools
import logging
import os
import select
import signal
import socket
import threading
import time

import numpy as np
import pytest

from llada_jax import rewards
from llada_jax.rewards import sandbox
from llada_jax.data import tasks

# `no_stray_processes` looks for sandbox processes machine-wide, and another xdist worker's
# sandbox run in progress would look like a stray: it holds `sandbox_lock` (tests/conftest.py).

FAST = sandbox.SandboxConfig(timeout_s=5.0, test_timeout_s=1.0, cpu_s=5)
ROOT = os.geteuid() == 0
# the same hostile programs under each layer alone where it can be isolated: all layers, the
# kernel layers without the audit hook (root only), the audit hook without kernel layers
CONFIGS = {
    "all": FAST,
    "kernel_only": sandbox.SandboxConfig(**{**FAST.__dict__, "audit_hook": False}),
    "hook_only": sandbox.SandboxConfig(**{**FAST.__dict__, "drop_privileges": False, "private_network": False,
                                          "read_only_fs": False}),
}


def _layer_configs():
    return [pytest.param(c, id=name, marks=pytest.mark.skipif(name == "kernel_only" and not ROOT,
                                                              reason="kernel layers need root"))
            for name, c in CONFIGS.items()]


def _processes() -> list[dict]:
    """`pid`, `State`, `Uid` and `cmdline` (its arguments) of every process, zombies included."""
    out = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/status") as f:
                p = dict(line.split(":", 1) for line in f if line.startswith(("State:", "Uid:")))
            with open(f"/proc/{name}/cmdline", "rb") as f:
                p["cmdline"] = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue  # exited meanwhile
        out.append(dict(p, pid=int(name)))
    return out


def _sandbox_pids() -> list[int]:
    """Live processes of any sandbox uid."""
    uids = {int(p["Uid"].split()[0]) for p in _processes() if "Uid" in p}
    return [pid for uid in uids if sandbox._UID_RANGE[0] <= uid < sandbox._UID_RANGE[1]
            for pid in sandbox._pids_of_uid(uid)]


def _live_sandbox_runners() -> list[int]:
    """Live (not zombie) processes running the sandbox's runner, whatever their uid: a forked child
    keeps its parent's command line. Other processes on the machine (a parallel test worker's
    subprocesses) do not count, so the check does not depend on what else runs."""
    runner = os.path.abspath(sandbox.__file__)
    return [p["pid"] for p in _processes()
            if runner in p["cmdline"] and not p.get("State", "Z").strip().startswith("Z")]


@pytest.fixture(autouse=True)
def no_stray_processes(sandbox_lock):
    """Fails a test that leaves sandbox processes behind, and kills them even if it failed."""
    yield
    stray = _sandbox_pids()
    for pid in stray:
        os.kill(pid, signal.SIGKILL)
    assert not stray, f"sandbox processes left running: {stray}"


# ------------------------------------------------------------------------------ GSM8K
@pytest.mark.parametrize("completion, answer, expected", [
    ("Janet has 18 eggs. The answer is 18.", "18", 1.0),
    ("So she pays $1,234.50 in total.", "1234.5", 1.0),
    ("First 12 then 7. Final: \\boxed{72}", "#### 72", 1.0),
    ("\\boxed{72} was wrong, the last number 5 matters not: boxed wins", "72", 1.0),
    ("The fraction is 3/4", "0.75", 1.0),
    ("\\boxed{\\frac{3}{4}}", "3/4", 1.0),
    ("It drops to -5.", "-5", 1.0),
    ("10-5 = 5", "-5", 0.0),  # a minus between numbers is not a sign
    ("\\boxed{18 \\text{ dollars}}", "18", 1.0),
    ("The answer is 1,000", "1000", 1.0),
    ("0.7 of it", "0.75", 0.0),
    ("no number here", "3", 0.0),
    ("42<|role_end|>trailing 7", "42", 1.0),  # text after the end-of-turn marker is ignored
])
def test_gsm8k_reward(completion, answer, expected):
    assert rewards.gsm8k_reward(completion, {"answer": answer}) == expected


def test_extract_boxed_nested_and_unclosed():
    assert rewards.extract_boxed("a \\boxed{1} then \\boxed{\\frac{1}{\\sqrt{2}}}.") == "\\frac{1}{\\sqrt{2}}"
    assert rewards.extract_boxed("$\\boxed 5$") == "5"
    assert rewards.extract_boxed("\\boxed{1") is None
    assert rewards.extract_boxed("none") is None


# ------------------------------------------------------------------------------- MATH
@pytest.mark.parametrize("answer, reference, equal", [
    ("\\dfrac{1}{2}", "0.5", True),
    ("\\frac12", "1/2", True),
    ("\\left( 1, 2 \\right)", "(1,2)", True),
    ("(1,2)", "(1,2]", False),
    ("(2,1)", "(1,2)", False),
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("\\sqrt[3]{27}", "3", True),
    ("(x+1)^2", "x^2+2x+1", True),
    ("x^2", "x^3", False),
    ("90^\\circ", "90", True),
    ("5\\text{ cm}", "5", True),
    ("\\text{(A)}", "(A)", True),
    ("x = 3", "3", True),
    ("10\\%", "10", True),
    ("1,000", "1000", True),
    ("\\pi/2", "\\frac{\\pi}{2}", True),
    ("0.3333", "\\frac{1}{3}", False),
    ("9^{9^{9}}", "1", False),  # the huge exponent is refused, not computed
    ("\\frac{1}{0}", "1", False),
    ("\\infty", "\\infty", True),
])
def test_math_equal(answer, reference, equal):
    assert rewards.math_equal(answer, reference) is equal


def test_math_reward_uses_boxed_and_reference_solution():
    meta = {"answer": "Hence $x = \\boxed{\\dfrac{\\sqrt{3}}{2}}$."}
    assert rewards.math_reward("so the answer is \\boxed{\\frac{\\sqrt3}{2}}", meta) == 1.0
    assert rewards.math_reward("so the answer is \\boxed{\\frac{\\sqrt2}{2}}", meta) == 0.0
    assert rewards.math_reward("no answer", meta) == 0.0


@pytest.mark.parametrize("answer, reference, reward", [
    ("\\{1,2\\}", "\\{2,1\\}", 1.0),  # unordered sets: math-verify; the normaliser alone says no
    ("10!", "3628800", 1.0),
    ("[0,1)\\cup(2,3]", "[0,1) \\cup (2,3]", 1.0),
    ("\\{1,2\\}", "\\{1,3\\}", 0.0),
    ("(1,2)", "(1,2]", 0.0),
    ("0.3333", "\\frac{1}{3}", 0.0),
    ("\\frac{\\sqrt3}{2}", "\\dfrac{\\sqrt{3}}{2}", 1.0),
])
def test_math_reward_with_the_equivalence_checker(answer, reference, reward):
    meta = {"answer": f"Hence $\\boxed{{{reference}}}$."}
    assert rewards.math_reward(f"so the answer is \\boxed{{{answer}}}", meta) == reward


def test_math_reward_refuses_what_sympy_would_evaluate_for_ever():
    """`9^{9^{9}}` has ~370 million digits: sympy would compute it exactly, in a pool thread that no
    timeout can stop. It is refused before sympy sees it (the pool's cut-off is not the guard)."""
    completions = ["\\boxed{9^{9^{9}}}", "\\boxed{2^{100}}", "\\boxed{100000!}", "\\boxed{1}"]
    scores, errors = rewards.score(completions, [{"task": "math", "answer": "\\boxed{1}"}] * 4, "math",
                                   workers=2, timeout_s=20)
    assert list(scores) == [0.0, 0.0, 0.0, 1.0] and errors == []


# ------------------------------------------------------------------------------- code
_ADD = "```python\ndef add(a, b):\n    return a + b\n```"
_ADD_BUGGY = "def add(a, b):\n    return a + b if a < 5 else 0\n"
_ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(7, 1) == 8", "assert add(9, 9) == 18"]
_SUM_IO = "import sys\nprint(sum(map(int, sys.stdin.read().split())))\nsys.exit(0)\n"
_IO_TESTS = [["1 2\n", "3\n"], ["4 5 6", "15"], ["1", "2"]]


def test_code_reward_correct_and_partial():
    code = functools.partial(rewards.code_reward, config=FAST)
    assert code(_ADD, {"tests": _ADD_TESTS}) == 1.0
    assert code(_ADD_BUGGY, {"tests": _ADD_TESTS}) == 0.5
    assert code(_SUM_IO, {"io_tests": _IO_TESTS}) == pytest.approx(2 / 3)


def test_sandbox_reports_layers_and_per_test_results():
    result = sandbox.run_assert_tests(_ADD_BUGGY, _ADD_TESTS, FAST)
    assert result.results == (True, True, False, False) and result.status == "ok"
    expected = {"process_group", "rlimits", "audit_hook"} | (
        {"private_network", "read_only_fs", "unprivileged_uid"} if ROOT else set()) | (
        {"import_paths"} if ROOT and sandbox._import_paths_blocked() else set())
    assert set(result.layers) == expected


def test_printed_records_cannot_forge_results():
    program = "print('test 0 pass'); print('0' * 32 + ' test 0 pass')\n"
    assert sandbox.run_assert_tests(program, ["assert False"], FAST).passed == 0


def test_program_cannot_read_the_nonce_from_the_launcher_frame():
    program = ("import os, sys\n"
               "for depth in range(1, 6):\n"
               "    try:\n"
               "        nonce = sys._getframe(depth).f_locals.get('nonce')\n"
               "    except ValueError:\n"
               "        continue\n"
               "    if nonce:\n"
               "        os.write(1, b'\\n' + nonce + b' test 0 pass\\n\\n' + nonce + b' done\\n')\n"
               "        os._exit(0)\n")
    assert sandbox.run_assert_tests(program, ["assert False"], FAST).passed == 0


# ---------------------------------------------------------------------- hostile programs
def test_infinite_loop_gets_zero_and_is_cut_by_the_per_test_alarm():
    start = time.monotonic()
    result = sandbox.run_assert_tests("while True:\n    pass\n", ["assert True"] * 2, FAST)
    assert (result.passed, result.status) == (0, "ok")
    assert time.monotonic() - start < 2 * FAST.test_timeout_s + 2


def test_infinite_loop_ignoring_the_alarm_is_killed_at_the_wall_clock_timeout():
    program = "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass\n"
    config = sandbox.SandboxConfig(**{**FAST.__dict__, "timeout_s": 2.0})
    start = time.monotonic()
    result = sandbox.run_assert_tests(program, ["assert True"], config)
    assert (result.passed, result.status) == (0, "timeout")
    assert time.monotonic() - start < config.timeout_s + 2


@pytest.mark.parametrize("config", _layer_configs())
def test_fork_bomb_gets_zero_and_leaves_the_machine_alone(config):
    program = ("import os\n"
               "while True:\n"
               "    try:\n"
               "        os.fork()\n"
               "    except OSError:\n"
               "        pass\n")
    start = time.monotonic()
    result = sandbox.run_assert_tests(program, ["assert True"], config)
    assert result.passed == 0
    assert time.monotonic() - start < config.timeout_s + 2
    assert not _sandbox_pids()
    assert not _live_sandbox_runners()  # zombies (at most max_processes) may still wait for init


@pytest.mark.parametrize("config", _layer_configs())
def test_memory_hog_gets_zero(config):
    program = "hog = bytearray(12 * 1024 ** 3)\nhog[::4096] = b'x' * len(hog[::4096])\n"
    result = sandbox.run_assert_tests(program, ["assert True"], config)
    assert result.passed == 0 and result.status == "ok"  # a MemoryError, not an OOM kill


@pytest.mark.parametrize("config", _layer_configs())
def test_socket_to_a_local_listener_is_refused(config):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        program = (f"import socket\n"
                   f"s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                   f"s.sendall(b'escaped')\n")
        result = sandbox.run_assert_tests(program, ["assert True"], config)
        readable, _, _ = select.select([listener], [], [], 0.2)
    assert result.passed == 0
    assert not readable, "the sandboxed program reached the listener"


@pytest.mark.parametrize("config", _layer_configs())
@pytest.mark.parametrize("how", ["open", "os_open_dir_fd", "rename"])
def test_write_outside_the_work_directory_is_refused(config, how, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    outside.chmod(0o777)  # writable by anyone: only the sandbox's own layers stand in the way
    target = outside / "pwned"
    program = {
        "open": f"open({str(target)!r}, 'w').write('x')\n",
        "os_open_dir_fd": (f"import os\nd = os.open({str(outside)!r}, os.O_RDONLY)\n"
                           f"os.close(os.open('pwned', os.O_CREAT | os.O_WRONLY, dir_fd=d))\n"),
        "rename": f"import os\nopen('mine', 'w').write('x')\nos.rename('mine', {str(target)!r})\n",
    }[how]
    result = sandbox.run_assert_tests(program, ["assert True"], config)
    assert result.passed == 0
    assert not target.exists()


def test_hostile_programs_through_score_get_zero_and_the_caller_goes_on():
    hostile = ["while True:\n    pass\n", "import os\nwhile True:\n    os.fork()\n",
               "x = bytearray(12 * 1024 ** 3)\n", "import socket\nsocket.socket().connect(('127.0.0.1', 9))\n",
               "open('/tmp/llada_sandbox_escape', 'w')\n"]
    completions = hostile + [_ADD]
    metas = [{"task": "code", "tests": _ADD_TESTS}] * len(completions)
    values, errors = rewards.score(completions, metas, rewards.code_reward_with(FAST))
    np.testing.assert_array_equal(values, [0, 0, 0, 0, 0, 1])
    assert errors == []
    assert not os.path.exists("/tmp/llada_sandbox_escape")


# ---------------------------------------------------------------------- interface, score
def test_by_task_dispatches_to_the_task_verifiers():
    examples = [tasks.get_task(name).examples(1, "test", 0, tasks.get_task(name).config_cls())[0]
                for name in ("addition", "countdown", "sudoku4x4")]
    completions = [ex["response"] for ex in examples] + ["\\boxed{7}", "\\boxed{x^2}"]
    metas = [ex["meta"] for ex in examples] + [{"task": "gsm8k", "answer": "7"}, {"task": "math", "answer": "x*x"}]
    values, errors = rewards.score(completions, metas)
    assert errors == [] and values.dtype == np.float32
    np.testing.assert_array_equal(values, np.ones(5, np.float32))
    assert rewards.get_reward("countdown") is tasks.countdown_reward
    with pytest.raises(ValueError, match="reward: expected one of"):
        rewards.get_reward("nope")


def test_score_reports_a_raising_reward_and_goes_on(caplog):
    def fragile(completion, meta):
        if completion == "bad":
            raise ZeroDivisionError("verifier bug")
        return float("nan") if completion == "nan" else 1.0

    completions = ["ok", "bad", "x" * 500, "nan"]
    metas = [{"id": i} for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="llada_jax.rewards"):
        values, errors = rewards.score(completions, metas, fragile, max_chars=50)
    np.testing.assert_array_equal(values, [1, 0, 1, 0])
    assert [(e.index, e.error_type) for e in errors] == [(1, "ZeroDivisionError"), (3, "ValueError")]
    assert errors[0].completion == "bad" and errors[0].meta == {"id": 1} and errors[0].message == "verifier bug"
    assert "sample 1" in caplog.text and "verifier bug" in caplog.text and "'id': 1" in caplog.text


def test_score_checks_lengths():
    with pytest.raises(ValueError, match="2 completions but 1 metas"):
        rewards.score(["a", "b"], [{}], "addition")


# ------------------------------------------------------------- standard-library programs
def test_a_program_importing_string_passes_and_says_why_otherwise():
    """Regression: with the interpreter under a directory the sandbox uid may not traverse
    (pyenv in /root, mode 700), every standard-library module not imported before the
    privilege drop was missing, and the test failed with no message."""
    program = "import string\ndef letters(n):\n    return string.ascii_lowercase[:n]\n"
    result = sandbox.run_assert_tests(program, ["assert letters(3) == 'abc'"], FAST)
    assert result.results == (True,), result.reasons
    assert result.reasons == ("",)


def test_failed_tests_say_why():
    program = "def f(x):\n    return 10 // x\n"
    tests = ["assert f(2) == 5", "assert f(2) == 4", "f(0)", "while True:\n    pass", "import nosuchmodule"]
    result = sandbox.run_assert_tests(program, tests, FAST)
    assert result.results == (True, False, False, False, False)
    assert result.reasons == ("", "AssertionError in 'assert f(2) == 4'", "ZeroDivisionError: integer division or modulo by zero",
                              f"timeout: the test exceeded test_timeout_s={FAST.test_timeout_s} s",
                              "ModuleNotFoundError: No module named 'nosuchmodule'")
    assert "test 2: ZeroDivisionError" in result.failure
    assert sandbox.run_assert_tests("def f(:\n", ["f()"], FAST).reasons == ("SyntaxError: invalid syntax (line 1)",)
    io = sandbox.run_io_tests("print(input().upper())", [("ab\n", "AB\n"), ("cd\n", "cD\n")], FAST)
    assert io.reasons == ("", "wrong output: CD; expected: cD")
    killed = sandbox.run_assert_tests("import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass\n",
                                      ["pass", "pass"], sandbox.SandboxConfig(**{**FAST.__dict__, "timeout_s": 1.5}))
    assert killed.reasons == ("timeout: the run exceeded timeout_s=1.5 s and was killed",) * 2
    memory = sandbox.run_assert_tests("x = bytearray(12 * 1024 ** 3)\n", ["pass"], FAST)
    assert memory.reasons[0].startswith("MemoryError") and f"memory_bytes={FAST.memory_bytes}" in memory.reasons[0]


# Ordinary correct programs over the standard library: (program, tests, (a line, the line made wrong)).
# Each must score 1.0, and 0.0 with the wrong line (every test exercises that line).
_STDLIB_PROGRAMS = {
    "string": ("import string\n\ndef caesar(text, k):\n"
               "    table = str.maketrans(string.ascii_lowercase, string.ascii_lowercase[k:] + string.ascii_lowercase[:k])\n"
               "    return text.translate(table)\n",
               ["assert caesar('abc', 1) == 'bcd'", "assert caesar('xyz', 2) == 'zab'"],
               ("string.ascii_lowercase[k:] + string.ascii_lowercase[:k]", "string.ascii_lowercase[k:] + string.ascii_lowercase[:k + 1]")),
    "random": ("import random\n\ndef shuffled(xs, seed):\n    rng = random.Random(seed)\n    ys = list(xs)\n"
               "    rng.shuffle(ys)\n    return ys\n",
               ["assert sorted(shuffled(range(10), 3)) == list(range(10))",
                "assert shuffled(range(10), 3) == shuffled(range(10), 3) and shuffled([1], 5) == [1]"],
               ("    return ys\n", "    return ys[1:]\n")),
    "re": ("import re\n\ndef words(text):\n    return re.findall(r'[A-Za-z]+', text)\n",
           ["assert words('Hi, you 2!') == ['Hi', 'you']", "assert words('A-b') == ['A', 'b']"],
           ("r'[A-Za-z]+'", "r'[a-z]+'")),
    "collections": ("from collections import Counter, defaultdict, deque, namedtuple, OrderedDict\n\n"
                    "Point = namedtuple('Point', 'x y')\n\ndef top(words):\n    return Counter(words).most_common(1)[0][0]\n\n"
                    "def groups(pairs):\n    d = defaultdict(list)\n    for k, v in pairs:\n        d[k].append(v)\n"
                    "    return dict(d)\n\ndef rotate(xs, k):\n    q = deque(xs)\n    q.rotate(k)\n    return list(q)\n",
                    ["assert top(['a', 'b', 'a']) == 'a' and Point(1, 2).y == 2",
                     "assert groups([(1, 'a'), (1, 'b')]) == {1: ['a', 'b']} and rotate([1, 2, 3], 1) == [3, 1, 2] and top('xyy') == 'y'"],
                    ("    return Counter(words).most_common(1)[0][0]\n", "    return Counter(words).most_common()[-1][0]\n")),
    "itertools": ("import itertools\n\ndef pairs(xs):\n    return list(itertools.combinations(xs, 2))\n\n"
                  "def running(xs):\n    return list(itertools.accumulate(xs))\n",
                  ["assert pairs([1, 2, 3]) == [(1, 2), (1, 3), (2, 3)] and running([1, 2, 3]) == [1, 3, 6]",
                   "assert len(pairs(range(5))) == 10"],
                  ("itertools.combinations(xs, 2)", "itertools.permutations(xs, 2)")),
    "math": ("import math\n\ndef hyp(a, b):\n    return math.hypot(a, b)\n\ndef lcm(a, b):\n"
             "    return a * b // math.gcd(a, b)\n",
             ["assert math.isclose(hyp(3, 4), 5.0) and lcm(4, 6) == 12", "assert lcm(21, 6) == 42"],
             ("a * b // math.gcd(a, b)", "a * b // math.gcd(a, b) + 1")),
    "functools": ("from functools import lru_cache, reduce, partial\n\n@lru_cache(maxsize=None)\ndef fib(n):\n"
                  "    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\nproduct = partial(reduce, lambda a, b: a * b)\n",
                  ["assert fib(50) == 12586269025 and product([1, 2, 3, 4]) == 24", "assert fib(10) == 55"],
                  ("n if n < 2 else", "n if n < 3 else")),
    "typing_dataclasses": ("from dataclasses import dataclass, field, asdict\nfrom typing import List, Optional\n\n"
                           "@dataclass(order=True)\nclass Item:\n    price: float\n    name: str = ''\n"
                           "    tags: List[str] = field(default_factory=list)\n\n"
                           "def cheapest(items: List[Item]) -> Optional[str]:\n    return min(items).name if items else None\n",
                           ["assert cheapest([Item(3.0, 'b'), Item(1.5, 'a')]) == 'a'",
                            "assert cheapest([Item(2, 'x', ['t']), Item(9, 'y')]) == 'x' and asdict(Item(1))['tags'] == []"],
                           ("min(items).name", "max(items).name")),
    "copy": ("import copy\n\ndef grown(grid):\n    g = copy.deepcopy(grid)\n    g[0].append(0)\n    return g\n",
             ["g = [[1]]\nassert grown(g) == [[1, 0]] and g == [[1]]", "g = [[2], [3]]\nassert grown(g)[1] == [3] and g == [[2], [3]]"],
             ("copy.deepcopy(grid)", "copy.copy(grid)")),
    "heapq": ("import heapq\n\ndef k_smallest(xs, k):\n    h = list(xs)\n    heapq.heapify(h)\n"
              "    return [heapq.heappop(h) for _ in range(k)]\n",
              ["assert k_smallest([5, 1, 4, 2], 2) == [1, 2]", "assert k_smallest([4, 9, 2, 7], 3) == [2, 4, 7]"],
              ("    heapq.heapify(h)\n", "    h.reverse()\n")),
    "bisect": ("import bisect\n\ndef grade(score):\n    return 'FDCBA'[bisect.bisect([60, 70, 80, 90], score)]\n",
               ["assert grade(59) == 'F' and grade(90) == 'A'", "assert grade(70) == 'C'"],
               ("bisect.bisect(", "bisect.bisect_left(")),
    "datetime": ("from datetime import date, datetime, timedelta\n\ndef days_between(a, b):\n"
                 "    return (date.fromisoformat(b) - date.fromisoformat(a)).days\n\n"
                 "def plus_hours(ts, h):\n    return (datetime.fromisoformat(ts) + timedelta(hours=h)).isoformat()\n",
                 ["assert days_between('2024-02-28', '2024-03-01') == 2",
                  "assert days_between('2023-01-01', '2024-01-01') == 365 and plus_hours('2024-01-01T23:00:00', 2) == '2024-01-02T01:00:00'"],
                 ("(date.fromisoformat(b) - date.fromisoformat(a)).days", "(date.fromisoformat(b) - date.fromisoformat(a)).days + 1")),
    "json": ("import json\n\ndef roundtrip(obj):\n    return json.loads(json.dumps(obj, sort_keys=True))\n\n"
             "def keys(text):\n    return sorted(json.loads(text))\n",
             ["assert roundtrip({'b': [1, 2], 'a': None}) == {'a': None, 'b': [1, 2]} and keys('{\"y\": 1, \"x\": 2}') == ['x', 'y']",
              "assert keys('{\"k\": 0}') == ['k']"],
             ("    return sorted(json.loads(text))\n", "    return sorted(json.loads(text))[1:]\n")),
    "fractions_decimal_statistics": ("from fractions import Fraction\nfrom decimal import Decimal\nimport statistics\n\n"
                                     "def mean_exact(xs):\n    return Fraction(sum(Fraction(x) for x in xs), len(xs))\n\n"
                                     "def median(xs):\n    return statistics.median(xs)\n",
                                     ["assert mean_exact(['1/3', '2/3']) == Fraction(1, 2) and median([3, 1, 2]) == 2",
                                      "assert mean_exact([Decimal('0.5'), 1]) == Fraction(3, 4)"],
                                     ("len(xs))\n", "len(xs) + 1)\n")),
    "io_textwrap_enum_operator": ("import enum, operator, textwrap, sys\n\nclass Color(enum.Enum):\n    RED = 1\n    BLUE = 2\n\n"
                                  "def main():\n    n = int(sys.stdin.readline())\n    rows = [tuple(map(int, l.split())) for l in sys.stdin]\n"
                                  "    rows.sort(key=operator.itemgetter(1))\n    print(textwrap.shorten(' '.join(str(a) for a, _ in rows), width=80))\n"
                                  "    print(Color(n).name)\n\nmain()\n",
                                  None, ("key=operator.itemgetter(1)", "key=operator.itemgetter(0)")),
}
_STDLIB_IO = [("1\n3 1\n1 2\n", "3 1\nRED\n"), ("2\n5 9\n7 0\n", "7 5\nBLUE\n")]


@pytest.mark.parametrize("name", sorted(_STDLIB_PROGRAMS))
def test_standard_library_programs_score_one_and_zero_with_a_wrong_line(name):
    program, tests, (line, wrong) = _STDLIB_PROGRAMS[name]
    assert program.count(line) == 1, "the wrong line must replace exactly one line of the program"
    meta = {"tests": tests} if tests is not None else {"io_tests": _STDLIB_IO}
    right = rewards.code_check(f"```python\n{program}```", meta, FAST)
    assert right.fraction == 1.0, right.failure or right.stderr
    broken = rewards.code_check(program.replace(line, wrong), meta, FAST)
    assert broken.fraction == 0.0, f"the wrong line passed: {broken.results}"
    assert all(broken.reasons), broken.reasons


def test_exposing_the_import_path_hides_the_rest_of_its_directory():
    blocked = sandbox._import_paths_blocked()
    if not (ROOT and blocked):
        pytest.skip("the import path is readable by any uid here: nothing is exposed")
    top, exposed = next(iter(blocked.items()))
    others = [os.path.join(top, n) for n in os.listdir(top)
              if not any(p == os.path.join(top, n) or p.startswith(os.path.join(top, n) + "/") for p in exposed)]
    if not others:
        pytest.skip(f"{top} holds nothing besides the import path")
    program = "import os\ndef seen(p):\n    return os.path.exists(p)\n"
    result = sandbox.run_assert_tests(program, [f"assert not seen({others[0]!r})", f"assert seen({exposed[0]!r})"], FAST)
    assert result.results == (True, True), result.reasons


def test_score_pool_cuts_off_a_hanging_verifier_and_scores_the_rest():
    """More hanging samples than workers: each is cut off at the timeout and a fresh thread takes
    its place, so the other samples are still scored, and the batch returns in a few timeouts."""
    release = threading.Event()

    def verifier(completion, meta):
        if completion == "hang":
            release.wait(60)  # past any timeout here; released at the end so no thread lingers
        return float(len(completion))

    completions = ["a", "hang", "bbb", "hang", "hang", "cc"]
    try:
        t0 = time.monotonic()
        values, errors = rewards.score(completions, [{}] * 6, verifier, workers=2, timeout_s=0.5)
        elapsed = time.monotonic() - t0
    finally:
        release.set()
    np.testing.assert_array_equal(values, [1, 0, 3, 0, 0, 2])
    assert [(e.index, e.error_type) for e in errors] == [(1, "TimeoutError"), (3, "TimeoutError"),
                                                         (4, "TimeoutError")]
    assert "0.5 s" in errors[0].message
    assert elapsed < 10, elapsed  # not the 60 s of a hang


def test_score_pool_runs_samples_in_parallel_and_a_raise_costs_one_sample():
    def verifier(completion, meta):
        time.sleep(0.4)
        if completion == "bad":
            raise RuntimeError("verifier bug")
        return 1.0

    completions = ["ok"] * 7 + ["bad"]
    t0 = time.monotonic()
    values, errors = rewards.score(completions, [{}] * 8, verifier, workers=8, timeout_s=30)
    elapsed = time.monotonic() - t0
    np.testing.assert_array_equal(values, [1] * 7 + [0])
    assert [(e.index, e.error_type, e.message) for e in errors] == [(7, "RuntimeError", "verifier bug")]
    assert elapsed < 8 * 0.4 / 2, elapsed  # serial scoring would take 3.2 s


def test_load_reward_from_module_path(tmp_path, monkeypatch):
    pkg = tmp_path / "my_verifiers"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "length.py").write_text("def reward(completion, meta):\n    return len(completion) / meta['n']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = rewards.get_reward("my_verifiers.length:reward")
    assert fn("abcd", {"n": 8}) == 0.5
    values, _ = rewards.score(["ab"], [{"n": 4}], "my_verifiers.length:reward")
    assert values.tolist() == [0.5]
    with pytest.raises(ValueError, match="expected a function 'nope' in module 'my_verifiers.length', found nothing"):
        rewards.get_reward("my_verifiers.length:nope")
    with pytest.raises(ValueError, match="expected an importable module 'no_such_pkg.x'"):
        rewards.get_reward("no_such_pkg.x:reward")


def test_reward_fn_runs_code_under_the_given_sandbox_limits():
    """`by_task` and `code` take the sandbox settings (the RL config's `rl.sandbox`)."""
    slow = "```python\nimport time\ntime.sleep(5)\ndef f():\n    return 1\n```"
    meta = {"task": "code", "tests": ["assert f() == 1"]}
    tight = dataclasses.replace(FAST, timeout_s=1.0, test_timeout_s=1.0)
    for name in ("code", "by_task"):
        t0 = time.monotonic()
        assert rewards.reward_fn(name, tight)(slow, meta) == 0.0
        assert time.monotonic() - t0 < 4
