"""The safe expression evaluator: hand-worked values, every rejection reason, and properties."""

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from treedistill.envs.expr import MAX_DEPTH, Evaluation, evaluate


@pytest.mark.parametrize(
    "text, value, numbers, integer",
    [
        ("(13-9)*5+7", 27, (13, 9, 5, 7), True),  # 4*5 = 20, 20+7 = 27
        ("10-2-3", 5, (10, 2, 3), True),  # left-associative: (10-2)-3, not 10-(2-3) = 11
        ("24/4/2", 3, (24, 4, 2), True),  # (24/4)/2 = 3, not 24/(4/2) = 12
        ("8/(4/2)", 4, (8, 4, 2), True),
        ("2+3*4", 14, (2, 3, 4), True),  # precedence
        ("(2+3)*4", 20, (2, 3, 4), True),
        ("1/3*3", 1, (1, 3, 3), False),  # exact: 1/3 then *3 = 1; the 1/3 step is not an integer
        ("7/2", Fraction(7, 2), (7, 2), False),
        ("3-5+4", 2, (3, 5, 4), False),  # -2 on the way: not a positive integer
        (" 1 +  2 ", 3, (1, 2), True),
        ("42", 42, (42,), True),
        ("0", 0, (0,), True),  # a lone literal has no operation
        ("999999*999999", 999998000001, (999999, 999999), True),
        ("(" * MAX_DEPTH + "1" + ")" * MAX_DEPTH, 1, (1,), True),
    ],
)
def test_values_worked_by_hand(text, value, numbers, integer):
    result = evaluate(text)
    assert isinstance(result, Evaluation), result
    assert result.value == value and result.numbers == numbers and result.integer_intermediates is integer


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("()", "syntax"),
        ("-1+2", "syntax"),  # no unary minus
        ("1+", "syntax"),
        ("1 2", "syntax"),
        ("2(3)", "syntax"),
        ("9**9**9", "syntax"),
        ("2^3", "bad_char"),
        ("1.5*2", "bad_char"),
        ("1e3", "bad_char"),
        ("١٣+1", "bad_char"),  # Arabic-Indic digits: str.isdigit() is True, we refuse them
        ("１+1", "bad_char"),  # fullwidth digit
        ("13\t+1", "bad_char"),
        ("\x00\xff\ufffd", "bad_char"),
        ("1234567", "number_too_long"),
        ("5" * 5000, "too_long"),  # over 512 characters: rejected before scanning
        ("7" * 300, "number_too_long"),
        ("05+1", "leading_zero"),
        ("(1+2", "unbalanced"),
        ("1+2)", "unbalanced"),
        ("(" * 10_000 + "1" + ")" * 10_000, "too_long"),
        ("(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1), "too_deep"),
        ("5/(3-3)", "division_by_zero"),
        ("1/0", "division_by_zero"),
    ],
)
def test_rejections(text, reason):
    assert evaluate(text) == reason


def test_syntax_is_checked_before_arithmetic():
    # A division by zero early in text that is malformed later is a syntax error: nothing is evaluated.
    assert evaluate("1/0)") == "unbalanced"


@given(st.text(max_size=600))
@settings(max_examples=250, deadline=None)
def test_random_text_never_raises(text):
    assert isinstance(evaluate(text), (Evaluation, str))


@given(st.text(alphabet="0123456789+-*/() ", max_size=80))
@settings(max_examples=250, deadline=None)
def test_grammar_alphabet_never_raises(text):
    assert isinstance(evaluate(text), (Evaluation, str))


# Random expression trees: (text with full parentheses, exact value or None on division by zero).
def _leaf():
    return st.integers(0, 999_999).map(lambda n: (str(n), Fraction(n), (n,)))


def _node(children):
    def join(parts):
        (lt, lv, ln), op, (rt, rv, rn) = parts
        if lv is None or rv is None or (op == "/" and rv == 0):
            value = None
        else:
            value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv / rv if rv else None}[op]
        return (f"({lt}{op}{rt})", value, ln + rn)

    return st.tuples(children, st.sampled_from("+-*/"), children).map(join)


@given(st.recursive(_leaf(), _node, max_leaves=12))
@settings(max_examples=200, deadline=None)
def test_random_trees_evaluate_exactly(tree):
    text, value, numbers = tree
    result = evaluate(text)
    if value is None:
        assert result == "division_by_zero"
    else:
        assert isinstance(result, Evaluation), (text, result)
        assert result.value == value and result.numbers == numbers
