"""GSM8K: grade-school word problems with a numeric final answer.

A problem is a GSM8K record `{"question": ..., "answer": ...}`; the final answer is the text after
the last `####` of "answer" (a record whose "answer" is just the number works too). The completion
reasons in `<step>...</step>` chunks and ends with `<answer>NUMBER</answer>`.

Rewards (one parse of the completion's LAST closed answer tag):
- sparse: 1.0 when the answer is a number exactly equal to the final answer (exact rationals;
  commas, `$`, spaces and a trailing `.0` or `.` are ignored), else 0.0.
- dense: +1.0 correct, -0.9 answer tag present but wrong or not a number, -1.0 no answer tag.
  Departure from the reference (+1.1 correct): search scores terminal nodes with the dense reward
  next to value-head estimates that a tanh keeps in [-1, 1]; +1.1 would be a value the head cannot
  predict and would make a terminal node outrank any estimate by construction. +1.0 keeps both on
  one scale, as in Countdown.

Data: `load_gsm8k(split, path)` reads the file or folder given as `path` (a user's local copy:
`--set train_path=PATH` / `--set test_path=PATH`, or `eval --data PATH`); without a path it loads
`openai/gsm8k` (config "main") from the Hugging Face hub through the optional `datasets` package
(`pip install 'treedistill[gsm8k]'`), and where that is not installed or the hub cannot be reached
it raises a one-line UsageError saying how to pass a local copy.
"""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

from treedistill.envs.base import STEP_CLOSE, Score
from treedistill.envs.countdown import extract_answer
from treedistill.errors import UsageError
from treedistill.jsonl import read_records

__all__ = ["GSM8KEnv", "final_answer", "load_gsm8k", "parse_number", "validate_problem"]

MAX_ANSWER_CHARS = 64  # longer answer contents are not numbers we grade
_NUMBER = re.compile(r"[+-]?[0-9]+(?:\.[0-9]*)?")  # ASCII digits only (\d would match "٣")
_IGNORED = str.maketrans("", "", "$, ")
HUB_NAME = ("openai/gsm8k", "main")

SYSTEM_PROMPT = (
    "Solve the math word problem. Reason in one or more steps, putting each step inside "
    "<step>...</step>. Then write exactly one final answer inside <answer>...</answer> holding only "
    "the final number, without units.\n"
    "For example: <step>16-3-4=9 eggs are left each day.</step><step>9*2=18 dollars.</step>"
    "<answer>18</answer>"
)


def parse_number(text: str) -> Fraction | None:
    """'$1,234.50' -> Fraction(2469, 2); '18.0' -> 18; anything else (or too long) -> None."""
    if not isinstance(text, str) or len(text) > MAX_ANSWER_CHARS:
        return None
    cleaned = text.strip().translate(_IGNORED)
    if not _NUMBER.fullmatch(cleaned):
        return None
    return Fraction(cleaned.rstrip(".") if cleaned.endswith(".") else cleaned)


def final_answer(answer: str) -> str:
    """The text after the last '####' of a GSM8K solution (the whole text when there is none)."""
    return answer.rsplit("####", 1)[-1].strip()


def validate_problem(record) -> dict:
    """Return the record if it has a string "question" and an "answer" whose final answer is a number."""
    if not isinstance(record, dict):
        raise ValueError("a record must be a JSON object")
    if not isinstance(record.get("question"), str):
        raise ValueError('"question" must be a string')
    answer = record.get("answer")
    if not isinstance(answer, str) or parse_number(final_answer(answer)) is None:
        raise ValueError(f'"answer" must be a string ending in "#### NUMBER", got {answer!r}')
    return record


def load_gsm8k(split: str = "test", path=None) -> list[dict]:
    """GSM8K records of `split` ("train" or "test") from `path` (a file, or a folder holding
    `{split}.jsonl`), else from the hub via `datasets`."""
    if path is not None:
        path = Path(path)
        return _load_file(path / f"{split}.jsonl" if path.is_dir() else path)
    return _load_hub(split)


def _load_file(path: Path) -> list[dict]:
    return read_records(path, validate_problem)


def _local_copy_hint(split: str) -> str:
    return (f"pass a local copy of GSM8K (a JSONL file of question/answer records, or a folder holding "
            f"train.jsonl and test.jsonl) with --set {split}_path=PATH (treedistill eval: --data PATH)")


def _load_hub(split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise UsageError(f"GSM8K {split} split: no path given and the optional `datasets` package is not "
                         f"installed; {_local_copy_hint(split)}, or pip install 'treedistill[gsm8k]' to "
                         f"load {HUB_NAME[0]} from the Hugging Face hub") from None
    try:
        rows = datasets.load_dataset(*HUB_NAME, split=split)
    # `datasets` raises many kinds of errors offline (connection, missing cache, hub offline mode);
    # all mean the same to the user here.
    except Exception as err:  # noqa: BLE001
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UsageError(f"GSM8K {split} split: could not load {HUB_NAME[0]} from the Hugging Face hub "
                         f"({reason}); {_local_copy_hint(split)}") from None
    return [validate_problem({"question": r["question"], "answer": r["answer"]}) for r in rows]


class GSM8KEnv:
    """GSM8K with the step/answer protocol; rewards as in the module docstring."""

    name = "gsm8k"
    step_end = STEP_CLOSE
    reward_from_prompt = False  # the score needs the reference answer, which the prompt does not hold

    def messages(self, problem: dict, *, compact: bool = False) -> list[dict]:
        if compact:
            return [{"role": "user", "content": problem["question"]}]
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": problem["question"]},
        ]

    def is_terminal(self, completion: str) -> bool:
        return extract_answer(completion) is not None

    def key(self, problem: dict) -> tuple:
        return (" ".join(problem["question"].split()),)

    @staticmethod
    def load_split(split: str, path: Path | None = None) -> list[dict]:
        return load_gsm8k(split, path=path)

    @staticmethod
    def generate_splits(train_size: int, test_size: int, seed: int) -> None:
        """None: GSM8K is read from files, never generated."""
        return None

    def answer_value(self, problem: dict, completion: str) -> Fraction | None:
        """The exact number of the last answer (None when there is none or it is not a number); reads
        nothing of the problem."""
        answer = extract_answer(completion) if isinstance(completion, str) else None
        return None if answer is None else parse_number(answer)

    def score(self, problem: dict, completion: str) -> Score:
        gold = parse_number(final_answer(problem["answer"]))
        if gold is None:
            raise ValueError(f"problem has no numeric final answer: {problem['answer']!r}")
        answer = extract_answer(completion) if isinstance(completion, str) else None
        if answer is None:
            return Score(dense=-1.0, sparse=0.0, reason="no_answer")
        value = parse_number(answer)
        if value is None:
            return Score(dense=-0.9, sparse=0.0, reason="invalid:not_a_number", answer=answer)
        if value == gold:
            return Score(dense=1.0, sparse=1.0, reason="correct", answer=answer, well_formed=True)
        return Score(dense=-0.9, sparse=0.0, reason="wrong", answer=answer, well_formed=True)
