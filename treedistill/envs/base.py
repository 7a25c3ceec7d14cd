"""The environment contract: a task is one class.

An environment owns correctness: it builds the prompt, says where a reasoning step ends and when a
completion is finished, and scores a completion. Training reward (dense) and evaluation reward
(sparse) come from ONE parse inside `score`, so they cannot drift apart.

Problems are plain dicts, exactly the JSONL records of the task's data files
(Countdown: `{"numbers": [a, b, c, d], "target": T}`; GSM8K: `{"question": ..., "answer": ...}`).
The class also says where its problems come from: `load_split` (named splits or a file) and
`generate_splits` (None when the task cannot generate problems), so a new task is one class plus
one line in `treedistill.envs.ENVS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Protocol, runtime_checkable

STEP_OPEN = "<step>"
STEP_CLOSE = "</step>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"


@dataclass(frozen=True)
class Score:
    """The verdict on one completion.

    dense: the task's shaped reward (task-defined scale, Countdown in [-1, 1]).
    sparse: evaluation reward, 1.0 when correct else 0.0.
    trained: the reward a training run learns from where it is not `dense` (set by
        `methods.TrainingReward`, e.g. the sparse one); None: dense. Read it as `reward`.
    reason: a short machine-readable word: "correct", "wrong", "no_answer", "invalid", ...
    answer: the extracted answer text (None when there is no answer tag).
    well_formed: an answer tag whose content parses and uses only allowed inputs.
    """

    dense: float
    sparse: float
    reason: str
    answer: str | None = None
    well_formed: bool = False
    trained: float | None = None

    @property
    def reward(self) -> float:
        """The reward rollouts, the search and the learner use: `trained` where a run set it, else dense."""
        return self.dense if self.trained is None else self.trained


def reward_from_prompt(env) -> bool:
    """True when the environment declares `reward_from_prompt = True`: its reward reads only what the
    prompt states (Countdown: the numbers and the target), so checking a completion at test time uses
    no answer key. False when the attribute is absent (GSM8K needs the reference answer)."""
    return bool(getattr(env, "reward_from_prompt", False))


def canonical_step(env, step_text: str) -> str:
    """The environment's canonical form of one reasoning step, by its optional hook
    `canonical_step(step_text) -> str` (Countdown: operand order of + and *, spacing, the restated
    numbers sorted); the text itself when the environment has none. The search merges sibling steps
    with the same canonical form under `search.merge="canonical"`."""
    hook = getattr(env, "canonical_step", None)
    return hook(step_text) if hook is not None else step_text


# The fields of a problem that hold its ground truth: what a selector without a verifier must not read.
GROUND_TRUTH = ("target", "answer")


def inputs_only(problem: dict) -> dict:
    """The problem without its ground truth (GROUND_TRUTH), so `Env.answer_value` cannot read it even
    by mistake: a test-time selector calls `env.answer_value(inputs_only(problem), completion)`."""
    return {k: v for k, v in problem.items() if k not in GROUND_TRUTH}


@runtime_checkable
class Env(Protocol):
    """What the search, the rollouts and evaluation need from a task. Optional hooks, not part of
    the protocol: `canonical_step(step_text) -> str` (see `canonical_step` above), and
    `solution(problem, rng) -> str | None`, a correct completion in the environment's text format
    (what `treedistill sft` learns; None: the problem has none)."""

    name: str
    step_end: str  # text that closes a reasoning step: "</step>"

    def messages(self, problem: dict, *, compact: bool = False) -> list[dict]:
        """Chat messages ([{"role": ..., "content": ...}]) that pose the problem."""
        ...

    def score(self, problem: dict, completion: str) -> Score:
        """Score the COMPLETION only (never the prompt). Never raises on any string."""
        ...

    def is_terminal(self, completion: str) -> bool:
        """True once the completion holds a closed answer tag (end of sequence is the engine's)."""
        ...

    def key(self, problem: dict) -> tuple:
        """Identity of a problem up to irrelevant order, for disjoint splits."""
        ...

    def answer_value(self, problem: dict, completion: str) -> Fraction | int | None:
        """The exact value of the completion's LEGAL answer (the environment's own rules), None when
        it holds none. Reads only the problem's inputs, never its target or answer: callers pass
        `inputs_only(problem)`. An environment without such a value raises UsageError."""
        ...

    @staticmethod
    def load_split(split: str, path: Path | None = None) -> list[dict]:
        """The problems of the named `split` ("train" | "test"), or of the file at `path` when given."""
        ...

    @staticmethod
    def generate_splits(train_size: int, test_size: int, seed: int) -> tuple[list[dict], list[dict]] | None:
        """(train, test) problems generated from `seed`, disjoint under `key`; None when the task reads
        its problems from files instead."""
        ...
