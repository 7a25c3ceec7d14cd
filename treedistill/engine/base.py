"""The one generation interface every caller uses (search, sampling baselines, evaluation, training).

Backends: `engine/hf.py` (reference: HF `generate`) and `engine/native.py` (the fast path with a KV
cache shared across the search tree). No Hugging Face type crosses this interface: prefixes and
outputs are plain token-id lists and floats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from treedistill.errors import UsageError

FINISH_STOP = "stop"      # a stop string (e.g. "</step>") was generated
FINISH_EOS = "eos"        # end-of-sequence token (or the chat end token) was generated
FINISH_LENGTH = "length"  # max_new_tokens reached


@dataclass(frozen=True)
class Sample:
    """One sampled continuation of one prefix.

    tokens: generated ids [T], the stop string's / eos token's ids included.
    logprobs: [T] log-probs of `tokens` under the SAMPLING distribution (temperature, top_p applied).
    policy_logprobs: [T] log-probs under the raw policy (temperature 1, no top_p): the behaviour
        log-probs that importance ratios in training divide by.
    finish: FINISH_STOP | FINISH_EOS | FINISH_LENGTH.
    """

    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]
    policy_logprobs: tuple[float, ...]
    finish: str

    @property
    def sum_logprob(self) -> float:
        """Summed raw-policy log-prob of the continuation (the search's prior logit)."""
        return float(sum(self.policy_logprobs))


@dataclass
class Counters:
    """Cumulative compute counters of an engine (all in tokens or calls)."""

    prompt_tokens: int = 0         # prefix tokens run through the model (prefill, recomputed)
    cached_prompt_tokens: int = 0  # prefix tokens served from a KV cache instead of recomputed
    generated_tokens: int = 0      # tokens sampled (finished rows cost nothing more)
    scored_tokens: int = 0         # tokens run through `value` / `logprobs`
    forward_calls: int = 0         # model forward passes
    values: int = 0                # value-head evaluations (one position each)

    def snapshot(self) -> dict:
        return dict(self.__dict__)


@dataclass
class SampleRequest:
    """Options of one `sample` call (keyword-only in the Engine method)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)


def checked_sample_args(n: int, max_new_tokens: int, temperature: float, top_p: float,
                        stop: Sequence[str] | str) -> tuple[str, ...]:
    """Refuse sampling settings no engine can honour; the stop strings as a tuple (one string allowed)."""
    if n < 1 or max_new_tokens < 1:
        raise UsageError(f"need n >= 1 and max_new_tokens >= 1, got n={n}, max_new_tokens={max_new_tokens}")
    if not temperature >= 0 or not 0 < top_p <= 1:
        raise UsageError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    return (stop,) if isinstance(stop, str) else tuple(stop)


class Engine(Protocol):
    """Batched generation, value estimates and scoring over token-id prefixes."""

    counters: Counters

    def sample(
        self,
        prefixes: Sequence[Sequence[int]],
        n: int = 1,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[list[Sample]]:
        """n samples for each prefix: result[i][j] is sample j of prefixes[i]."""
        ...

    def value(self, prefixes: Sequence[Sequence[int]]) -> list[float]:
        """Value-head estimate in [-1, 1] at the last token of each prefix, one batch."""
        ...

    def logprobs(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[float]]:
        """Raw-policy log-probs of sequences[i][starts[i]:] given what precedes, one batch."""
        ...

    def clear_cache(self) -> None:
        """Forget every cached key/value (a backend without a cache has nothing to forget): before a
        phase that must not depend on an earlier one, and after the weights change."""
        ...
