"""Offline tasks, generated locally and deterministically, with their verifiers (REFERENCE §6).

Three tasks need no download and have a programmatic reward:
- multi-digit addition (a warm-up for tiny models),
- Countdown: combine the given numbers, each exactly once, with + - * / to reach a target,
- 4x4 Sudoku: fill the blanks of a puzzle whose solution is unique.

An example is `{"prompt": str, "response": str, "meta": dict}`; `meta` holds what the reward
needs and its `task` key names the task, so `reward(completion, meta)` scores any of them.

Splits never share a problem: every problem has a key (the pair of addends, the multiset of
numbers and the target, the Sudoku solution grid) and a stable hash of the key decides its
split (train, validation for choosing settings, test for reporting), independently of the
seed. Datasets generated with different seeds therefore never leak test problems into
training either. Sudoku splits by solution grid, so a test puzzle's solution never appears in
training under a different set of blanks. The evaluation splits hold distinct problems (drawn
without replacement, `examples`); train examples are drawn with replacement.
"""

from __future__ import annotations

import dataclasses
import fractions
import itertools
import re
import zlib
from typing import Callable, Iterator, Mapping

import numpy as np

SPLITS = ("train", "validation", "test")
EVAL_SPLITS = ("validation", "test")
_END_MARKERS = ("<|role_end|>", "<|endoftext|>")


def split_of(key: str, test_fraction: float, validation_fraction: float = 0.0) -> str:
    """The split a problem belongs to: a stable hash of its key, not a seed. The test band is the
    same whatever `validation_fraction` is (validation problems come out of train)."""
    h = zlib.crc32(key.encode()) % 10_000
    if h < round(test_fraction * 10_000):
        return "test"
    return "validation" if h < round((test_fraction + validation_fraction) * 10_000) else "train"


def answer_text(completion: str) -> str:
    """The answer part of a decoded completion: up to the first end-of-turn or EOS marker, stripped."""
    for marker in _END_MARKERS:
        completion = completion.split(marker, 1)[0]
    return completion.strip()


def _rng(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split)])


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, found {split!r}")


# ---------------------------------------------------------------------------------- addition
@dataclasses.dataclass(frozen=True)
class AdditionConfig:
    min_digits: int = 1
    max_digits: int = 4
    test_fraction: float = 0.1
    # Fixed width: operands zero-padded to max_digits and the sum to max_digits + 1 digits
    # ("07+35=042"), so each answer digit sits at a fixed position next to the digits it depends
    # on; a parallel decoder otherwise has to infer the answer's length before any digit.
    zero_pad: bool = False
    # A noisy teacher (REFERENCE §8): with this probability a train demonstration whose sum
    # needs a carry drops every carry (67+34= "91", not "101"), the way distilled data carries
    # its teacher's systematic mistakes. Above 0.5 imitation learns the wrong answer as the
    # mode while the right one keeps the rest of the probability: a ceiling that SFT cannot
    # pass and a verifier can lift. The test split and the meta (the reward) stay exact.
    carry_error_rate: float = 0.0
    # Problems per example: `num_pairs` sums in one prompt, each pair drawn from the example's
    # split and each demonstration's carries dropped independently. Several pairs are written
    # back to back at a fixed stride, "07+3512+49" -> "=042,=061" (with zero_pad: 5 tokens per
    # pair and per answer), so with blocks of 5 tokens answer k sits exactly 5 * num_pairs tokens
    # after pair k: every answer is a block of its own (completions span num_pairs blocks, what
    # EBPO's block decomposition needs) and the reward gives partial credit.
    num_pairs: int = 1
    # Free spellings (several pairs only): with this probability, independently per token, a
    # response writes an answer's "=" as ":" and a separating "," as ";" ("=042;:061,=121"), in
    # every split. Neither spelling is wrong (the reward reads both), the way text leaves a writer
    # synonyms: a model that learnt the teacher is ~(1 - p) sure of the usual one, which S mode's
    # tau_mask (0.5) accepts at once and Q mode's (0.7) does not. 0 keeps "=" and ",".
    spelling_choice: float = 0.0
    validation_fraction: float = 0.05


def sum_without_carries(a: int, b: int) -> int:
    """Digit-wise sum modulo 10: the answer of a teacher that never carries."""
    out, place = 0, 1
    while a or b:
        out += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return out


def _operand(rng: np.random.Generator, cfg: AdditionConfig) -> int:
    digits = int(rng.integers(cfg.min_digits, cfg.max_digits + 1))
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return int(rng.integers(low, 10**digits))


def addition_stream(split: str, seed: int = 0, cfg: AdditionConfig = AdditionConfig()) -> Iterator[dict]:
    """The split's addition problems, drawn without end: `a+b=` (or `num_pairs` of them, comma-separated);
    the response is the decimal sum of each (in the train split, the carry-less sum with
    probability `cfg.carry_error_rate` where the two differ, per pair)."""
    _check_split(split)
    if not 0.0 <= cfg.carry_error_rate <= 1.0:
        raise ValueError(f"carry_error_rate: expected a probability in [0, 1], found {cfg.carry_error_rate}")
    if cfg.num_pairs < 1:
        raise ValueError(f"num_pairs: expected an integer >= 1, found {cfg.num_pairs}")
    if not 0.0 <= cfg.spelling_choice < 0.5:
        raise ValueError(f"spelling_choice: expected a probability in [0, 0.5), found {cfg.spelling_choice}")
    if cfg.spelling_choice and cfg.num_pairs == 1:
        raise ValueError("spelling_choice: expected 0 with num_pairs 1 (a one-pair answer has no '=' or ','), found "
                         f"{cfg.spelling_choice}")
    rng = _rng(seed, split)
    w = cfg.max_digits if cfg.zero_pad else 0

    def spell(usual: str, other: str) -> str:  # draws only when the choice is on: same problems otherwise
        return other if cfg.spelling_choice and rng.random() < cfg.spelling_choice else usual

    while True:
        pairs, prompts, answers = [], [], []
        while len(pairs) < cfg.num_pairs:
            a, b = _operand(rng, cfg), _operand(rng, cfg)
            if split_of(f"add:{min(a, b)}+{max(a, b)}", cfg.test_fraction, cfg.validation_fraction) != split:
                continue
            answer = a + b
            if split == "train" and cfg.carry_error_rate > 0 and rng.random() < cfg.carry_error_rate:
                answer = sum_without_carries(a, b)
            pairs.append([a, b])
            prompts.append(f"{a:0{w}d}+{b:0{w}d}")
            answers.append(f"{answer:0{w + 1 if w else 0}d}")
        if cfg.num_pairs == 1:
            yield {"prompt": prompts[0] + "=", "response": answers[0],
                    "meta": {"task": "addition", "a": pairs[0][0], "b": pairs[0][1]}}
        else:
            response = "".join((spell(",", ";") if k else "") + spell("=", ":") + x for k, x in enumerate(answers))
            yield {"prompt": "".join(prompts), "response": response, "meta": {"task": "addition", "pairs": pairs}}


def addition_examples(num: int, split: str, seed: int = 0, cfg: AdditionConfig = AdditionConfig()) -> list[dict]:
    """The first `num` of `addition_stream`."""
    return list(itertools.islice(addition_stream(split, seed, cfg), num))


def addition_reward(completion: str, meta: Mapping) -> float:
    """1.0 iff the answer is exactly the decimal sum; with several pairs (`meta["pairs"]`), the
    fraction of the comma-separated `=sum` answers that are exact (1.0 = all of them; ";" and ":"
    read as "," and "=", AdditionConfig.spelling_choice)."""
    answer = answer_text(completion)
    if "pairs" not in meta:
        return float(re.fullmatch(r"\d+", answer) is not None and int(answer) == meta["a"] + meta["b"])
    pairs = meta["pairs"]
    parts = _answer_parts(answer)
    correct = sum(kind == "right" for kind, _ in _pair_kinds(parts, pairs))
    if len(parts) != len(pairs):
        correct = min(correct, len(pairs) - 1)  # extra or missing answers: never full credit
    return correct / len(pairs)


ADDITION_KINDS = ("right", "carryless", "other")


def addition_answer_kinds(completion: str, meta: Mapping) -> list[tuple[str, bool]]:
    """Per pair of a several-pair prompt (`meta["pairs"]`), what the completion's answer is and
    whether the sum needs a carry: ("right", needs_carry) for the exact sum, ("carryless", True) for
    the noisy teacher's answer where it differs (`sum_without_carries`), ("other", needs_carry) for
    anything else, a missing or malformed answer included (`addition_reward` counts the "right" ones)."""
    if "pairs" not in meta:
        raise ValueError(f"meta: expected a several-pair addition record with 'pairs', found keys {sorted(meta)}")
    return _pair_kinds(_answer_parts(answer_text(completion)), meta["pairs"])


def _answer_parts(answer: str) -> list[str]:
    """A several-pair answer's per-pair parts, split at either separator ("," or ";",
    AdditionConfig.spelling_choice)."""
    return re.split(r"[,;]", answer)


def _pair_kinds(parts: list[str], pairs) -> list[tuple[str, bool]]:
    """`addition_answer_kinds` of an answer already split by `_answer_parts`."""
    kinds = []
    for k, (a, b) in enumerate(pairs):
        carryless = sum_without_carries(a, b)
        needs_carry = carryless != a + b
        got = int(parts[k][1:]) if k < len(parts) and re.fullmatch(r"[=:]\d+", parts[k]) else None
        kind = "right" if got == a + b else "carryless" if needs_carry and got == carryless else "other"
        kinds.append((kind, needs_carry))
    return kinds


# --------------------------------------------------------------------------------- countdown
_OPS: dict[str, Callable[[fractions.Fraction, fractions.Fraction], fractions.Fraction]] = {
    "+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y, "/": lambda x, y: x / y}


@dataclasses.dataclass(frozen=True)
class CountdownConfig:
    num_numbers: int = 3
    low: int = 1  # numbers are drawn uniformly from [low, high]
    high: int = 100
    target_low: int = 1  # targets are drawn uniformly among the reachable integers in [target_low, target_high]
    target_high: int = 100
    test_fraction: float = 0.1
    validation_fraction: float = 0.05


def countdown_expressions(numbers: tuple[int, ...]) -> dict[fractions.Fraction, str]:
    """Every value reachable from `numbers`, each used exactly once, with an expression for it.

    Exact rational arithmetic; the expression kept for a value prefers one whose intermediate
    results are all non-negative integers (what a person would write), otherwise the first
    found. Exhaustive: feasible for the 3-4 numbers of the task.
    """
    best: dict[fractions.Fraction, tuple[bool, str]] = {}

    def search(items: list[tuple[fractions.Fraction, str, bool]]) -> None:
        if len(items) == 1:
            value, expr, nice = items[0]
            if value not in best or (nice and not best[value][0]):
                best[value] = (nice, expr[1:-1] if expr.startswith("(") else expr)
            return
        for i, j in itertools.permutations(range(len(items)), 2):
            (x, ex, nx), (y, ey, ny) = items[i], items[j]
            rest = [items[k] for k in range(len(items)) if k not in (i, j)]
            for op, fn in _OPS.items():
                if (op in "+*" and i > j) or (op == "/" and y == 0):
                    continue  # commutative ops: one order suffices
                value = fn(x, y)
                nice = nx and ny and value.denominator == 1 and value >= 0
                search(rest + [(value, f"({ex}{op}{ey})", nice)])

    search([(fractions.Fraction(n), str(n), True) for n in numbers])
    return {value: expr for value, (_, expr) in best.items()}


def solve_countdown(numbers: tuple[int, ...], target: int) -> str | None:
    """An expression using each number once that equals `target`, or None if unreachable."""
    return countdown_expressions(tuple(numbers)).get(fractions.Fraction(target))


def countdown_stream(split: str, seed: int = 0, cfg: CountdownConfig = CountdownConfig()) -> Iterator[dict]:
    """The split's Countdown problems, drawn without end; the response is a solver-found expression."""
    _check_split(split)
    rng = _rng(seed, split)
    while True:
        numbers = tuple(int(n) for n in rng.integers(cfg.low, cfg.high + 1, size=cfg.num_numbers))
        reachable = sorted((int(v), e) for v, e in countdown_expressions(numbers).items()
                           if v.denominator == 1 and cfg.target_low <= v <= cfg.target_high)
        if not reachable:
            continue
        target, expr = reachable[int(rng.integers(len(reachable)))]
        if split_of(f"countdown:{sorted(numbers)}:{target}", cfg.test_fraction, cfg.validation_fraction) != split:
            continue
        shown = ", ".join(map(str, numbers))
        yield {"prompt": f"Using {shown} once each with + - * /, make {target}.", "response": expr,
                "meta": {"task": "countdown", "numbers": list(numbers), "target": target}}


def countdown_examples(num: int, split: str, seed: int = 0, cfg: CountdownConfig = CountdownConfig()) -> list[dict]:
    """The first `num` of `countdown_stream`."""
    return list(itertools.islice(countdown_stream(split, seed, cfg), num))


_TOKEN = re.compile(r"\s*(?:(\d+)|([-+*/()]))")
_MAX_EXPRESSION_CHARS = 256


def parse_expression(text: str) -> tuple[fractions.Fraction | None, list[int]] | None:
    """Safely evaluates an arithmetic expression of non-negative integers, + - * / and parentheses.

    A recursive-descent parser, never `eval`. Returns None if `text` is not a well-formed
    expression (or is longer than 256 characters), else (value, the integers used in order);
    value is None on division by zero.
    """
    if len(text) > _MAX_EXPRESSION_CHARS:
        return None
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            return None
        tokens.append(int(m.group(1)) if m.group(1) is not None else m.group(2))
        pos = m.end()
    numbers: list[int] = []
    i = 0

    def peek():
        return tokens[i] if i < len(tokens) else None

    def factor():
        nonlocal i
        tok = peek()
        i += 1
        if isinstance(tok, int):
            numbers.append(tok)
            return fractions.Fraction(tok)
        if tok == "(":
            value = expr()
            if peek() != ")":
                raise SyntaxError
            i += 1
            return value
        raise SyntaxError

    def binary(operand, ops):
        def parse():
            nonlocal i
            value = operand()
            while peek() in ops:
                op = peek()
                i += 1
                right = operand()
                value = None if value is None or right is None or (op == "/" and right == 0) \
                    else _OPS[op](value, right)
            return value
        return parse

    term = binary(factor, ("*", "/"))
    expr = binary(term, ("+", "-"))
    try:
        value = expr()
    except (SyntaxError, RecursionError):  # RecursionError: pathological nesting
        return None
    if i != len(tokens):
        return None
    return value, numbers


def countdown_reward(completion: str, meta: Mapping) -> float:
    """1.0 for an expression equal to the target using each given number exactly once,
    0.1 for a well-formed expression that is wrong, 0.0 if the answer is not an expression."""
    parsed = parse_expression(answer_text(completion))
    if parsed is None:
        return 0.0
    value, used = parsed
    correct = value == meta["target"] and sorted(used) == sorted(meta["numbers"])
    return 1.0 if correct else 0.1


# ---------------------------------------------------------------------------------- sudoku
NUM_SUDOKU_GRIDS = 288


@dataclasses.dataclass(frozen=True)
class SudokuConfig:
    min_blanks: int = 10  # blanks are drawn uniformly from [min_blanks, max_blanks]
    max_blanks: int = 12  # 12 is the maximum: a 4x4 Sudoku needs at least 4 clues
    test_fraction: float = 0.15
    validation_fraction: float = 0.05
    # The grids as 16 digits each, no instruction and no line breaks: prompt "0100004023000020",
    # response "4132324123141423" (32 tokens in all with the task tokenizer, against 51).
    compact: bool = False


def sudoku_grids() -> np.ndarray:
    """All valid 4x4 Sudoku grids, int8 [288, 16] in row-major order, by backtracking."""
    grid = [0] * 16
    out = []

    def ok(cell: int, v: int) -> bool:
        r, c = divmod(cell, 4)
        box = (r // 2 * 2, c // 2 * 2)
        peers = {*(r * 4 + k for k in range(4)), *(k * 4 + c for k in range(4)),
                 *((box[0] + a) * 4 + box[1] + b for a in range(2) for b in range(2))}
        return all(grid[p] != v for p in peers if p != cell)

    def fill(cell: int) -> None:
        if cell == 16:
            out.append(list(grid))
            return
        for v in range(1, 5):
            if ok(cell, v):
                grid[cell] = v
                fill(cell + 1)
        grid[cell] = 0

    fill(0)
    grids = np.asarray(out, np.int8)
    assert len(grids) == NUM_SUDOKU_GRIDS, len(grids)
    return grids


_GRIDS = sudoku_grids()


def sudoku_num_solutions(puzzle: np.ndarray) -> int:
    """Number of valid grids that agree with the clues of `puzzle` ([16], 0 = blank)."""
    return int(((_GRIDS == puzzle) | (puzzle == 0)).all(axis=1).sum())


def _sudoku_text(cells: np.ndarray) -> str:
    return "\n".join("".join(str(int(v)) for v in cells[r * 4:(r + 1) * 4]) for r in range(4))


def _make_puzzle(rng: np.random.Generator, solution: np.ndarray, blanks: int) -> np.ndarray:
    """Blanks cells of `solution` in a random order, skipping any whose removal would make the
    solution ambiguous, until `blanks` cells are blank; retries with a new order if stuck."""
    for _ in range(100):
        puzzle = solution.copy()
        removed = 0
        for cell in rng.permutation(16):
            puzzle[cell] = 0
            if sudoku_num_solutions(puzzle) == 1:
                removed += 1
                if removed == blanks:
                    return puzzle
            else:
                puzzle[cell] = solution[cell]
    raise RuntimeError(f"no uniquely solvable puzzle with {blanks} blanks found for {solution.tolist()}")


def sudoku_stream(split: str, seed: int = 0, cfg: SudokuConfig = SudokuConfig()) -> Iterator[dict]:
    """The split's uniquely solvable 4x4 puzzles, drawn without end; the response is the solution grid."""
    _check_split(split)
    if not 1 <= cfg.min_blanks <= cfg.max_blanks <= 12:
        raise ValueError(f"blanks: expected 1 <= min_blanks <= max_blanks <= 12, found {cfg}")
    grids = [g for g in _GRIDS if split_of("sudoku:" + "".join(map(str, g)), cfg.test_fraction,
                                           cfg.validation_fraction) == split]
    rng = _rng(seed, split)
    while True:
        solution = grids[int(rng.integers(len(grids)))]
        puzzle = _make_puzzle(rng, solution, int(rng.integers(cfg.min_blanks, cfg.max_blanks + 1)))
        if cfg.compact:
            prompt, response = "".join(map(str, puzzle)), "".join(map(str, solution))
        else:
            prompt, response = "Solve the 4x4 sudoku (0 = blank):\n" + _sudoku_text(puzzle), _sudoku_text(solution)
        yield {"prompt": prompt, "response": response,
                "meta": {"task": "sudoku4x4", "puzzle": "".join(map(str, puzzle)),
                         "solution": "".join(map(str, solution))}}


def sudoku_examples(num: int, split: str, seed: int = 0, cfg: SudokuConfig = SudokuConfig()) -> list[dict]:
    """The first `num` of `sudoku_stream`."""
    return list(itertools.islice(sudoku_stream(split, seed, cfg), num))


def sudoku_reward(completion: str, meta: Mapping) -> float:
    """Fraction of the blank cells filled correctly; the answer's first 16 digits are the grid
    in row-major order (layout characters are ignored), missing cells count as wrong."""
    digits = re.findall(r"\d", answer_text(completion))[:16]
    blanks = [k for k, v in enumerate(meta["puzzle"]) if v == "0"]
    correct = sum(k < len(digits) and digits[k] == meta["solution"][k] for k in blanks)
    return correct / len(blanks)


# ---------------------------------------------------------------------------------- registry
@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    config_cls: type
    examples: Callable[..., list[dict]]  # (num, split, seed, cfg) -> examples
    stream: Callable[..., Iterator[dict]]  # (split, seed, cfg) -> the endless draw sequence examples() cuts
    reward: Callable[[str, Mapping], float]  # (completion, meta) -> reward in [0, 1]


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("addition", AdditionConfig, addition_examples, addition_stream, addition_reward),
    Task("countdown", CountdownConfig, countdown_examples, countdown_stream, countdown_reward),
    Task("sudoku4x4", SudokuConfig, sudoku_examples, sudoku_stream, sudoku_reward),
)}


def examples(task: str, num: int, split: str, seed: int = 0, cfg=None) -> list[dict]:
    """`num` examples of a task's split: train drawn with replacement, validation and test as
    distinct problems (the first `num` distinct prompts of the split's draw sequence, so a
    held-out score never counts a problem twice). Raises naming `num` when the split has fewer."""
    t = get_task(task)
    cfg = t.config_cls() if cfg is None else cfg
    if split not in EVAL_SPLITS:
        return t.examples(num, split, seed, cfg)
    # One pass over the draw sequence. A split with fewer distinct problems than asked shows it
    # as a stall: no new prompt for many draws. The draws allowed without one grow with those it
    # took to find the distinct ones so far (coupon collecting: the gaps grow as the pool
    # empties), so a large pool is never cut short, and a small one is declared in seconds.
    out, seen, draws, last_new = [], set(), 0, 0
    for ex in t.stream(split, seed, cfg):
        draws += 1
        if ex["prompt"] not in seen:
            seen.add(ex["prompt"])
            out.append(ex)
            last_new = draws
            if len(out) == num:
                return out
        elif draws - last_new > max(_STALL_DRAWS, 8 * last_new):
            break
    raise ValueError(f"num ({split}): expected at most the distinct problems of the {task!r} {split} split, found "
                     f"{num} requested and {len(out)} distinct, none new in the last {draws - last_new} of {draws} "
                     f"draws")


# Draws without a new prompt before a split counts as exhausted (beyond 8x the draws that found them).
_STALL_DRAWS = 20_000


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, found {name!r}")
    return TASKS[name]


def reward(completion: str, meta: Mapping) -> float:
    """The reward of a decoded completion for the problem described by `meta` (its `task` key)."""
    return get_task(meta["task"]).reward(completion, meta)


def sample_texts(num_per_task: int = 200, seed: int = 0) -> Iterator[str]:
    """Prompts and responses of every task: the default corpus of `build_task_tokenizer`."""
    for task in TASKS.values():
        for ex in task.examples(num_per_task, "train", seed, task.config_cls()):
            yield ex["prompt"]
            yield ex["response"]
