"""A safe evaluator for the arithmetic answers of Countdown.

Grammar (whitelist; anything else is invalid):

    expr   := term (("+" | "-") term)*
    term   := factor (("*" | "/") factor)*
    factor := NUMBER | "(" expr ")"
    NUMBER := 1 to 6 ASCII digits, no leading zero (except "0" itself)

Spaces may appear between tokens. There is no unary minus, no decimal point, no exponent, and only
ASCII digits count (`str.isdigit` would accept "٣"; we do not).

Why not `eval` or `ast`: model text is never executed, and the work is bounded before any arithmetic
happens. Text longer than `MAX_CHARS` or nested deeper than `MAX_DEPTH` is rejected while scanning;
the scan turns the text into reverse Polish notation (shunting-yard, iterative, so 10,000 nested
parentheses cannot hit Python's recursion limit) and only a syntactically valid expression is
evaluated. Arithmetic is exact: Python ints while division stays exact, `fractions.Fraction` after
an inexact division, never float (the reference grader's float division could call 1/3*3 == 1 by luck
or miss exact answers by rounding).

`evaluate(text)` never raises on a `str`: it returns an `Evaluation` or a short reason string.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

__all__ = ["MAX_CHARS", "MAX_DEPTH", "MAX_DIGITS", "Evaluation", "evaluate"]

MAX_CHARS = 512  # longer answers are rejected unread
MAX_DEPTH = 64  # parentheses nested deeper than this are rejected
MAX_DIGITS = 6  # integer literals longer than this are rejected

_DIGITS = frozenset("0123456789")
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}

# Reasons (short, machine-readable words).
EMPTY = "empty"
TOO_LONG = "too_long"
TOO_DEEP = "too_deep"
BAD_CHAR = "bad_char"
NUMBER_TOO_LONG = "number_too_long"
LEADING_ZERO = "leading_zero"
SYNTAX = "syntax"
UNBALANCED = "unbalanced"
DIVISION_BY_ZERO = "division_by_zero"


@dataclass(frozen=True)
class Evaluation:
    """A valid expression and its exact value.

    value: the exact value (int when integral, else Fraction).
    numbers: the integer literals in order of appearance, e.g. (13, 9, 5, 7) for "(13-9)*5+7".
    integer_intermediates: True when the result of every operation (the final one included) is a
        positive integer; a bare number counts as True. Countdown's strict mode needs it.
    """

    value: int | Fraction
    numbers: tuple[int, ...]
    integer_intermediates: bool


def _to_rpn(text: str) -> list | str:
    """Scan `text` into reverse Polish notation (ints and operator chars), or return a reason."""
    if len(text) > MAX_CHARS:
        return TOO_LONG
    output: list = []
    ops: list[str] = []
    depth = 0
    expect_operand = True  # the grammar's state: an operand or "(" comes next, else an operator or ")"
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == " ":
            i += 1
            continue
        if c in _DIGITS:
            j = i + 1
            while j < n and text[j] in _DIGITS:
                j += 1
            if not expect_operand:
                return SYNTAX
            if j - i > MAX_DIGITS:
                return NUMBER_TOO_LONG
            if c == "0" and j - i > 1:
                return LEADING_ZERO
            output.append(int(text[i:j]))
            expect_operand = False
            i = j
            continue
        if c == "(":
            if not expect_operand:
                return SYNTAX
            depth += 1
            if depth > MAX_DEPTH:
                return TOO_DEEP
            ops.append(c)
        elif c == ")":
            if expect_operand:  # "()" or "(1+)"
                return SYNTAX
            while ops and ops[-1] != "(":
                output.append(ops.pop())
            if not ops:
                return UNBALANCED
            ops.pop()
            depth -= 1
        elif c in _PRECEDENCE:
            if expect_operand:  # unary minus, "1+*2", leading operator
                return SYNTAX
            prec = _PRECEDENCE[c]
            # All four operators are left-associative: pop operators of equal or higher precedence.
            while ops and ops[-1] != "(" and _PRECEDENCE[ops[-1]] >= prec:
                output.append(ops.pop())
            ops.append(c)
            expect_operand = True
        else:
            return BAD_CHAR
        i += 1
    if expect_operand:
        return EMPTY if not output and not ops else SYNTAX
    while ops:
        op = ops.pop()
        if op == "(":
            return UNBALANCED
        output.append(op)
    return output


def _apply(op: str, a, b):
    """Exact a op b; None on division by zero. Stays in int while division is exact."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        return None
    if isinstance(a, int) and isinstance(b, int) and a % b == 0:
        return a // b
    value = Fraction(a) / b
    return value.numerator if value.denominator == 1 else value


def evaluate(text: str) -> Evaluation | str:
    """Evaluate `text` under the grammar above; return an Evaluation or a reason string.

    "(13-9)*5+7" -> Evaluation(value=27, numbers=(13, 9, 5, 7), integer_intermediates=True)
    "1/3*3"      -> Evaluation(value=1, numbers=(1, 3, 3), integer_intermediates=False)
    "2*(3"       -> "unbalanced";  "-1+2" -> "syntax";  "5/(3-3)" -> "division_by_zero"
    """
    if not isinstance(text, str):
        return BAD_CHAR
    rpn = _to_rpn(text)
    if isinstance(rpn, str):
        return rpn
    stack: list = []
    numbers: list[int] = []
    integer = True
    for token in rpn:
        if isinstance(token, int):
            stack.append(token)
            numbers.append(token)
            continue
        b = stack.pop()
        a = stack.pop()
        value = _apply(token, a, b)
        if value is None:
            return DIVISION_BY_ZERO
        if integer and not (isinstance(value, int) and value > 0):
            integer = False
        stack.append(value)
    # The scanner only emits well-formed RPN, so exactly one value is left.
    return Evaluation(value=stack[0], numbers=tuple(numbers), integer_intermediates=integer)
