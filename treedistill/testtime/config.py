"""What a test-time sweep is asked (`SweepConfig`, the budgets; its search defaults are
`search.contracts.TEST_TIME_SEARCH`) and what it returns (`MethodResult` per method and budget,
`SweepReport`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from treedistill.errors import UsageError
from treedistill.search import SearchSettings
from treedistill.search.contracts import TEST_TIME_SEARCH

__all__ = ["MAX_BUDGET", "MethodResult", "SweepConfig", "SweepReport", "parse_budgets"]




@dataclass(frozen=True)
class SweepConfig:
    """Options of one test-time sweep. budgets: generated tokens per problem, increasing. `search`: the
    tree's options (its temperature is also best-of-N's; simulations are fitted to each budget)."""

    budgets: tuple[int, ...]
    search: SearchSettings = TEST_TIME_SEARCH  # the test-time search (search/contracts.py)
    max_new_tokens: int = 512       # per completion (search path or sample)
    mcts_terminal: str = "legal"    # the mcts row's terminal values: "legal" | "value" (never the reward)
    seed: int = 0
    once_temperatures: tuple[float, ...] = (0.8, 0.2)  # the search temperature and the eval protocol's
    once_samples: int = 16          # samples per problem to estimate one sample's accuracy
    pilot_problems: int = 16        # problems of the MCTS cost pilot
    pilot_simulations: int = 8
    max_simulations: int = 4096
    budget_tolerance: float = 0.1   # MCTS: mean tokens within 10% of the budget, else refit and rerun
    budget_tries: int = 3           # MCTS: runs per budget at most
    saturation_elasticity: float = 0.1  # MCTS: d log tokens / d log simulations below this = saturated
    rows: str = "free"              # "free": no row uses the reward; "verifier": only the +verifier rows; "both"
    rows_per_call: int = 2048       # best-of-N stream: samples per engine call at most


@dataclass(frozen=True)
class MethodResult:
    """One method at one budget (budget None: at its own cost). accuracy / stderr are fractions
    (None when skipped); tokens: mean generated tokens actually used per problem."""

    method: str
    budget: int | None
    accuracy: float | None
    stderr: float | None
    tokens: float | None
    wall_s: float | None
    detail: dict = field(default_factory=dict)
    note: str = ""


@dataclass
class SweepReport:
    """All cells of a sweep, the MCTS cost calibration, MCTS minus best-of-N per budget paired over
    problems (`sweep.paired_differences`), and the whole wall time."""

    config: SweepConfig
    problems: int
    cells: list[MethodResult] = field(default_factory=list)
    calibration: list[dict] = field(default_factory=list)
    differences: list[dict] = field(default_factory=list)
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return {"config": asdict(self.config), "problems": self.problems, "wall_s": self.wall_s,
                "calibration": self.calibration, "differences": self.differences,
                "cells": [asdict(c) for c in self.cells]}

    def methods(self) -> list[str]:
        seen: list[str] = []
        for c in self.cells:
            if c.method not in seen:
                seen.append(c.method)
        return seen


# Generated tokens per problem at most: best-of-N draws (and keeps) a stream of samples up to the
# largest budget for every problem, so a mistyped budget would run for days and fill the memory.
MAX_BUDGET = 10_000_000


def parse_budgets(text: str) -> tuple[int, ...]:
    """"256,1024" -> (256, 1024): positive integers, sorted, duplicates dropped."""
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--budgets must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise UsageError(f"--budgets must be positive integers, got {text!r}")
    if max(values) > MAX_BUDGET:
        raise UsageError(f"--budgets: at most {MAX_BUDGET:,} generated tokens per problem, got {max(values):,}")
    return tuple(sorted(set(values)))
