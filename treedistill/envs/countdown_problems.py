"""Countdown problems as records: validation, identity (`key`), JSONL files, target statistics.

A problem is `{"numbers": [a, b, c, d], "target": T}`; the reference's format `{"input": [...],
"target": T}` is read too. Pure: no generation, no grading (countdown_generate.py, countdown.py).
"""

from __future__ import annotations

import statistics

from treedistill.jsonl import read_records, write_jsonl

__all__ = ["MAX_NUMBERS", "MAX_VALUE", "key", "load_problems", "overlap", "target_stats", "validate_problem",
           "write_problems"]

MAX_NUMBERS = 6  # problems with more numbers are refused (the solver's search grows factorially)
MAX_VALUE = 10**6  # numbers and targets are below it: a prompt stays a few dozen tokens (generated: <= 13, targets ~2,200)


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
