"""GSM8K: grade-school word problems with a numeric final answer.

A problem is a GSM8K record `{"question": ..., "answer": ...}`; the final answer is the text after
the last `####` of "answer" (a record whose "answer" is just the number works too). By default the
completion reasons in `<step>...</step>` chunks and ends with `<answer>NUMBER</answer>`; the options
`step` and `answer` choose another text format (envs/formats.py: steps as lines or paragraphs; the
answer as `#### N`, `\boxed{N}` or the completion's last number) and the prompt asks for it.

Rewards (one parse of the completion's answer, found as the format says: the LAST closed answer tag):
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

from treedistill.envs import formats
from treedistill.envs.base import Score
from treedistill.envs.formats import ANSWER_FORMATS, TextFormat
from treedistill.errors import UsageError
from treedistill.jsonl import read_records

__all__ = ["GSM8KEnv", "final_answer", "load_gsm8k", "parse_number", "solution_steps", "system_prompt",
           "validate_problem"]

MAX_ANSWER_CHARS = 64  # longer answer contents are not numbers we grade
_NUMBER = re.compile(r"[+-]?[0-9]+(?:\.[0-9]*)?")  # ASCII digits only (\d would match "٣")
_IGNORED = str.maketrans("", "", "$, ")
HUB_NAME = ("openai/gsm8k", "main")

EXAMPLE_STEPS = ("16-3-4=9 eggs are left each day.", "9*2=18 dollars.")
EXAMPLE_ANSWER = "18"


def system_prompt(fmt: TextFormat = formats.DEFAULT_FORMAT) -> str:
    """The instructions for format `fmt`; the default format's:
    'Solve the math word problem. Reason in one or more steps, putting each step inside <step>...</step>.
    Then write exactly one final answer inside <answer>...</answer> holding only the final number, without
    units.\nFor example: <step>16-3-4=9 eggs are left each day.</step><step>9*2=18 dollars.</step><answer>18</answer>'"""
    return (f"Solve the math word problem. {formats.step_instruction(fmt)} "
            f"{formats.answer_instruction(fmt, 'the final number, without units')}\n"
            f"{formats.example(EXAMPLE_STEPS, EXAMPLE_ANSWER, fmt)}")


SYSTEM_PROMPT = system_prompt()


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


_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations: "48/2 = <<48/2=24>>24"


def solution_steps(answer: str) -> list[str]:
    """A GSM8K worked solution as steps: its lines before '####', calculator annotations removed,
    blank lines dropped ("48/2 = <<48/2=24>>24 clips" -> "48/2 = 24 clips")."""
    body = answer.rsplit("####", 1)[0]
    lines = (" ".join(_CALCULATOR.sub("", line).split()) for line in body.split("\n"))
    return [line for line in lines if line]


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
    """GSM8K with the step/answer protocol; rewards as in the module docstring.

    Options: `step` (tags | line | blank) and `answer` (tag | hash | boxed | last_number), the text
    format of envs/formats.py; the defaults are `<step>` and `<answer>` tags."""

    name = "gsm8k"
    reward_from_prompt = False  # the score needs the reference answer, which the prompt does not hold
    answer_formats = ANSWER_FORMATS

    def __init__(self, *, step: str = "tags", answer: str = "tag"):
        self.format = TextFormat(step=step, answer=answer)
        problems = self.format.errors(self.answer_formats)
        if problems:
            raise ValueError("; ".join(problems))
        self.step_end = self.format.step_end
        self.system_prompt = system_prompt(self.format)

    def messages(self, problem: dict, *, compact: bool = False) -> list[dict]:
        if compact:
            return [{"role": "user", "content": problem["question"]}]
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": problem["question"]},
        ]

    def solution(self, problem: dict, rng=None) -> str:
        """The record's worked solution as a completion in this format (one line per step, the final
        number as the answer): what `treedistill sft` trains on. `rng` is unused: a record has one solution."""
        return formats.render(solution_steps(problem["answer"]), final_answer(problem["answer"]), self.format)

    def is_terminal(self, completion: str) -> bool:
        return isinstance(completion, str) and formats.is_answered(completion, self.format)

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
        answer = formats.extract(completion, self.format.answer)
        return None if answer is None else parse_number(answer)

    def score(self, problem: dict, completion: str) -> Score:
        gold = parse_number(final_answer(problem["answer"]))
        if gold is None:
            raise ValueError(f"problem has no numeric final answer: {problem['answer']!r}")
        answer = formats.extract(completion, self.format.answer)
        if answer is None:
            return Score(dense=-1.0, sparse=0.0, reason="no_answer")
        value = parse_number(answer)
        if value is None:
            return Score(dense=-0.9, sparse=0.0, reason="invalid:not_a_number", answer=answer)
        if value == gold:
            return Score(dense=1.0, sparse=1.0, reason="correct", answer=answer, well_formed=True)
        return Score(dense=-0.9, sparse=0.0, reason="wrong", answer=answer, well_formed=True)
