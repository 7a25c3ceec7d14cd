"""Countdown: rewards on every malformed-input case, properties, traces, and the generator."""

import math
import random
import time
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from treedistill.envs import get_env
from treedistill.envs.base import reward_from_prompt
from treedistill.envs.countdown import (
    CountdownEnv,
    Step,
    answer_expression,
    format_completion,
    generate_problems,
    key,
    load_problems,
    overlap,
    random_play,
    reduction_distribution,
    solve,
    step_expressions,
    target_stats,
    write_problems,
)
from treedistill.envs.expr import evaluate
from treedistill.errors import UsageError

PROBLEM = {"numbers": [13, 9, 5, 7], "target": 27}
ENV = CountdownEnv()


def ans(text):
    return f"<step>thinking</step><answer>{text}</answer>"


# (completion, dense, sparse, reason) for PROBLEM; dense values worked by hand in the comments.
CASES = [
    ("", -1.0, 0.0, "no_answer"),  # the empty string
    ("I think it is (13-9)*5+7", -1.0, 0.0, "no_answer"),  # no tag
    ("<answer>(13-9)*5+7", -1.0, 0.0, "no_answer"),  # never closed
    ("(13-9)*5+7</answer>", -1.0, 0.0, "no_answer"),  # never opened
    (ans("(13-9)*5+7"), 1.0, 1.0, "correct"),  # 4*5+7 = 27
    (ans("\n 13 + 9 + 5 \n"), 1.0, 1.0, "correct"),  # surrounding whitespace is ignored
    # two tags: the LAST one counts
    ("<answer>13+9</answer><answer>(13-9)*5+7</answer>", 1.0, 1.0, "correct"),
    ("<answer>(13-9)*5+7</answer><answer>13+9</answer>", 1 - 2 * 5 / 27, 0.0, "wrong"),  # 22: |27-22|/27 = 5/27
    (ans("13/5"), 1 - 2 * (27 - 13 / 5) / 27, 0.0, "wrong"),  # exact 13/5; 1 - 244/135 = -109/135
    (ans("13*9*5*7"), -1.0, 0.0, "wrong"),  # 4095: distance capped at 1
    (ans("(13-9*5+7"), -0.9, 0.0, "invalid:unbalanced"),  # unbalanced parentheses
    (ans("13-9)*5+7"), -0.9, 0.0, "invalid:unbalanced"),
    (ans("13 x 9"), -0.9, 0.0, "invalid:bad_char"),  # unknown characters
    (ans("sqrt(9)+13+5"), -0.9, 0.0, "invalid:bad_char"),
    (ans("١٣+9+5"), -0.9, 0.0, "invalid:bad_char"),  # unicode digits
    (ans("9**9**9"), -0.9, 0.0, "invalid:syntax"),  # no exponent, and nothing is computed
    (ans("(" * 10_000 + "13" + ")" * 10_000), -0.9, 0.0, "invalid:too_long"),  # 10,000 nested
    (ans("(" * 100 + "13" + ")" * 100), -0.9, 0.0, "invalid:too_deep"),
    (ans("9" * 5000), -0.9, 0.0, "invalid:too_long"),  # a 5,000-digit number
    (ans("1234567"), -0.9, 0.0, "invalid:number_too_long"),
    (ans("13/(9-9)"), -0.9, 0.0, "invalid:division_by_zero"),
    (ans("13+14"), -0.9, 0.0, "invalid:numbers_not_available"),  # a number not in the input
    (ans("13+13+1"), -0.9, 0.0, "invalid:numbers_not_available"),  # a number used twice
    (ans(""), -0.9, 0.0, "invalid:empty"),
    (ans("-13+40"), -0.9, 0.0, "invalid:syntax"),  # no unary minus
    (ans("27.0"), -0.9, 0.0, "invalid:bad_char"),  # no decimals
    (bytes(range(256)).decode("latin-1"), -1.0, 0.0, "no_answer"),  # binary junk
    (ans(bytes(range(256)).decode("latin-1")), -0.9, 0.0, "invalid:bad_char"),
    (ans("\x00\udcff\ufffd"), -0.9, 0.0, "invalid:bad_char"),
]


@pytest.mark.parametrize("completion, dense, sparse, reason", CASES)
def test_every_bad_input_case(completion, dense, sparse, reason):
    score = ENV.score(PROBLEM, completion)
    assert score.reason == reason
    assert score.dense == pytest.approx(dense, abs=1e-12) and score.sparse == sparse
    assert score.well_formed == (reason in ("correct", "wrong"))


def test_the_prompt_is_never_graded():
    # The system prompt holds an example answer; a completion without a tag must not borrow it.
    prompt = "".join(m["content"] for m in ENV.messages(PROBLEM))
    assert "<answer>" in prompt
    assert ENV.score(PROBLEM, "no tag").reason == "no_answer"


def test_strict_modes():
    all_numbers = CountdownEnv(require_all_numbers=True)
    assert all_numbers.score(PROBLEM, ans("(13-9)*5+7")).sparse == 1.0
    assert all_numbers.score(PROBLEM, ans("13+9+5")).reason == "invalid:not_all_numbers"
    problem = {"numbers": [3, 2, 6, 1], "target": 9}
    assert ENV.score(problem, ans("3/2*6")).sparse == 1.0  # 3/2 = 1.5 is allowed by default
    strict = CountdownEnv(integer_intermediates=True)
    assert strict.score(problem, ans("3/2*6")).reason == "invalid:non_integer_intermediate"
    assert strict.score(problem, ans("6/2*3")).sparse == 1.0
    assert get_env("countdown", integer_intermediates=True).integer_intermediates


def test_answer_value_follows_the_env_rules():
    # The old test-time rule (testtime._countdown_value) checked only that the numbers were available,
    # so under the strict options it gave a value to answers the environment calls invalid.
    problem = {"numbers": [3, 2, 6, 1]}  # inputs only: answer_value never reads the target
    assert ENV.answer_value(problem, ans("3/2*6")) == 9           # shipped defaults: unchanged
    assert ENV.answer_value(problem, ans("3+6")) == 9
    assert ENV.answer_value(problem, ans("3+3")) is None          # 3 given once
    strict = CountdownEnv(integer_intermediates=True)
    assert strict.answer_value(problem, ans("3/2*6")) is None     # 3/2 is not an integer
    assert strict.answer_value(problem, ans("6/2*3")) == 9
    all_numbers = CountdownEnv(require_all_numbers=True)
    assert all_numbers.answer_value(problem, ans("3+6")) is None  # 2 and 1 unused
    assert all_numbers.answer_value(problem, ans("(3+6)*(2-1)")) == 9


@given(st.sampled_from(["3/2*6", "6/2*3", "3+6", "(3+6)*(2-1)", "3+3", "7", "3+", "6/(2-2)", "1-2"]),
       st.booleans(), st.booleans())
@settings(max_examples=60, deadline=None)
def test_answer_value_is_set_exactly_when_score_calls_the_answer_valid(expression, all_numbers, integers):
    env = CountdownEnv(require_all_numbers=all_numbers, integer_intermediates=integers)
    problem = {"numbers": [3, 2, 6, 1], "target": 9}
    value, score = env.answer_value(problem, ans(expression)), env.score(problem, ans(expression))
    assert (value is not None) == score.well_formed
    assert value is None or (value == 9) == (score.sparse == 1.0)


def test_splits_come_from_the_env_class():
    from treedistill.datasets import load_split
    from treedistill.envs import ENVS

    assert ENVS["countdown"].generate_splits(6, 4, 1) == generate_problems(6, 4, 1)
    assert ENVS["gsm8k"].generate_splits(6, 4, 1) is None
    assert load_split("countdown", "test")[:3] == CountdownEnv.load_split("test")[:3]


def test_get_env_errors():
    with pytest.raises(UsageError, match="countdown, gsm8k"):
        get_env("chess")
    with pytest.raises(UsageError):
        get_env("gsm8k", require_all_numbers=True)


def test_terminal_key_and_messages():
    assert not ENV.is_terminal("<step>1+2=3 (3)</step>")
    assert not ENV.is_terminal("<step>x</step><answer>1+2")
    assert ENV.is_terminal("<step>x</step><answer>1+2</answer>")
    assert ENV.step_end == "</step>" and ENV.name == "countdown"
    assert reward_from_prompt(ENV) and not reward_from_prompt(object())  # numbers and target: both in the prompt
    assert ENV.key({"numbers": [5, 13, 5, 9], "target": 31}) == ((5, 5, 9, 13), 31)
    problem = {"numbers": [5, 13, 5, 9], "target": 31}
    system, user = ENV.messages(problem)
    assert system["role"] == "system" and "<step>" in system["content"] and "<answer>" in system["content"]
    assert user == {"role": "user", "content": "Input Sequence: [5, 13, 5, 9]\nTarget: 31"}
    assert ENV.messages(problem, compact=True) == [{"role": "user", "content": "[5, 13, 5, 9] -> 31"}]


@given(st.text(max_size=300))
@settings(max_examples=200, deadline=None)
def test_random_strings_never_raise(text):
    for completion in (text, f"<answer>{text}</answer>", f"<answer>{text}"):
        score = ENV.score(PROBLEM, completion)
        assert -1.0 <= score.dense <= 1.0 and score.sparse in (0.0, 1.0)


@st.composite
def expression_over(draw, numbers):
    """(fully parenthesised text, exact value or None on division by zero) over a sub-multiset."""
    pool = draw(st.permutations(numbers))[: draw(st.integers(1, len(numbers)))]
    items = [(str(n), Fraction(n)) for n in pool]
    while len(items) > 1:
        i = draw(st.integers(0, len(items) - 2))
        (lt, lv), (rt, rv) = items[i], items[i + 1]
        op = draw(st.sampled_from("+-*/"))
        if lv is None or rv is None or (op == "/" and rv == 0):
            value = None
        else:
            value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv / rv if rv else None}[op]
        items[i: i + 2] = [(f"({lt}{op}{rt})", value)]
    return items[0]


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_random_valid_expression_scores_its_exact_value(data):
    numbers = data.draw(st.lists(st.integers(1, 13), min_size=4, max_size=4))
    target = data.draw(st.integers(1, 500))
    text, value = data.draw(expression_over(numbers))
    score = ENV.score({"numbers": numbers, "target": target}, ans(text))
    if value is None:
        assert (score.dense, score.reason) == (-0.9, "invalid:division_by_zero")
    else:
        assert score.dense == float(1 - 2 * min(abs(target - value) / target, 1))
        assert score.sparse == (1.0 if value == target else 0.0)


@given(st.lists(st.integers(1, 13), min_size=4, max_size=4), st.integers(0, 2**32 - 1))
@settings(max_examples=200, deadline=None)
def test_expression_reaching_the_target_scores_one(numbers, seed):
    steps = random_play(numbers, random.Random(seed))
    problem = {"numbers": numbers, "target": steps[-1].result}
    for completion in (format_completion(steps), ans(answer_expression(steps))):
        score = CountdownEnv(require_all_numbers=True, integer_intermediates=True).score(problem, completion)
        assert (score.dense, score.sparse, score.reason) == (1.0, 1.0, "correct")


def test_ten_thousand_adversarial_completions_are_fast():
    rng = random.Random(0)
    junk = [c for c, *_ in CASES]
    completions = []
    for i in range(10_000):
        kind = i % 4
        if kind == 0:
            completions.append(junk[i % len(junk)])
        elif kind == 1:
            completions.append(ans("".join(rng.choice("0123456789+-*/() ") for _ in range(500))))
        elif kind == 2:
            completions.append(ans("(" * 64 + "+".join(["13"] * 100) + ")" * 64))  # near the size limits
        else:
            completions.append(bytes(rng.getrandbits(8) for _ in range(200)).decode("latin-1"))
    start = time.process_time()  # CPU time: other jobs on the machine do not count
    scores = [ENV.score(PROBLEM, c) for c in completions]
    elapsed = time.process_time() - start
    print(f"scored 10,000 adversarial completions in {elapsed:.3f} s")
    assert len(scores) == 10_000 and all(-1.0 <= s.dense <= 1.0 for s in scores)
    assert elapsed < 2.0


# ----------------------------------------------------------------------------------------------
# Traces


def test_trace_format_worked_example():
    steps = [Step(13, "-", 9, 4, (4, 5, 7)), Step(4, "*", 5, 20, (7, 20)), Step(20, "+", 7, 27, (27,))]
    assert format_completion(steps) == (
        "<step>13-9=4 (4 5 7)</step><step>4*5=20 (7 20)</step><step>20+7=27 (27)</step>"
        "<answer>(13-9)*5+7</answer>"
    )
    assert format_completion(steps, "substitute") == (
        "<step>13-9=4 (4 5 7)</step><step>4*5=20 (7 20)</step><step>20+7=27 (27)</step>27=4*5+7"
        "<answer>(13-9)*5+7</answer>"
    )
    assert step_expressions(steps) == ["13-9", "(13-9)*5", "(13-9)*5+7"]
    for removed in ("tree", "expressions"):
        with pytest.raises(ValueError, match="step_format"):
            format_completion(steps, removed)


def test_substitute_expands_one_result_at_a_time_latest_first():
    # two plain steps joined by the last: its own expression is in its step, one line expands the
    # later operand, the answer the earlier one; the expansion keeps the parentheses a - needs
    steps = [Step(9, "*", 5, 45, (7, 13, 45)), Step(7, "+", 13, 20, (20, 45)), Step(45, "-", 20, 25, (25,))]
    assert format_completion(steps, "substitute").endswith(
        "<step>45-20=25 (25)</step>25=45-(7+13)<answer>9*5-(7+13)</answer>")
    # two steps: the answer is the only expansion, no scaffold
    steps = [Step(5, "+", 9, 14, (7, 13, 14)), Step(13, "+", 14, 27, (7, 27))]
    assert format_completion(steps, "substitute") == format_completion(steps)
    # every scaffold line evaluates to the last step's result
    rng = random.Random(0)
    for _ in range(200):
        steps = random_play([rng.randint(1, 13) for _ in range(4)], rng)
        scaffold = format_completion(steps, "substitute").rsplit("</step>", 1)[1].split("<answer>")[0]
        head, *lines = scaffold.split("=")
        assert int(head) == steps[-1].result and len(lines) == len(steps) - 2
        assert all(evaluate(line).value == steps[-1].result for line in lines)


@pytest.mark.parametrize(
    "steps, expression",
    [
        # a-(b-c) needs parentheses, a+(b-c) does not
        ([Step(9, "-", 4, 5, (5, 10)), Step(10, "-", 5, 5, (5,))], "10-(9-4)"),
        ([Step(9, "-", 4, 5, (5, 10)), Step(10, "+", 5, 15, (15,))], "10+9-4"),
        # a/(b*c) needs them, a*(b/c) does not, (a+b)*c does
        ([Step(2, "*", 3, 6, (6, 12)), Step(12, "/", 6, 2, (2,))], "12/(2*3)"),
        ([Step(12, "/", 3, 4, (2, 4)), Step(2, "*", 4, 8, (8,))], "2*12/3"),
        ([Step(2, "+", 3, 5, (4, 5)), Step(5, "*", 4, 20, (20,))], "(2+3)*4"),
    ],
)
def test_minimal_parentheses(steps, expression):
    assert answer_expression(steps) == expression
    assert evaluate(expression).value == steps[-1].result


def test_thousands_of_random_plays_reparse_exactly():
    rng = random.Random(1)
    for _ in range(3000):
        numbers = [rng.randint(1, 13) for _ in range(4)]
        steps = random_play(numbers, rng)
        assert len(steps) == 3 and steps[-1].remaining == (steps[-1].result,)
        result = evaluate(answer_expression(steps))
        assert result.value == steps[-1].result
        assert sorted(result.numbers) == sorted(numbers) and result.integer_intermediates


def test_random_play_accepts_numpy_rng_and_is_seeded():
    a = random_play([2, 2, 7, 8], np.random.default_rng(5))
    assert a == random_play([2, 2, 7, 8], np.random.default_rng(5))
    with pytest.raises(ValueError):
        random_play([0, 3], random.Random(0))


def test_inconsistent_trace_is_refused():
    with pytest.raises(ValueError):
        answer_expression([Step(13, "-", 9, 5, (5, 5, 7))])  # 13-9 is 4
    with pytest.raises(ValueError):
        answer_expression([Step(13, "-", 9, 4, (4, 5, 7)), Step(6, "+", 7, 13, (4, 13))])  # no 6
    with pytest.raises(ValueError):
        answer_expression([])


def test_solver():
    steps = solve([13, 9, 5, 7], 27)
    assert evaluate(answer_expression(steps)).value == 27
    assert solve([1, 1, 1, 1], 100) is None  # at most (1+1)*(1+1) = 4
    full = solve([13, 9, 5, 7], 27, random.Random(0), use_all=True)
    assert len(full) == 3 and full[-1].remaining == (27,)
    assert solve([2, 3, 5, 7], 5, use_all=True) is None  # (7-2*3)*5 needs *1, which the rules refuse


@pytest.mark.parametrize("numbers", [(2, 2, 7, 8), (1, 3, 4, 13)])
def test_solver_finds_exactly_the_reachable_targets(numbers):
    # With all numbers used, the reachable values are the support of the reduction law.
    reachable = {v for v in reduction_distribution(numbers) if v <= 120}
    assert reachable == {t for t in range(1, 121) if solve(numbers, t, use_all=True) is not None}
    assert len(solve([2, 3, 5, 7], 5)) == 1  # a subset is enough: 2+3, or 7-2


# ----------------------------------------------------------------------------------------------
# The generator


def _reference_reduction(numbers, rnd):
    """The reference procedure, written directly: shuffle, take two, random op, retry if rejected."""
    nums = list(numbers)
    while len(nums) > 1:
        rnd.shuffle(nums)
        a, b = nums.pop(), nums.pop()
        op = rnd.choice("+-*/")
        if (op == "-" and a - b <= 0) or (op == "*" and (a <= 1 or b <= 1)) or (
            op == "/" and (b <= 1 or a % b != 0)
        ):
            nums += [a, b]  # rejected: put the pair back and retry the whole step
            continue
        nums.append({"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op])
    return nums[0]


def test_reduction_law_worked_by_hand():
    # (2, 3): accepted 2+3, 3+2, 2*3, 3*2, 3-2 -> P(5) = P(6) = 2/5, P(1) = 1/5.
    assert reduction_distribution((3, 2)) == pytest.approx({5: 0.4, 6: 0.4, 1: 0.2})
    # (1, 1, 1): only 1+1 is accepted -> (1, 2); there 1+2, 2+1, 2-1 -> P(3) = 2/3, P(1) = 1/3.
    assert reduction_distribution((1, 1, 1)) == pytest.approx({3: 2 / 3, 1: 1 / 3})


@pytest.mark.parametrize("numbers", [(2, 2, 7, 8), (1, 1, 2, 13), (4, 6, 12, 12), (3, 5, 9, 11)])
def test_reduction_law_matches_direct_simulation(numbers):
    law = reduction_distribution(numbers)
    assert sum(law.values()) == pytest.approx(1.0)
    n = 8000
    rnd = random.Random(sum(numbers))
    counts = Counter(_reference_reduction(numbers, rnd) for _ in range(n))
    assert set(counts) <= set(law)
    tv = 0.5 * sum(abs(counts[v] / n - p) for v, p in law.items())
    # Expected total-variation noise of n samples: sum_k sqrt(p_k (1 - p_k) / n) * sqrt(2 / pi) / 2.
    noise = sum(math.sqrt(p * (1 - p) / n) for p in law.values()) * math.sqrt(2 / math.pi) / 2
    assert tv < 2 * noise, (tv, noise)
    # The check has power: the law over the same values, made uniform, is far outside it.
    uniform = 0.5 * sum(abs(counts[v] / n - 1 / len(law)) for v in law)
    assert uniform > 4 * noise


def test_generator_is_deterministic_and_disjoint():
    train, test = generate_problems(3000, 300, seed=7)
    assert (train, test) == generate_problems(3000, 300, seed=7)
    assert generate_problems(3000, 300, seed=8) != (train, test)
    assert len(train) == 3000 and len(test) == 300
    assert overlap(train, test) == 0
    assert len({key(p) for p in test}) == 300  # no duplicates inside the test split
    for p in train[:50] + test[:50]:
        assert len(p["numbers"]) == 4 and all(1 <= x <= 13 for x in p["numbers"]) and p["target"] >= 1
        # every target is reachable with all four numbers and positive-integer steps
        assert solve(p["numbers"], p["target"], use_all=True) is not None


def test_full_size_generation_stats():
    start = time.perf_counter()
    train, test = generate_problems(20_000, 820, seed=42)
    elapsed = time.perf_counter() - start
    train_stats, test_stats = target_stats(train), target_stats(test)
    print(f"20,000 + 820 problems in {elapsed:.2f} s; train {train_stats}; test {test_stats}")
    assert elapsed < 60
    assert overlap(train, test) == 0
    # Reference files: medians 38 (train) and 43.5 (test), 84% of targets <= 100, train max 2145.
    assert 30 <= test_stats["median"] <= 60 and 30 <= train_stats["median"] <= 50
    assert train_stats["share_le_100"] >= 0.75 and test_stats["share_le_100"] >= 0.75
    assert 60 <= train_stats["mean"] <= 90 and 1000 <= train_stats["max"] <= 5000


def test_target_stats_worked_by_hand():
    stats = target_stats([{"numbers": [1], "target": t} for t in (10, 20, 200, 30)])
    assert stats == {"count": 4, "min": 10, "median": 25.0, "mean": 65.0, "max": 200, "share_le_100": 0.75}


def test_load_and_write_problems(tmp_path):
    path = tmp_path / "p.jsonl"
    write_problems(path, [{"numbers": [1, 2, 3, 4], "target": 10}])
    assert load_problems(path) == [{"numbers": [1, 2, 3, 4], "target": 10}]
    path.write_text('{"input": [5, 13, 5, 9], "target": 31}\n\n{"numbers": [2, 2, 7, 8], "target": 38}\n')
    assert load_problems(path) == [{"numbers": [5, 13, 5, 9], "target": 31}, {"numbers": [2, 2, 7, 8], "target": 38}]


@pytest.mark.parametrize(
    "line",
    [
        "not json",
        "[1, 2]",
        '{"numbers": [1, 2, 3, 4]}',
        '{"numbers": [1, 2, 3, 4], "target": 0}',
        '{"numbers": [1, 2, 3, 4], "target": 2.5}',
        '{"numbers": "1234", "target": 5}',
        '{"numbers": [1, -2, 3, 4], "target": 5}',
        '{"numbers": [1, true, 3, 4], "target": 5}',
        '{"numbers": [], "target": 5}',
    ],
)
def test_malformed_file_names_file_and_line(tmp_path, line):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"numbers": [1, 2, 3, 4], "target": 10}\n' + line + "\n")
    with pytest.raises(UsageError, match=r"bad\.jsonl:2: "):
        load_problems(path)


def test_missing_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="nope.jsonl"):
        load_problems(tmp_path / "nope.jsonl")
