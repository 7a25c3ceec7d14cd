"""The final table of a comparison: one row per label (its seeds summarised), paired differences.

Each run's FINAL evaluation (its last "eval" line: mean@k, sparse reward, no search) against the
compute it used: generated rollout tokens (the fairness knob of an equal-compute comparison),
rollout + learning FLOPs (metrics.ComputeCounters' estimate) and the seconds spent in rollouts and
updates (evaluation excluded). The statistics are stats.py's.

The pre-RL row: the model before RL, evaluated once and shared (a comparison's `pre-RL` label,
compare.py), or else the step-0 evaluations the runs start with (one value per seed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from treedistill.errors import UsageError
from treedistill.report.runs import CurvePoint, RunResult
from treedistill.report.stats import bootstrap_interval, confidence_interval

__all__ = ["EVAL_KEYS", "PRE_RL", "REFERENCE", "REFERENCE_MODEL", "Row", "comparability_problems",
           "paired_differences", "summarize"]

# The reference run's mean@16 (%) on its 820 Countdown test problems (docs/method.md),
# keyed by the labels the demo uses; None: the reference did not run that method on Countdown.
REFERENCE_MODEL = "Qwen2.5-1.5B-Instruct"
REFERENCE: dict[str, float | None] = {
    "pre-RL": 3.1, "best-of-N": 7.7, "CISPO": 8.4, "GRPO": None, "MCTS distillation": 11.3,
}
PRE_RL = "pre-RL"
# Settings that must agree for two runs' evaluations to be comparable.
EVAL_KEYS = ("model", "env", "test_path", "test_size", "data_seed", "eval_problems", "final_eval_problems",
             "eval_k", "eval_temperature", "max_new_tokens")


@dataclass(frozen=True)
class Row:
    """One line of the final table: a label's runs (one per seed), summarised.

    finals / eval_stderrs: [n] the final mean@k of each seed and its standard error over problems.
    se: the standard error used for differences (eval stderr when n = 1, sd / sqrt(n) otherwise);
    ci95: the half width of the 95% t-interval over seeds (None when n = 1);
    ci_low / ci_high: the 95% bootstrap interval over seeds and problems (None without per-problem
    results). Compute fields are means over seeds."""

    label: str
    method: str
    seeds: tuple[int, ...]
    finals: tuple[float, ...]
    eval_stderrs: tuple[float, ...]
    mean: float
    se: float
    ci95: float | None
    generated_tokens: float
    rollout_flops: float
    learn_flops: float
    train_s: float
    wall_s: float
    steps: float
    reference: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    ci_low: float | None = None
    ci_high: float | None = None

    @property
    def total_flops(self) -> float:
        return self.rollout_flops + self.learn_flops

    def to_dict(self) -> dict:
        return {"label": self.label, "method": self.method, "seeds": list(self.seeds), "finals": list(self.finals),
                "eval_stderrs": list(self.eval_stderrs), "mean": self.mean, "se": self.se, "ci95": self.ci95,
                "generated_tokens": self.generated_tokens, "rollout_flops": self.rollout_flops,
                "learn_flops": self.learn_flops, "total_flops": self.total_flops, "train_s": self.train_s,
                "wall_s": self.wall_s, "steps": self.steps, "reference": self.reference, "notes": list(self.notes),
                "ci_low": self.ci_low, "ci_high": self.ci_high}


def _spread(finals: Sequence[float], stderrs: Sequence[float]) -> tuple[float, float, float | None]:
    """(mean, se, ci95 half width or None) of per-seed final accuracies."""
    if len(finals) == 1:
        return finals[0], stderrs[0], None
    mean, half = confidence_interval(finals)
    return mean, statistics.stdev(finals) / math.sqrt(len(finals)), half


def _per_problem(runs: Sequence[RunResult]):
    """[S, P] array of the runs' final per-problem mean@k, or None where a run did not log them or
    the runs' problem counts differ."""
    import numpy as np

    if not runs or any(not r.final_per_problem for r in runs):
        return None
    if len({len(r.final_per_problem) for r in runs}) != 1:
        return None
    return np.array([r.final_per_problem for r in runs], dtype=float)


def _row(label: str, results: Sequence[RunResult], reference: float | None) -> Row:
    finals = tuple(r.final.accuracy for r in results)
    stderrs = tuple(r.final.stderr for r in results)
    mean, se, ci = _spread(finals, stderrs)
    matrix = _per_problem(results)
    low, high = bootstrap_interval(matrix)[1:] if matrix is not None else (None, None)
    notes = []
    for r in results:
        if not r.finished:
            notes.append(f"seed {r.seed}: unfinished (last evaluation at step {r.final.step} of {r.steps})")
        if r.under_budget:
            tokens = r.config.get("budget_generated_tokens")
            notes.append(f"seed {r.seed}: stopped at {r.steps} steps, under its budget of "
                         + (f"{int(tokens):,} generated tokens" if tokens is not None
                            else f"{float(r.config['budget_flops']):.3g} FLOPs"))
    methods = sorted({r.method for r in results})
    return Row(label=label, method="/".join(methods), seeds=tuple(r.seed for r in results), finals=finals,
               eval_stderrs=stderrs, mean=mean, se=se, ci95=ci,
               generated_tokens=statistics.fmean(r.generated_tokens for r in results),
               rollout_flops=statistics.fmean(r.rollout_flops for r in results),
               learn_flops=statistics.fmean(r.learn_flops for r in results),
               train_s=statistics.fmean(r.train_s for r in results),
               wall_s=statistics.fmean(r.wall_s for r in results),
               steps=statistics.fmean(r.steps for r in results), reference=reference, notes=tuple(notes),
               ci_low=low, ci_high=high)


def _pre_rl_row(results: Mapping[str, Sequence[RunResult]], reference: float | None) -> Row | None:
    """The shared evaluation before RL (label PRE_RL), else the step-0 evaluations, one per seed (the
    first run of each seed that has one)."""
    if PRE_RL in results:
        shared = results[PRE_RL]
        row = _row(PRE_RL, shared, reference)
        return dataclasses.replace(row, method="-", generated_tokens=0.0, rollout_flops=0.0, learn_flops=0.0,
                                   train_s=0.0, wall_s=0.0, steps=0.0, notes=())
    by_seed: dict[int, CurvePoint] = {}
    notes = []
    for runs in results.values():
        for r in runs:
            point = r.initial
            if point is None:
                continue
            if r.seed not in by_seed:
                by_seed[r.seed] = point
            elif abs(by_seed[r.seed].accuracy - point.accuracy) > 1e-12:
                notes.append(f"seed {r.seed}: step-0 evaluations differ between runs "
                             f"({100 * by_seed[r.seed].accuracy:.2f}% vs {100 * point.accuracy:.2f}% in {r.run_dir})")
    if not by_seed:
        return None
    seeds = sorted(by_seed)
    finals = tuple(by_seed[s].accuracy for s in seeds)
    stderrs = tuple(by_seed[s].stderr for s in seeds)
    mean, se, ci = _spread(finals, stderrs)
    return Row(label=PRE_RL, method="-", seeds=tuple(seeds), finals=finals, eval_stderrs=stderrs, mean=mean, se=se,
               ci95=ci, generated_tokens=0.0, rollout_flops=0.0, learn_flops=0.0, train_s=0.0, wall_s=0.0,
               steps=0.0, reference=reference, notes=tuple(notes))


def summarize(results: Mapping[str, Sequence[RunResult]],
              reference: Mapping[str, float | None] | None = None) -> list[Row]:
    """The final table's rows: pre-RL first (when the runs evaluated step 0), then one per label in
    the mapping's order."""
    reference = reference or {}
    rows = []
    pre = _pre_rl_row(results, reference.get(PRE_RL))
    if pre is not None:
        rows.append(pre)
    for label, runs in results.items():
        if label == PRE_RL:
            continue
        if not runs:
            raise UsageError(f"label {label!r} has no run folders")
        rows.append(_row(label, runs, reference.get(label)))
    return rows


def paired_differences(results: Mapping[str, Sequence[RunResult]], rows: Sequence[Row]) -> list[dict]:
    """Each trained row against the best trained row and against pre-RL: the difference of mean@k
    with its paired 95% bootstrap interval over seeds and problems (`bootstrap_interval`) and whether
    that interval excludes 0; rows without per-problem results are left out."""
    trained = [r for r in rows if r.label != PRE_RL]
    if not trained:
        return []
    best = max(trained, key=lambda r: r.mean)
    pre = next((r for r in rows if r.label == PRE_RL), None)
    matrices = {label: _per_problem(runs) for label, runs in results.items()}
    if pre is not None and PRE_RL not in results:  # step-0 evaluations carry no per-problem results here
        matrices[PRE_RL] = None
    out = []
    for row in trained:
        for other in ([best] if row is not best else []) + ([pre] if pre is not None else []):
            a, b = matrices.get(row.label), matrices.get(other.label)
            if a is None or b is None or a.shape[1] != b.shape[1]:
                continue
            diff, low, high = bootstrap_interval(a, b)
            out.append({"label": row.label, "versus": other.label, "difference": diff, "ci_low": low,
                        "ci_high": high, "significant": bool(low > 0 or high < 0)})
    return out


def comparability_problems(results: Mapping[str, Sequence[RunResult]]) -> list[str]:
    """Evaluation settings (EVAL_KEYS) that differ between runs: such evaluations are not comparable."""
    problems = []
    runs = [r for rs in results.values() for r in rs]
    for key in EVAL_KEYS:
        values = {json.dumps(r.config.get(key)) for r in runs}
        if len(values) > 1:
            problems.append(f"`{key}` differs between runs ({', '.join(sorted(values))})")
    return problems
