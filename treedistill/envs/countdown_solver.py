"""Countdown traces: random legal play, an exact solver, and completions written from their steps.

The trace helpers (`Step`, `random_play`, `solve`, `format_completion`) write completions in the
format the prompt asks for, e.g.
`<step>13-9=4 (4 5 7)</step><step>4*5=20 (7 20)</step><step>20+7=27 (27)</step><answer>(13-9)*5+7</answer>`,
where each step restates the numbers still available, sorted ascending. Legality is the
generator's (countdown_generate.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from treedistill.envs.base import ANSWER_CLOSE, ANSWER_OPEN, STEP_CLOSE, STEP_OPEN
from treedistill.envs.countdown_generate import legal_moves, legal_result

__all__ = ["STEP_FORMATS", "Step", "answer_expression", "format_completion", "random_play", "solve",
           "step_expressions"]


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
        moves = legal_moves(state)
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
    stack = [(start, iter(order(legal_moves(start))), [])]
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
            stack.append((next_state, iter(order(legal_moves(next_state))), path))
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
