"""Countdown problem generation: the reference's legality rules, the exact law of its random
reductions, and seeded train/test splits.

Where we depart from the reference generator (see docs/method.md):
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
"""

from __future__ import annotations

import numpy as np

from treedistill.envs.countdown_problems import key

__all__ = ["MAX_TEST", "NUMBER_RANGE", "OPS", "REDUCTIONS", "generate_problems", "legal_moves", "legal_result",
           "reduction_distribution"]

NUMBER_RANGE = (1, 13)  # inclusive, as in the reference generator
REDUCTIONS = 10_000  # random full reductions per problem in the reference generator
MAX_TEST = 20_000  # of the ~23,000 distinct problems the generator makes (seed 42: 22,912 found in 229 s)
OPS = "+-*/"


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


def legal_moves(state: tuple[int, ...]) -> list[tuple[int, int, str, int, tuple[int, ...]]]:
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
        moves = legal_moves(state)
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
