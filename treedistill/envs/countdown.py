"""Countdown: reach a target from four numbers with + - * /.

A problem is `{"numbers": [a, b, c, d], "target": T}`. The completion reasons in `<step>...</step>`
chunks and ends with `<answer>EXPR</answer>`; EXPR is parsed by `treedistill.envs.expr` (whitelisted
grammar, exact rationals, bounded work) and checked against the numbers.

Where we depart from the reference implementation (see ../shared/docs/method.md):
- The grader reads the completion only, never the prompt (the reference matched the example in its
  own system prompt when the completion had no tag), and evaluates exactly instead of with a
  general-purpose evaluator and float division.
- Targets come from the exact distribution of the reference's random reductions instead of running
  10,000 reductions per problem (same law; see `reduction_distribution`), so generation is fast.
- Ties among the least frequent values are broken by a seeded random choice; the reference's
  hash-map order is effectively random but not reproducible.
- Train and test are disjoint on `key()`; the reference's test split overlapped its train split on
  699 of 820 problems. The test split is drawn first and holds no duplicates; the train split is
  drawn next from the same generator, skipping test keys (train may repeat a problem, as the
  reference's does). Drawing test first keeps the test split an unbiased sample of the generator;
  drawing it second would reject the common problems and skew it towards rare ones. The price is
  paid by the train split: the generator has only a few thousand distinct problems and 820 test
  problems cover the common ones, so about 18% of train draws are skipped, mostly small targets
  (seed 42: train median 40 and mean 78 against 38 and 74 without skipping, which is also what the
  reference's train file shows).

The trace helpers (`Step`, `random_play`, `solve`, `format_completion`) write completions in the
format the prompt asks for, e.g.
`<step>13-9=4 (4 5 7)</step><step>4*5=20 (7 20)</step><step>20+7=27 (27)</step><answer>(13-9)*5+7</answer>`,
where each step restates the numbers still available, sorted ascending.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from treedistill.envs.base import ANSWER_CLOSE, ANSWER_OPEN, STEP_CLOSE, STEP_OPEN, Score
from treedistill.envs.expr import Evaluation, evaluate
from treedistill.jsonl import read_records, write_jsonl

SHIPPED_SPLITS = Path(__file__).resolve().parents[1] / "data" / "countdown"

__all__ = [
    "STEP_FORMATS",
    "CountdownEnv",
    "Step",
    "answer_expression",
    "extract_answer",
    "format_completion",
    "generate_problems",
    "key",
    "legal_result",
    "load_problems",
    "overlap",
    "random_play",
    "reduction_distribution",
    "solve",
    "step_expressions",
    "target_stats",
    "validate_problem",
    "write_problems",
]

NUMBER_RANGE = (1, 13)  # inclusive, as in the reference generator
REDUCTIONS = 10_000  # random full reductions per problem in the reference generator
MAX_TEST = 20_000  # of the ~23,000 distinct problems the generator makes (seed 42: 22,912 found in 229 s)
MAX_NUMBERS = 6  # problems with more numbers are refused (the solver's search grows factorially)
MAX_VALUE = 10**6  # numbers and targets are below it: a prompt stays a few dozen tokens (generated: <= 13, targets ~2,200)
OPS = "+-*/"

SYSTEM_PROMPT = (
    "You will get a list of numbers and a target number. Combine some or all of the numbers with "
    "addition, subtraction, multiplication and division to reach the target.\n"
    "Work it out in one or more steps, putting each step inside <step>...</step>. Then write exactly "
    "one final answer inside <answer>...</answer>: a single arithmetic expression that uses only the "
    "given numbers, each one at most once, the operators + - * / and parentheses. Every intermediate "
    "result must be a positive integer.\n"
    "For example, with numbers [3, 5, 7] and target 22 you could write:\n"
    "<step>5*3=15 (7 15)</step><step>15+7=22 (22)</step><answer>5*3+7</answer>"
)


# ----------------------------------------------------------------------------------------------
# Problems: validation, keys, files, statistics


def validate_problem(record) -> dict:
    """Return the canonical record `{"numbers": [...], "target": T}` or raise ValueError.

    Accepts our format and the reference's `{"input": [...], "target": T}`. Numbers are 1 to
    MAX_NUMBERS integers in 1..MAX_VALUE - 1; the target is an integer in the same range (positive:
    the dense reward divides by it; bounded: a problem's prompt must fit any model's context).
    """
    if not isinstance(record, dict):
        raise ValueError("a record must be a JSON object")
    numbers = record.get("numbers", record.get("input"))
    target = record.get("target")
    if not isinstance(numbers, list) or not 1 <= len(numbers) <= MAX_NUMBERS:
        raise ValueError(f'"numbers" must be a list of 1 to {MAX_NUMBERS} positive integers, got {_short(numbers)}')
    if not all(type(x) is int and 0 < x < MAX_VALUE for x in numbers):
        raise ValueError(f'"numbers" must hold positive integers below {MAX_VALUE:,}, got {_short(numbers)}')
    if type(target) is not int or not 0 < target < MAX_VALUE:
        raise ValueError(f'"target" must be a positive integer below {MAX_VALUE:,}, got {_short(target)}')
    return {"numbers": list(numbers), "target": target}


def _short(value) -> str:
    """repr of a record's field for an error message, cut to 60 characters."""
    big = isinstance(value, int) and abs(value) >= 10**60
    text = f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits" if big else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def key(problem: dict) -> tuple:
    """Identity up to the order of the numbers: ((sorted numbers), target)."""
    return (tuple(sorted(problem["numbers"])), problem["target"])


def load_problems(path) -> list[dict]:
    """Read a Countdown JSONL file (ours or the reference's format); errors name file and line."""
    return read_records(path, validate_problem)


def write_problems(path, problems: list[dict]) -> None:
    """Write problems as JSONL records `{"numbers": [...], "target": T}` (atomically)."""
    write_jsonl(path, [{"numbers": list(p["numbers"]), "target": p["target"]} for p in problems])


def target_stats(problems: list[dict]) -> dict:
    """min, median, mean, max of the targets, share of targets <= 100, and count."""
    targets = [p["target"] for p in problems]
    if not targets:
        return {"count": 0, "min": None, "median": None, "mean": None, "max": None, "share_le_100": None}
    return {
        "count": len(targets),
        "min": min(targets),
        "median": float(statistics.median(targets)),
        "mean": round(statistics.fmean(targets), 2),
        "max": max(targets),
        "share_le_100": round(sum(t <= 100 for t in targets) / len(targets), 4),
    }


def overlap(a: list[dict], b: list[dict]) -> int:
    """How many problems of `b` equal a problem of `a` up to number order (same `key`)."""
    keys = {key(p) for p in a}
    return sum(key(p) in keys for p in b)


# ----------------------------------------------------------------------------------------------
# The reference's legality rules, its random reduction, and target generation


def legal_result(a: int, op: str, b: int) -> int | None:
    """a op b under the reference generator's rules, or None when the operation is rejected.

    Rejected: subtraction with a result <= 0, multiplication by 0 or 1, division that is inexact or
    by 1 (or by 0). Addition of positive integers is always legal, so a reduction never gets stuck.
    """
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a > b else None
    if op == "*":
        return a * b if a > 1 and b > 1 else None
    if op == "/":
        return a // b if b > 1 and a % b == 0 else None
    raise ValueError(f"unknown operator {op!r}")


def _legal_moves(state: tuple[int, ...]) -> list[tuple[int, int, str, int, tuple[int, ...]]]:
    """Every accepted (a, b, op) over ORDERED pairs of distinct positions, with the next state.

    Equal numbers at different positions count separately, as they do for the reference's shuffle.
    Returns (a, b, op, result, next_state) with next_state sorted.
    """
    moves = []
    for i, a in enumerate(state):
        for j, b in enumerate(state):
            if i == j:
                continue
            rest = [x for k, x in enumerate(state) if k != i and k != j]
            for op in OPS:
                result = legal_result(a, op, b)
                if result is not None:
                    moves.append((a, b, op, result, tuple(sorted([*rest, result]))))
    return moves


_DISTRIBUTIONS: dict[tuple[int, ...], dict[int, float]] = {}


def reduction_distribution(numbers) -> dict[int, float]:
    """Exact law of the final value of one random full reduction of `numbers` (the reference's).

    The reference repeats: shuffle, take two numbers (a, b), draw an operator uniformly; if the
    operation is rejected the pair goes back and the whole step is retried with a fresh shuffle.
    Each try draws an ordered pair of distinct positions uniformly and an operator uniformly,
    independently of earlier tries, so the accepted step is uniform over the ACCEPTED
    (ordered pair, operator) combinations: retrying until acceptance is conditioning on acceptance.
    The reduction is therefore a Markov chain over multisets with
    P(next) = #accepted combinations leading to next / #accepted combinations,
    and the final value's law follows by recursion (memoised per sorted multiset; intermediate
    multisets are shared between problems). Sampling 10,000 counts from this law is the same as
    running 10,000 reductions (`tests/test_countdown.py` checks it against a direct simulation).

    Worked example: (2, 3) has 5 accepted combinations, 2+3, 3+2, 2*3, 3*2, 3-2, so
    P(5) = 2/5, P(6) = 2/5, P(1) = 1/5.
    """
    state = tuple(sorted(numbers))
    cached = _DISTRIBUTIONS.get(state)
    if cached is not None:
        return cached
    if len(state) == 1:
        dist = {state[0]: 1.0}
    else:
        moves = _legal_moves(state)
        weight = 1.0 / len(moves)
        dist = {}
        for *_, next_state in moves:
            for value, p in reduction_distribution(next_state).items():
                dist[value] = dist.get(value, 0.0) + weight * p
    _DISTRIBUTIONS[state] = dist
    return dist


_SAMPLING_TABLES: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}


def _sampling_table(state: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(values ascending, probabilities) for a sorted multiset, cached."""
    table = _SAMPLING_TABLES.get(state)
    if table is None:
        dist = reduction_distribution(state)
        values = np.array(sorted(dist), dtype=np.int64)
        probs = np.array([dist[int(v)] for v in values], dtype=np.float64)
        table = (values, probs / probs.sum())
        _SAMPLING_TABLES[state] = table
    return table


def _draw_problem(rng: np.random.Generator) -> dict:
    """One problem: four numbers uniform in 1..13, target = least frequent of 10,000 reductions."""
    low, high = NUMBER_RANGE
    numbers = [int(x) for x in rng.integers(low, high + 1, size=4)]
    values, probs = _sampling_table(tuple(sorted(numbers)))
    counts = rng.multinomial(REDUCTIONS, probs)  # the counts 10,000 reductions would give
    seen = counts > 0  # a value never produced is absent from the reference's frequency map
    rarest = values[seen & (counts == counts[seen].min())]
    target = int(rarest[rng.integers(len(rarest))])  # seeded random tie-break
    return {"numbers": numbers, "target": target}


def generate_problems(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Draw (train, test) splits, disjoint on `key`, deterministic for a seed.

    The test split is drawn first without duplicates, then the train split skipping test keys (see
    the module docstring for why).
    """
    if n_train < 0 or n_test < 0:
        raise ValueError("split sizes must be >= 0")
    if n_test > MAX_TEST:
        raise ValueError(f"a test split of more than {MAX_TEST:,} distinct problems cannot be drawn "
                         f"(the generator makes about 23,000 distinct ones; got {n_test:,})")
    rng = np.random.default_rng(seed)
    test: list[dict] = []
    test_keys: set = set()
    misses = 0  # draws in a row that gave a problem already drawn
    while len(test) < n_test:
        problem = _draw_problem(rng)
        k = key(problem)
        if k in test_keys:
            misses += 1
            # There are a few thousand distinct problems at most; say so instead of looping for hours.
            if misses > 10_000:
                raise ValueError(f"cannot draw {n_test:,} distinct test problems: {len(test):,} distinct ones "
                                 "were found, then 10,000 draws in a row gave no new one")
            continue
        misses = 0
        test_keys.add(k)
        test.append(problem)
    train: list[dict] = []
    while len(train) < n_train:
        problem = _draw_problem(rng)
        if key(problem) not in test_keys:
            train.append(problem)
    return train, test


# ----------------------------------------------------------------------------------------------
# Traces: random legal play, a solver, and the completion format


@dataclass(frozen=True)
class Step:
    """One combination `a op b = result`; `remaining` is the multiset left after it, sorted."""

    a: int
    op: str
    b: int
    result: int
    remaining: tuple[int, ...]

    def text(self) -> str:
        """'13-9=4 (4 5 7)'."""
        return f"{self.a}{self.op}{self.b}={self.result} ({' '.join(map(str, self.remaining))})"


def _check_numbers(numbers) -> tuple[int, ...]:
    numbers = tuple(numbers)
    if not numbers or not all(type(x) is int and x > 0 for x in numbers):
        raise ValueError(f"numbers must be positive integers, got {numbers!r}")
    return numbers


def _randbelow(rng, n: int) -> int:
    """A uniform index in [0, n) from a `random.Random` or a `numpy.random.Generator`."""
    return int(rng.integers(n)) if hasattr(rng, "integers") else rng.randrange(n)


def random_play(numbers, rng) -> list[Step]:
    """Combine two available numbers with a uniformly random legal operation until one is left.

    `rng` is a `random.Random` or `numpy.random.Generator`. Legality is the generator's
    (`legal_result`), and the choice is uniform over the legal (ordered pair, operator)
    combinations, i.e. the same law as the reference's reductions. With positive integers addition
    is always legal, so a play never gets stuck: it always ends with a single number, and the
    returned list has len(numbers) - 1 steps.
    """
    state = tuple(sorted(_check_numbers(numbers)))
    steps = []
    while len(state) > 1:
        moves = _legal_moves(state)
        a, b, op, result, state = moves[_randbelow(rng, len(moves))]
        steps.append(Step(a, op, b, result, state))
    return steps


def solve(numbers, target: int, rng=None, *, use_all: bool = False) -> list[Step] | None:
    """The first exact solution a depth-first search finds, as steps, or None when there is none.

    Depth-first search over multisets with the generator's legality rules, stopping as soon as an
    intermediate result equals the target (so a subset of the numbers may be used; `use_all=True`
    requires all of them). Rejecting *1, /1 and non-positive differences loses no reachable target
    when subsets are allowed: such a step can always be dropped. At least one step is returned, so a
    target that is one of the numbers and cannot be rebuilt by a legal step gives None. `rng`
    (`random.Random` or `numpy.random.Generator`) shuffles the order in which moves are tried, for
    varied solutions; None tries them in a fixed order.
    """
    start = tuple(sorted(_check_numbers(numbers)))
    dead: set[tuple[int, ...]] = set()  # states from which the target is unreachable

    def order(moves):
        if rng is None:
            return moves
        moves = list(moves)
        for i in range(len(moves) - 1, 0, -1):  # Fisher-Yates, for either kind of rng
            j = _randbelow(rng, i + 1)
            moves[i], moves[j] = moves[j], moves[i]
        return moves

    # Iterative DFS: a stack of (state, moves still to try, steps so far).
    stack = [(start, iter(order(_legal_moves(start))), [])]
    while stack:
        state, moves, steps = stack[-1]
        move = next(moves, None)
        if move is None:
            dead.add(state)
            stack.pop()
            continue
        a, b, op, result, next_state = move
        path = [*steps, Step(a, op, b, result, next_state)]
        if result == target and (not use_all or len(next_state) == 1):
            return path
        if len(next_state) > 1 and next_state not in dead:
            stack.append((next_state, iter(order(_legal_moves(next_state))), path))
    return None


# Expression building with minimal parentheses: precedence of the top operator of each subexpression.
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3


def _combine(left: tuple[str, int], op: str, right: tuple[str, int]) -> tuple[str, int]:
    """Join two (text, precedence) subexpressions with `op`, adding only the parentheses needed.

    Left operand: parenthesised when it binds weaker than op. Right operand: also when it binds
    equally and op is - or / (a-(b-c), a/(b*c)). a+(b-c) = a+b-c and a*(b/c) = a*b/c exactly, and
    with positive-integer steps the flattened forms keep positive-integer intermediates.
    """
    prec = _PREC[op]
    lt, lp = left
    rt, rp = right
    if lp < prec:
        lt = f"({lt})"
    if rp < prec or (rp == prec and op in "-/"):
        rt = f"({rt})"
    return f"{lt}{op}{rt}", prec


def _step_trees(steps: list[Step]) -> list[tuple]:
    """The tree each step's result stands for: a starting number is an int, a step's result the node
    (step index, op, left tree, right tree, result).

    The starting numbers are recovered from the first step (remaining - result + a + b). When a
    value appears more than once, the most recently made one is used, so the trees follow the
    trace; any choice would be valid, as each available number stands for disjoint inputs.
    """
    if not steps:
        raise ValueError("a trace needs at least one step")
    first = steps[0]
    pool = Counter(first.remaining)
    pool[first.result] -= 1
    if pool[first.result] < 0:
        raise ValueError(f"inconsistent first step: {first.text()}")
    available: list[tuple[int, object]] = [(x, x) for x in [*sorted(pool.elements()), first.a, first.b]]
    trees = []
    for i, step in enumerate(steps):
        operands = []
        for value in (step.b, step.a):
            index = next((j for j in range(len(available) - 1, -1, -1) if available[j][0] == value), None)
            if index is None:
                raise ValueError(f"step {step.text()} uses {value}, which is not available")
            operands.append(available.pop(index)[1])
        if legal_result(step.a, step.op, step.b) != step.result:
            raise ValueError(f"step {step.text()} is not a legal operation")
        node = (i, step.op, operands[1], operands[0], step.result)
        available.append((step.result, node))
        if tuple(sorted(v for v, _ in available)) != step.remaining:
            raise ValueError(f"step {step.text()} restates the wrong remaining numbers")
        trees.append(node)
    return trees


def _render(tree, expanded: set[int] | None = None) -> tuple[str, int]:
    """(text, precedence) of a `_step_trees` tree with the fewest parentheses (`_combine`); the result
    of a step whose index is not in `expanded` (None: every step) is written as its number."""
    if isinstance(tree, int):
        return str(tree), _ATOM
    index, op, left, right, result = tree
    if expanded is not None and index not in expanded:
        return str(result), _ATOM
    return _combine(_render(left, expanded), op, _render(right, expanded))


def step_expressions(steps: list[Step]) -> list[str]:
    """The expression each step's result stands for, over the starting numbers, one per step, with
    the fewest parentheses needed (`_combine`)."""
    return [_render(tree)[0] for tree in _step_trees(steps)]


def answer_expression(steps: list[Step]) -> str:
    """The answer expression of the last step's result, built from the steps (`step_expressions`)."""
    return step_expressions(steps)[-1]


STEP_FORMATS = ("numbers", "substitute")  # "expressions" was measured and removed: docs/log.md


def format_completion(steps: list[Step], step_format: str = "numbers") -> str:
    """A trace as a completion: its steps, then the answer expression.

    "numbers": each step combines two numbers and restates the numbers left,
    '<step>13-9=4 (4 5 7)</step><step>4*5=20 (7 20)</step><step>20+7=27 (27)</step><answer>(13-9)*5+7</answer>'.
    "substitute": the steps as in "numbers"; then, from the last step's own expression, the results
    of earlier steps are replaced by what they stand for one step at a time, latest first, so each
    expression is the one before it with one number expanded, and the answer is the last of them,
    '<step>13-9=4 (4 5 7)</step><step>4*5=20 (7 20)</step><step>20+7=27 (27)</step>27=4*5+7'
    '<answer>(13-9)*5+7</answer>' (the last step's own expression, 20+7, is in its step; the
    scaffold is empty for a trace of two steps or fewer, and a step whose result the answer does not
    use, as a solver trace may have, changes nothing, so its expansion repeats the one before).
    """
    if step_format not in STEP_FORMATS:
        raise ValueError(f"step_format must be one of {STEP_FORMATS}, got {step_format!r}")
    trees = _step_trees(steps)
    expressions = [_render(tree)[0] for tree in trees]
    body = "".join(f"{STEP_OPEN}{s.text()}{STEP_CLOSE}" for s in steps)
    n = len(steps)
    if step_format == "substitute" and n > 2:
        body += f"{steps[-1].result}=" + "=".join(_render(trees[-1], set(range(n - j, n)))[0] for j in range(2, n))
    return f"{body}{ANSWER_OPEN}{expressions[-1]}{ANSWER_CLOSE}"


# ----------------------------------------------------------------------------------------------
# The environment


def extract_answer(completion: str) -> str | None:
    """Content of the LAST closed <answer>...</answer> of the completion, or None."""
    end = completion.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = completion.rfind(ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    return completion[start + len(ANSWER_OPEN):end]


def _is_sub_multiset(used: tuple[int, ...], available) -> bool:
    need = Counter(used)
    have = Counter(available)
    return all(have[x] >= c for x, c in need.items())


# One step of the "numbers" format, spaces anywhere: `<step>4 * 5 = 20 (7 20)</step>`, the tags and
# the restated numbers optional (a step cut at its token limit has no closing tag).
_STEP = re.compile(r"\s*(<step>)?\s*(\d+)\s*([-+*/])\s*(\d+)\s*=\s*(\d+)\s*(?:\(([\d\s,]*)\))?\s*(</step>)?\s*")


def canonical_step(text: str) -> str:
    """The canonical form of one step, equal for steps that say the same thing: operands of + and *
    in ascending order, the restated numbers sorted, no spaces (`4*5=20 (7 20)` == `5 * 4 = 20 (20 7)`).
    A step that is not one `a op b = r` combination keeps its text, runs of white space made one space."""
    m = _STEP.fullmatch(text)
    if m is None:
        return " ".join(text.split())
    opened, a, op, b, result, left, closed = m.groups()
    if op in "+*":
        a, b = sorted((a, b), key=int)
    rest = "" if left is None else f" ({' '.join(sorted(left.replace(',', ' ').split(), key=int))})"
    return f"{opened or ''}{int(a)}{op}{int(b)}={int(result)}{rest}{closed or ''}"


class CountdownEnv:
    """Countdown with the reference's rewards.

    dense: no answer tag -1.0; answer invalid (grammar, numbers not available, division by zero, a
    strict-mode rule) -0.9; else 1 - 2*min(|t - p| / t, 1), so 1.0 exactly at the target and -1.0 at
    or beyond twice its distance. sparse: 1.0 iff valid and exactly equal to the target.
    Options (off by default, as in the reference): `require_all_numbers` (every input used exactly
    once) and `integer_intermediates` (every intermediate result a positive integer).
    """

    name = "countdown"
    step_end = STEP_CLOSE
    reward_from_prompt = True  # the score reads the numbers and the target, both in the prompt

    def __init__(self, *, require_all_numbers: bool = False, integer_intermediates: bool = False):
        self.require_all_numbers = require_all_numbers
        self.integer_intermediates = integer_intermediates

    def messages(self, problem: dict, *, compact: bool = False) -> list[dict]:
        numbers = list(problem["numbers"])
        if compact:
            # For small byte-level models: every prompt byte costs context and compute.
            return [{"role": "user", "content": f"{numbers} -> {problem['target']}"}]
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Input Sequence: {numbers}\nTarget: {problem['target']}"},
        ]

    def is_terminal(self, completion: str) -> bool:
        return extract_answer(completion) is not None

    def key(self, problem: dict) -> tuple:
        return key(problem)

    def canonical_step(self, step_text: str) -> str:
        """Steps with the same canonical form are one step to the search (`merge="canonical"`)."""
        return canonical_step(step_text)

    @staticmethod
    def load_split(split: str, path: Path | None = None) -> list[dict]:
        """The shipped split (treedistill/data/countdown/{split}.jsonl), or the file at `path`."""
        return load_problems(path or SHIPPED_SPLITS / f"{split}.jsonl")

    @staticmethod
    def generate_splits(train_size: int, test_size: int, seed: int) -> tuple[list[dict], list[dict]]:
        return generate_problems(train_size, test_size, seed)

    def answer_value(self, problem: dict, completion: str) -> Fraction | int | None:
        """The exact value of the last answer when `score` would call it valid (parses, uses available
        numbers, and this env's `require_all_numbers` / `integer_intermediates` rules), else None.
        Reads `problem["numbers"]` only."""
        answer = extract_answer(completion) if isinstance(completion, str) else None
        if answer is None:
            return None
        result = evaluate(answer.strip())
        if isinstance(result, str) or self._violation(problem, result) is not None:
            return None
        return result.value

    def score(self, problem: dict, completion: str) -> Score:
        """Dense and sparse reward from one parse of the completion's last answer."""
        answer = extract_answer(completion) if isinstance(completion, str) else None
        if answer is None:
            return Score(dense=-1.0, sparse=0.0, reason="no_answer")
        result = evaluate(answer.strip())
        if isinstance(result, str):
            return self._invalid(result, answer)
        reason = self._violation(problem, result)
        if reason is not None:
            return self._invalid(reason, answer)
        target = problem["target"]
        # 1 - 2*min(|t - p| / t, 1), computed exactly, rounded to float once.
        distance = min(abs(Fraction(target) - result.value) / target, 1)
        exact = result.value == target
        return Score(dense=float(1 - 2 * distance), sparse=1.0 if exact else 0.0,
                     reason="correct" if exact else "wrong", answer=answer, well_formed=True)

    def _violation(self, problem: dict, result: Evaluation) -> str | None:
        numbers = problem["numbers"]
        if not _is_sub_multiset(result.numbers, numbers):
            return "numbers_not_available"
        if self.require_all_numbers and sorted(result.numbers) != sorted(numbers):
            return "not_all_numbers"
        if self.integer_intermediates and not result.integer_intermediates:
            return "non_integer_intermediate"
        return None

    @staticmethod
    def _invalid(reason: str, answer: str) -> Score:
        return Score(dense=-0.9, sparse=0.0, reason=f"invalid:{reason}", answer=answer)
