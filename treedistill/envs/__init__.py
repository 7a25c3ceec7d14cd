"""Environments: a task is one class implementing `treedistill.envs.base.Env`.

Add a task by writing the class (prompt, score, answer_value, load_split, generate_splits) and
registering it in `ENVS`: `treedistill.datasets`, `treedistill.config` and test-time selection read it
from here.
"""

from __future__ import annotations

from treedistill.envs.base import Env, Score, inputs_only
from treedistill.envs.countdown import CountdownEnv
from treedistill.envs.gsm8k import GSM8KEnv
from treedistill.errors import UsageError

__all__ = ["ENVS", "CountdownEnv", "Env", "GSM8KEnv", "Score", "get_env", "inputs_only"]

ENVS = {"countdown": CountdownEnv, "gsm8k": GSM8KEnv}


def get_env(name: str, **options) -> Env:
    """The environment called `name`, built with keyword `options` (e.g. require_all_numbers=True)."""
    cls = ENVS.get(name)
    if cls is None:
        raise UsageError(f"unknown environment {name!r}; known: {', '.join(sorted(ENVS))}")
    try:
        return cls(**options)
    except TypeError as err:
        raise UsageError(f"environment {name!r} does not take options {sorted(options)}: {err}") from None
    except ValueError as err:  # an option's value (envs/formats.py: the step delimiter, the answer format)
        raise UsageError(f"environment {name!r}: {err}") from None
