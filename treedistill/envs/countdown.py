"""Countdown: reach a target from four numbers with + - * /.

A problem is `{"numbers": [a, b, c, d], "target": T}`. The completion reasons in `<step>...</step>`
chunks and ends with `<answer>EXPR</answer>`; EXPR is parsed by `treedistill.envs.expr` (whitelisted
grammar, exact rationals, bounded work) and checked against the numbers.

Where we depart from the reference implementation (see docs/method.md):
- The grader reads the completion only, never the prompt (the reference matched the example in its
  own system prompt when the completion had no tag), and evaluates exactly instead of with a
  general-purpose evaluator and float division.

This module holds the prompt, the grader and the environment class. The problems' records are in
countdown_problems.py, their generation (and the generator's departures from the reference) in
countdown_generate.py, traces and the solver in countdown_solver.py; their public names are
re-exported here.
"""

from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

from treedistill.envs import formats
from treedistill.envs.base import Score
from treedistill.envs.countdown_generate import (
    MAX_TEST,
    NUMBER_RANGE,
    REDUCTIONS,
    generate_problems,
    legal_result,
    reduction_distribution,
)
from treedistill.envs.countdown_problems import (
    MAX_NUMBERS,
    MAX_VALUE,
    key,
    load_problems,
    overlap,
    target_stats,
    validate_problem,
    write_problems,
)
from treedistill.envs.countdown_solver import (
    STEP_FORMATS,
    Step,
    answer_expression,
    format_completion,
    random_play,
    solve,
    step_expressions,
)
from treedistill.envs.expr import Evaluation, evaluate

SHIPPED_SPLITS = Path(__file__).resolve().parents[1] / "data" / "countdown"

__all__ = [
    "MAX_NUMBERS",
    "MAX_TEST",
    "MAX_VALUE",
    "NUMBER_RANGE",
    "REDUCTIONS",
    "STEP_FORMATS",
    "CountdownEnv",
    "Step",
    "answer_expression",
    "canonical_step",
    "extract_answer",
    "format_completion",
    "generate_problems",
    "key",
    "legal_result",
    "load_problems",
    "overlap",
    "random_play",
    "reachable",
    "remaining_numbers",
    "reduction_distribution",
    "solve",
    "step_expressions",
    "target_stats",
    "validate_problem",
    "write_problems",
]

EXAMPLE_STEPS = ("5*3=15 (7 15)", "15+7=22 (22)")
EXAMPLE_ANSWER = "5*3+7"


def system_prompt(fmt: formats.TextFormat = formats.DEFAULT_FORMAT) -> str:
    """The instructions for format `fmt` (steps as tags, lines or paragraphs; the answer in its tag)."""
    return ("You will get a list of numbers and a target number. Combine some or all of the numbers with "
            "addition, subtraction, multiplication and division to reach the target.\n"
            f"Work it out in one or more steps, {formats.STEP_ASK[fmt.step]}. Then write exactly "
            "one final answer inside <answer>...</answer>: a single arithmetic expression that uses only the "
            "given numbers, each one at most once, the operators + - * / and parentheses. Every intermediate "
            "result must be a positive integer.\n"
            "For example, with numbers [3, 5, 7] and target 22 you could write:\n"
            + formats.render(EXAMPLE_STEPS, EXAMPLE_ANSWER, fmt))


SYSTEM_PROMPT = system_prompt()


# ----------------------------------------------------------------------------------------------
# The environment


def extract_answer(completion: str) -> str | None:
    """Content of the LAST closed <answer>...</answer> of the completion, or None."""
    return formats.extract(completion, "tag")


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


_CLOSED_STEP = re.compile(r"<step>(.*?)</step>", re.DOTALL)
_COMBINATION = re.compile(r"\s*(\d+)\s*([-+*/])\s*(\d+)\s*=\s*(\d+)\s*(?:\([\d\s,]*\))?\s*")


def _exact(a: int, op: str, b: int) -> int | None:
    """a op b when it is a positive integer (the prompt's rule for every intermediate result), else None."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a > b else None
    if op == "*":
        return a * b if a > 0 and b > 0 else None
    return a // b if b > 0 and a % b == 0 else None


def remaining_numbers(numbers, completion: str) -> tuple[int, ...] | None:
    """The numbers still available after the completion's CLOSED steps (`<step>a op b = r ...</step>`,
    in order), sorted: each step takes a and b from the available numbers and puts r back. None when a
    step breaks the rules: not one `a op b = r` combination, a or b not available, or r not the exact
    positive-integer result. The numbers a step restates in brackets are not read (the state is what the
    arithmetic made); text outside the step tags (an unclosed step, the answer scaffold) is ignored."""
    available = Counter(int(x) for x in numbers)
    for content in _CLOSED_STEP.findall(completion):
        m = _COMBINATION.fullmatch(content)
        if m is None:
            return None
        a, op, b, result = int(m[1]), m[2], int(m[3]), int(m[4])
        available[a] -= 1
        available[b] -= 1
        if available[a] < 0 or available[b] < 0 or _exact(a, op, b) != result:
            return None
        available[result] += 1
    return tuple(sorted(available.elements()))


@lru_cache(maxsize=65_536)
def _reachable_from(numbers: tuple[int, ...], target: int) -> bool:
    return target in numbers or solve(numbers, target) is not None


def reachable(problem: dict, completion: str) -> bool:
    """Whether the target can still be reached from the numbers left after the completion's closed steps
    (`remaining_numbers`): it is one of them, or the exact solver (`solve`, subsets of the numbers,
    positive-integer intermediates as the prompt asks) finds a way. False where a step broke the rules."""
    numbers = remaining_numbers(problem["numbers"], completion)
    return numbers is not None and bool(numbers) and _reachable_from(numbers, int(problem["target"]))


class CountdownEnv:
    """Countdown with the reference's rewards.

    dense: no answer tag -1.0; answer invalid (grammar, numbers not available, division by zero, a
    strict-mode rule) -0.9; else 1 - 2*min(|t - p| / t, 1), so 1.0 exactly at the target and -1.0 at
    or beyond twice its distance. sparse: 1.0 iff valid and exactly equal to the target.
    Options (off by default, as in the reference): `require_all_numbers` (every input used exactly
    once) and `integer_intermediates` (every intermediate result a positive integer); `step`, the step
    delimiter (tags | line | blank, envs/formats.py). The answer is always the expression in the
    `<answer>` tag (`answer="tag"`, the one format an expression has here).
    """

    name = "countdown"
    reward_from_prompt = True  # the score reads the numbers and the target, both in the prompt
    answer_formats = ("tag",)

    def __init__(self, *, require_all_numbers: bool = False, integer_intermediates: bool = False,
                 step: str = "tags", answer: str = "tag"):
        self.require_all_numbers = require_all_numbers
        self.integer_intermediates = integer_intermediates
        self.format = formats.TextFormat(step=step, answer=answer)
        problems = self.format.errors(self.answer_formats)
        if problems:
            raise ValueError("; ".join(problems))
        self.step_end = self.format.step_end
        self.system_prompt = system_prompt(self.format)

    def messages(self, problem: dict, *, compact: bool = False) -> list[dict]:
        numbers = list(problem["numbers"])
        if compact:
            # For small byte-level models: every prompt byte costs context and compute.
            return [{"role": "user", "content": f"{numbers} -> {problem['target']}"}]
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": f"Input Sequence: {numbers}\nTarget: {problem['target']}"},
        ]

    def is_terminal(self, completion: str) -> bool:
        return extract_answer(completion) is not None

    def solution(self, problem: dict, rng=None) -> str | None:
        """A solver trace of the problem (countdown_solver.solve) as a completion in this format, each
        step restating the numbers left; None when the problem has no solution. What `treedistill sft`
        trains on."""
        steps = solve(problem["numbers"], problem["target"], rng, use_all=self.require_all_numbers)
        if steps is None:
            return None
        return formats.render([s.text() for s in steps], answer_expression(steps), self.format)

    def key(self, problem: dict) -> tuple:
        return key(problem)

    def canonical_step(self, step_text: str) -> str:
        """Steps with the same canonical form are one step to the search (`merge="canonical"`)."""
        return canonical_step(step_text)

    def reachable(self, problem: dict, completion: str) -> bool:
        """The solver's exact verdict on a prefix: can the target still be reached from the numbers its
        steps left (`reachable`)? Reads the target: for diagnostics (the oracle leaf value, the value
        probe's AUC), never for a method that claims no verifier."""
        return reachable(problem, completion)

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
