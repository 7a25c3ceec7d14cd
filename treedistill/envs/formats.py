"""How a completion marks its steps and its final answer: the environments' text format.

A format is two choices (`TextFormat`):
- step: where a reasoning step ends, the stop string the search expands to.
  "tags": `<step>...</step>` (step_end `</step>`); "line": one step per line (step_end "\\n");
  "blank": steps separated by a blank line (step_end "\\n\\n"), as in process-reward work
  (Lightman et al. 2023, "Let's Verify Step by Step", PRM800K: one step per line or paragraph).
- answer: where the final answer is.
  "tag": the content of the LAST closed `<answer>...</answer>`;
  "hash": GSM8K's own `#### N`, the rest of the line after the LAST `####`;
  "boxed": the content of the LAST `\\boxed{...}` whose braces close (nested braces counted);
  "last_number": the last number anywhere in the completion, lm-evaluation-harness's "flexible-extract"
  filter for GSM8K (regex `(-?[$0-9.,]{2,})|(-?[0-9]+)`, last match; lm_eval/tasks/gsm8k/gsm8k.yaml).

Safety, for every format: extraction reads the completion only, never raises on any string, never
evaluates it, and does work linear in its length (backwards scans that read each character at most
once, or one pass of a regex without nested quantifiers; a `\\boxed{` looks at most MAX_BOXED_CHARS
characters ahead).
The extracted text is then parsed by the environment's own bounded parser.

Pure: no torch, no model; `render` writes a completion in a format (training solutions for `sft`).
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass

from treedistill.envs.base import ANSWER_CLOSE, ANSWER_OPEN, STEP_CLOSE, STEP_OPEN

__all__ = ["ANSWER_FORMATS", "DEFAULT_FORMAT", "MAX_BOXED_CHARS", "STEP_ASK", "STEP_ENDS", "TextFormat", "answer_instruction", "example", "extract",
           "is_answered", "render", "step_instruction"]

STEP_ENDS = {"tags": STEP_CLOSE, "line": "\n", "blank": "\n\n"}
ANSWER_FORMATS = ("tag", "hash", "boxed", "last_number")
MAX_BOXED_CHARS = 256  # a \boxed{ whose braces do not close within this many characters holds no answer
BOXED = "\\boxed{"
HASH = "####"
# lm-evaluation-harness gsm8k "flexible-extract": (-?[$0-9.,]{2,})|(-?[0-9]+), the last match.
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


@dataclass(frozen=True)
class TextFormat:
    """The step delimiter and the answer format of completions (see the module docstring)."""

    step: str = "tags"      # tags (<step>...</step>) | line (one step per line) | blank (a blank line between steps)
    answer: str = "tag"     # tag (<answer>N</answer>) | hash (#### N) | boxed (\boxed{N}) | last_number (flexible extract)

    @property
    def step_end(self) -> str:
        """The text that closes a step: the search's stop string."""
        return STEP_ENDS[self.step]

    def errors(self, answers=ANSWER_FORMATS) -> list[str]:
        """What is wrong with the settings; `answers`: the answer formats the environment takes."""
        out = []
        if self.step not in STEP_ENDS:
            out.append(f"env_format.step must be one of {', '.join(STEP_ENDS)} (got {self.step!r})")
        if self.answer not in answers:
            out.append(f"env_format.answer must be one of {', '.join(answers)} (got {self.answer!r})")
        return out


DEFAULT_FORMAT = TextFormat()


def _last_tag(completion: str) -> str | None:
    end = completion.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = completion.rfind(ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    return completion[start + len(ANSWER_OPEN):end]


def _last_hash(completion: str) -> str | None:
    start = completion.rfind(HASH)
    if start < 0:
        return None
    rest = completion[start + len(HASH):]
    return rest.split("\n", 1)[0].strip()


def _last_boxed(completion: str) -> str | None:
    """The content of the last `\\boxed{` whose braces close within MAX_BOXED_CHARS; an earlier one
    when the last is unclosed (a cut completion keeps its last finished answer)."""
    end = len(completion)
    while True:
        start = completion.rfind(BOXED, 0, end)
        if start < 0:
            return None
        depth, i = 1, start + len(BOXED)
        # Scanning stops at the later, unclosed box: a box holding it cannot close either (its braces
        # are counted too, in a shorter window), so every character is scanned at most once.
        stop = min(end, i + MAX_BOXED_CHARS)
        while i < stop:
            char = completion[i]
            depth += (char == "{") - (char == "}")
            if depth == 0:
                return completion[start + len(BOXED):i]
            i += 1
        end = start


def _last_number(completion: str) -> str | None:
    last = collections.deque(_FLEXIBLE.finditer(completion), maxlen=1)
    return last[0].group(0) if last else None


_EXTRACT = {"tag": _last_tag, "hash": _last_hash, "boxed": _last_boxed, "last_number": _last_number}


def extract(completion, answer: str = "tag") -> str | None:
    """The answer text of `completion` in answer format `answer`, None when it holds none (or is not
    a string)."""
    if not isinstance(completion, str):
        return None
    return _EXTRACT[answer](completion)


def is_answered(completion: str, fmt: TextFormat) -> bool:
    """True once the completion holds a finished answer, so a line may end before end-of-sequence:
    a closed tag or \\boxed{}, a `####` line ended by a newline. "last_number" never finishes a
    completion early (any number may be followed by more reasoning): end-of-sequence does."""
    if fmt.answer == "hash":
        start = completion.rfind(HASH)
        return start >= 0 and "\n" in completion[start:] and bool(_last_hash(completion))
    if fmt.answer == "last_number":
        return False
    return extract(completion, fmt.answer) is not None


def _answer_text(answer: str, fmt: TextFormat) -> str:
    if fmt.answer == "tag":
        return f"{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"
    if fmt.answer == "hash":
        return f"{HASH} {answer}"
    if fmt.answer == "boxed":
        return f"The answer is {BOXED}{answer}}}."
    return f"The answer is {answer}."


def render(steps, answer: str, fmt: TextFormat = DEFAULT_FORMAT) -> str:
    """A completion in `fmt`: the step texts, each closed by the format's delimiter, then the answer.
    render(["2+3=5"], "5") == '<step>2+3=5</step><answer>5</answer>';
    render(["2+3=5"], "5", TextFormat("line", "hash")) == '2+3=5\\n#### 5'."""
    if fmt.step == "tags":
        body = "".join(f"{STEP_OPEN}{s}{STEP_CLOSE}" for s in steps)
    else:
        body = "".join(f"{s}{fmt.step_end}" for s in steps)
    return body + _answer_text(answer, fmt)


STEP_ASK = {"tags": "putting each step inside <step>...</step>", "line": "one step per line",
             "blank": "with a blank line between steps"}


def step_instruction(fmt: TextFormat) -> str:
    """How the prompt asks for steps: 'Reason in one or more steps, <STEP_ASK>.'"""
    return f"Reason in one or more steps, {STEP_ASK[fmt.step]}."


def answer_instruction(fmt: TextFormat, what: str) -> str:
    """How the prompt asks for the final answer `what` (e.g. 'the final number, without units')."""
    if fmt.answer == "tag":
        return f"Then write exactly one final answer inside <answer>...</answer> holding only {what}."
    if fmt.answer == "hash":
        return f"Then write a last line '#### ' followed by {what}."
    if fmt.answer == "boxed":
        return f"Then write {what}, as \\boxed{{...}}."
    return f"End with {what}."


def example(steps, answer: str, fmt: TextFormat) -> str:
    """'For example: <completion>' (on its own lines when the format's steps are lines)."""
    return "For example:" + (" " if fmt.step == "tags" else "\n") + render(steps, answer, fmt)
