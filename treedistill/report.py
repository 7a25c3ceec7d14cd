"""Equal-compute comparison reports from run folders: a table, the learning curves, markdown, PNGs.

Input: run folders written by `treedistill train` (config.yaml + metrics.jsonl), grouped by label
(one folder per seed). Nothing here trains or loads a model; any finished or running run folder can
be reported on (`write_report`). A single training run's own RUN/report.md, its final evaluation and
learning curve, is `write_run_report`. No torch import.

What is compared. Each run's FINAL evaluation (its last "eval" line: mean@k, sparse reward, no
search) against the compute it used: generated rollout tokens (the fairness knob of an equal-compute
comparison), rollout + learning FLOPs (metrics.ComputeCounters' estimate) and the seconds spent in
rollouts and updates (evaluation excluded). The "pre-RL" row is the step-0 evaluation the runs
start with (the same untrained model; one value per seed).

The pre-RL row: the model before RL, evaluated once and shared (a comparison's `pre-RL` label,
compare.py), or else the step-0 evaluations the runs start with (one value per seed).

Statistics:
- one seed: mean@k +- its standard error over test problems (evaluate.py: problems are the
  independent unit). This is evaluation noise only; it does not cover training randomness.
- several seeds: the mean over seeds of the final mean@k with a 95% Student-t interval,
  mean +- t_{0.975, n-1} * sd / sqrt(n) (sd with ddof = 1): the seed is the independent unit, so
  the interval covers training and evaluation noise. Per-seed values are listed beside it.
- where the final evaluations logged their per-problem results (`eval_per_problem`): a 95% interval
  over seeds AND problems by a two-level bootstrap (resample seeds, then test problems; percentile
  interval of BOOTSTRAP_SAMPLES replicates, seeded), and, for each row against the best and against
  pre-RL, the difference with a PAIRED 95% bootstrap interval: both rows' seeds resampled
  independently, the test problems resampled jointly (every row was evaluated on the same problems),
  so the problems' shared difficulty cancels. A difference is significant when its interval excludes
  0. With 3 seeds the seed level of the bootstrap is coarse (it sees 3 values, and a resample of n
  values has (n - 1) / n of their variance): the intervals are then somewhat narrow.
- without per-problem results: a difference in combined standard errors, (a - b) / sqrt(se_a^2 +
  se_b^2) with se = the evaluation standard error (one seed) or sd / sqrt(n) (several seeds).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from treedistill.config import TrainConfig, to_yaml
from treedistill.errors import UsageError
from treedistill.metrics import format_duration, read_metrics

__all__ = [
    "REFERENCE",
    "REFERENCE_MODEL",
    "CurvePoint",
    "Row",
    "RunResult",
    "comparability_problems",
    "compact_table",
    "confidence_interval",
    "headline",
    "markdown",
    "paired_differences",
    "bootstrap_interval",
    "plot_curves",
    "plot_final",
    "read_records",
    "read_run",
    "summarize",
    "t_cdf",
    "t_quantile",
    "table_text",
    "verdict",
    "write_report",
    "write_run_report",
    "z_score",
]

# The reference run's mean@16 (%) on its 820 Countdown test problems (../shared/docs/method.md),
# keyed by the labels the demo uses; None: the reference did not run that method on Countdown.
REFERENCE_MODEL = "Qwen2.5-1.5B-Instruct"
REFERENCE: dict[str, float | None] = {
    "pre-RL": 3.1, "best-of-N": 7.7, "CISPO": 8.4, "GRPO": None, "MCTS distillation": 11.3,
}
PRE_RL = "pre-RL"
# Settings that must agree for two runs' evaluations to be comparable.
EVAL_KEYS = ("model", "env", "test_path", "test_size", "data_seed", "eval_problems", "final_eval_problems",
             "eval_k", "eval_temperature", "max_new_tokens")
BOOTSTRAP_SAMPLES = 4000


# ---------------------------------------------------------------------------------------------------
# Student t, without scipy


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with an integer number of degrees of freedom >= 1.

    Closed form for integer df (Abramowitz & Stegun 26.7.3 / 26.7.4), with theta = atan(t / sqrt(df)):
    A(t | df) = P(|T| <= |t|) =
      df odd:  (2 / pi) * (theta + sin(theta) * (cos(theta) + 2/3 cos^3(theta) + ...
                                                + (2*4*...*(df-3)) / (1*3*...*(df-2)) cos^(df-2)(theta)))
               (just 2 theta / pi for df = 1)
      df even: sin(theta) * (1 + 1/2 cos^2(theta) + 1*3/(2*4) cos^4(theta) + ...
                             + (1*3*...*(df-3)) / (2*4*...*(df-2)) cos^(df-2)(theta))
    """
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be an integer >= 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2:
        total, term = 0.0, c
        for j in range(1, df - 1, 2):  # terms cos, 2/3 cos^3, ...: j = 1, 3, ..., df - 2
            total += term
            term *= c * c * (j + 1) / (j + 2)
        a = 2.0 / math.pi * (theta + s * total) if df > 1 else 2.0 * theta / math.pi
    else:
        total, term = 0.0, 1.0
        for j in range(0, df - 1, 2):  # terms 1, 1/2 cos^2, 1*3/(2*4) cos^4, ...: j = 0, 2, ..., df - 2
            total += term
            term *= c * c * (j + 1) / (j + 2)
        a = s * total
    return 0.5 + math.copysign(a / 2.0, t)


def t_quantile(q: float, df: int) -> float:
    """The q-quantile of Student's t with integer df (bisection on t_cdf, to ~1e-12)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    lo, hi = -1e6, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, abs(mid)):
            break
    return (lo + hi) / 2.0


def confidence_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half width) of the Student-t interval for the mean of `values` (n >= 2)."""
    n = len(values)
    if n < 2:
        raise ValueError(f"a confidence interval over seeds needs at least 2 values, got {n}")
    sd = statistics.stdev(values)  # ddof = 1
    return statistics.fmean(values), t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)


def z_score(a: float, se_a: float, b: float, se_b: float) -> float:
    """(a - b) in combined standard errors; +-inf when both are exact and differ, 0 when equal."""
    combined = math.hypot(se_a, se_b)
    if combined == 0.0:
        return 0.0 if a == b else math.copysign(math.inf, a - b)
    return (a - b) / combined


def verdict(z: float) -> str:
    """Plain words for a difference of z combined standard errors."""
    z = round(abs(z), 2)  # as printed: a z shown as 2.00 is not "under 2"
    if z < 1.0:
        return "well within noise: neither can be called better"
    if z < 2.0:
        return "suggestive, but under 2 standard errors: not a clear win"
    return "2 or more standard errors: a clear difference"


# ---------------------------------------------------------------------------------------------------
# Reading run folders


@dataclass(frozen=True)
class CurvePoint:
    """One evaluation of a run: step, cumulative compute when it ran, mean@k and its stderr."""

    step: int
    generated_tokens: int
    total_flops: float
    accuracy: float
    stderr: float


@dataclass(frozen=True)
class RunResult:
    """What a report needs from one run folder. curve: [E] evaluations in step order (step 0 = pre-RL)."""

    run_dir: str
    method: str
    seed: int
    config: dict
    curve: tuple[CurvePoint, ...]
    steps: int                    # last logged training step
    generated_tokens: int         # cumulative, at the last logged training step
    rollout_flops: float
    learn_flops: float
    train_s: float                # seconds in rollouts + updates (evaluations excluded)
    wall_s: float                 # wall time of the run so far, evaluations included
    finished: bool                # the last evaluation is at the last logged training step
    under_budget: bool            # stopped (finished) short of its generated-token budget
    final_per_problem: tuple[float, ...] = ()  # [P] the final evaluation's per-problem mean@k; () if not logged
    final_value: dict = field(default_factory=dict)  # the final evaluation's value_spearman / value_mse / value_mse_const

    @property
    def final(self) -> CurvePoint:
        return self.curve[-1]

    @property
    def initial(self) -> CurvePoint | None:
        return self.curve[0] if self.curve and self.curve[0].step == 0 else None


VALUE_KEYS = ("value_spearman", "value_mse", "value_mse_const")  # value_probe.py's, on eval lines


def read_records(run_dir: str | Path, *, missing_ok: bool = False) -> list[dict]:
    """metrics.jsonl records of a run folder, finished or in flight: a line cut short by a kill (or
    being written) is skipped. A folder without the file is refused, or gives [] with missing_ok."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        if missing_ok:
            return []
        raise UsageError(f"{run_dir} is not a run folder: no metrics.jsonl")
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_run(run_dir: str | Path) -> RunResult:
    """The curve, compute and final evaluation of one run folder (finished or not)."""
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    evals = [r for r in records if r.get("kind") == "eval"]
    if not evals:
        raise UsageError(f"{run_dir} has no evaluation yet (no kind=eval line in metrics.jsonl)")
    trains = [r for r in records if r.get("kind") == "train"]
    last = trains[-1] if trains else evals[-1]
    curve = tuple(CurvePoint(step=int(r["step"]), generated_tokens=int(r.get("rollout_generated_tokens", 0)),
                             total_flops=float(r.get("total_flops", 0.0)), accuracy=float(r["eval_accuracy"]),
                             stderr=float(r["eval_stderr"] or 0.0)) for r in evals)
    steps = int(last["step"])
    finished = curve[-1].step == steps and steps > 0
    budget = config.get("budget_generated_tokens")
    generated = int(last.get("rollout_generated_tokens", 0))
    return RunResult(
        run_dir=str(run_dir), method=str(config.get("method", "?")), seed=int(config.get("seed", 0)),
        config=config, curve=curve, steps=steps, generated_tokens=generated,
        rollout_flops=float(last.get("rollout_flops", 0.0)), learn_flops=float(last.get("learn_flops", 0.0)),
        train_s=sum(float(r.get("rollout_s", 0.0)) + float(r.get("learn_s", 0.0)) for r in trains),
        wall_s=max(float(r.get("wall_s") or 0.0) for r in records), finished=finished,
        under_budget=finished and budget is not None and generated < int(budget),
        final_per_problem=tuple(float(x) for x in evals[-1].get("eval_per_problem") or ()),
        final_value={key: evals[-1][key] for key in VALUE_KEYS if key in evals[-1]})


# ---------------------------------------------------------------------------------------------------
# Rows of the final table


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


def bootstrap_interval(a, b=None, *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float, float]:
    """(estimate, low, high): mean of a [S_a, P] (minus that of b [S_b, P], paired over the P
    problems) with a two-level bootstrap percentile interval: each side's seeds resampled
    independently, the problems resampled jointly for both sides."""
    import numpy as np

    rng = np.random.default_rng(seed)
    problems = a.shape[1]
    if b is not None and b.shape[1] != problems:
        raise ValueError(f"paired rows need the same problems ({problems} vs {b.shape[1]})")
    take = rng.integers(0, problems, size=(samples, problems))  # [R, P]

    def replicate(m):
        per_seed = m[:, take].mean(-1).T  # [R, S]: each seed's mean over the resampled problems
        seeds = rng.integers(0, m.shape[0], size=(samples, m.shape[0]))  # [R, S]
        return np.take_along_axis(per_seed, seeds, axis=1).mean(-1)  # [R]

    stat = replicate(a) - (replicate(b) if b is not None else 0.0)
    estimate = float(a.mean() - (b.mean() if b is not None else 0.0))
    low, high = np.percentile(stat, [50 * (1 - level), 50 * (1 + level)])
    return estimate, float(low), float(high)


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
            notes.append(f"seed {r.seed}: stopped at {r.steps} steps, under its budget of "
                         f"{int(r.config['budget_generated_tokens']):,} generated tokens")
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


# ---------------------------------------------------------------------------------------------------
# Text


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _count(x: float) -> str:
    return f"{x:,.0f}"


def _interval(row: Row) -> str | None:
    """The row's bootstrap 95% interval in percent, or None."""
    return None if row.ci_low is None else f"[{_pct(row.ci_low)}, {_pct(row.ci_high)}]"


def _uncertainty(row: Row) -> str:
    if row.ci_low is not None:
        return f"{_interval(row)} (95% CI)"
    return f"+- {_pct(row.ci95)} (95% CI)" if row.ci95 is not None else f"+- {_pct(row.se)} (s.e.)"


def table_text(rows: Sequence[Row], *, k: int = 16) -> str:
    """The final table as aligned plain text (for the terminal)."""
    header = ["method", f"mean@{k} %", "uncertainty", "generated tokens", "FLOPs (roll+learn)", "train time",
              "reference %"]
    lines = [[r.label, _pct(r.mean), _uncertainty(r), _count(r.generated_tokens),
              "-" if r.label == PRE_RL else f"{r.total_flops:.3g}",
              "-" if r.label == PRE_RL else format_duration(r.train_s),
              "-" if r.reference is None else f"{r.reference:.1f}"] for r in rows]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    out = ["  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(line, widths)))
           for line in [header, *lines]]
    return "\n".join(out)


def headline(rows: Sequence[Row], differences: Sequence[dict] = ()) -> str:
    """Which trained row scored highest, by how much over the runner-up: with the paired 95% interval
    of the difference where `differences` (paired_differences) has it, else in combined standard
    errors."""
    trained = sorted((r for r in rows if r.label != PRE_RL), key=lambda r: r.mean, reverse=True)
    if not trained:
        return "No trained runs to compare."
    best = trained[0]
    if len(trained) == 1:
        return f"Only one trained method ({best.label}): {_pct(best.mean)}% mean@k."
    second = trained[1]
    if best.mean == second.mean:
        return (f"No method scored highest: {best.label} and {second.label} tie at {_pct(best.mean)}% "
                "at equal generated tokens.")
    paired = next((d for d in differences if d["label"] == second.label and d["versus"] == best.label), None)
    if paired is not None:
        lo, hi = -100 * paired["ci_high"], -100 * paired["ci_low"]
        return (f"**{best.label}** scored highest at equal generated tokens: {_pct(best.mean)}% against "
                f"{_pct(second.mean)}% for the runner-up {second.label}, a difference of "
                f"{100 * (best.mean - second.mean):.2f} points, paired 95% CI [{lo:.2f}, {hi:.2f}] over seeds and "
                f"problems: " + ("significant (the interval excludes 0)." if paired["significant"] else
                                 "not significant (the interval includes 0): neither can be called better."))
    z = z_score(best.mean, best.se, second.mean, second.se)
    unit = "seed-level standard errors" if best.ci95 is not None else "combined standard errors (evaluation only)"
    return (f"**{best.label}** scored highest at equal generated tokens: {_pct(best.mean)}% against "
            f"{_pct(second.mean)}% for the runner-up {second.label}, a difference of "
            f"{100 * (best.mean - second.mean):.2f} points = {z:.2f} {unit}: {verdict(z)}.")


def _paired_table(differences: Sequence[dict]) -> list[str]:
    """Paired differences as a markdown table: points with the 95% interval, significant or not."""
    lines = ["| method | versus | difference (points) | paired 95% CI | significant |", "|---|---|---:|---:|---|"]
    for d in differences:
        lines.append(f"| {d['label']} | {d['versus']} | {100 * d['difference']:+.2f} | "
                     f"[{100 * d['ci_low']:+.2f}, {100 * d['ci_high']:+.2f}] | {'yes' if d['significant'] else 'no'} |")
    return lines


def _differences(rows: Sequence[Row]) -> list[str]:
    trained = [r for r in rows if r.label != PRE_RL]
    pre = next((r for r in rows if r.label == PRE_RL), None)
    if not trained:
        return []
    best = max(trained, key=lambda r: r.mean)
    lines = ["| method | vs pre-RL (points, z) | vs best: " + best.label + " (points, z) |", "|---|---:|---:|"]
    for r in trained:
        vs_pre = ("-" if pre is None else
                  f"{100 * (r.mean - pre.mean):+.2f}, z = {z_score(r.mean, r.se, pre.mean, pre.se):+.2f}")
        vs_best = ("-" if r is best else
                   f"{100 * (r.mean - best.mean):+.2f}, z = {z_score(r.mean, r.se, best.mean, best.se):+.2f}")
        lines.append(f"| {r.label} | {vs_pre} | {vs_best} |")
    return lines


def _markdown_table(rows: Sequence[Row], k: int, reference: bool) -> list[str]:
    several = any(r.ci95 is not None for r in rows)
    boot = any(r.ci_low is not None for r in rows)
    spread_name = ("95% CI (bootstrap, seeds and problems)" if boot else
                   "95% CI (t, over seeds)" if several else "standard error")
    head = (f"| method | mean@{k} % | {spread_name} | "
            + (f"per-seed mean@{k} % | " if several else "")
            + "generated tokens | rollout FLOPs | learning FLOPs | rollout + learning FLOPs | steps | "
              "train time | wall time |" + (f" reference mean@16 % ({REFERENCE_MODEL}) |" if reference else ""))
    lines = [head, "|---" + "|---:" * (head.count("|") - 2) + "|"]
    for r in rows:
        spread = _interval(r) or (f"± {_pct(r.ci95)}" if r.ci95 is not None else f"± {_pct(r.se)}")
        seeds = (" / ".join(_pct(x) for x in r.finals) + " | ") if several else ""
        ref = (" " + ("-" if r.reference is None else f"{r.reference:.1f}") + " |") if reference else ""
        compute = ("0 | - | - | - | 0 | - | - |" if r.label == PRE_RL else
                   f"{_count(r.generated_tokens)} | {r.rollout_flops:.3g} | {r.learn_flops:.3g} | "
                   f"{r.total_flops:.3g} | {r.steps:.0f} | {format_duration(r.train_s)} | "
                   f"{format_duration(r.wall_s)} |")
        lines.append(f"| {r.label} | {_pct(r.mean)} | {spread} | {seeds}{compute}{ref}")
    return lines


def compact_table(rows: Sequence[Row], *, k: int = 16) -> list[str]:
    """The final table in a short form for a README: mean@k with its uncertainty, compute, reference."""
    reference = any(r.reference is not None for r in rows)
    several = any(r.ci95 is not None for r in rows)
    boot = any(r.ci_low is not None for r in rows)
    lines = [f"| method | mean@{k} % ({'[95% CI over seeds and problems]' if boot else '± 95% CI over seeds' if several else '± s.e.'}) | generated tokens | "
             f"rollout + learning FLOPs | train time |" + (f" reference mean@16 % ({REFERENCE_MODEL}) |" if reference
                                                          else ""),
             "|---|---:|---:|---:|---:|" + ("---:|" if reference else "")]
    for r in rows:
        spread = r.ci95 if r.ci95 is not None else r.se
        shown = f"{_pct(r.mean)} {_interval(r)}" if r.ci_low is not None else f"{_pct(r.mean)} ± {_pct(spread)}"
        compute = ("0 | - | - |" if r.label == PRE_RL else
                   f"{_count(r.generated_tokens)} | {r.total_flops:.3g} | {format_duration(r.train_s)} |")
        ref = (" " + ("-" if r.reference is None else f"{r.reference:.1f}") + " |") if reference else ""
        lines.append(f"| {r.label} | {shown} | {compute}{ref}")
    return lines


def _curve_table(results: Mapping[str, Sequence[RunResult]], k: int) -> list[str]:
    lines = [f"| method | seed | step | generated tokens | total FLOPs | mean@{k} % | s.e. |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label, runs in results.items():
        for r in runs:
            for p in r.curve:
                lines.append(f"| {label} | {r.seed} | {p.step} | {p.generated_tokens:,} | {p.total_flops:.3g} | "
                             f"{_pct(p.accuracy)} | {_pct(p.stderr)} |")
    return lines


def _compute_notes(rows: Sequence[Row], results: Mapping[str, Sequence[RunResult]]) -> list[str]:
    trained = [r for r in rows if r.label != PRE_RL]
    notes = []
    budgets = {r.config.get("budget_generated_tokens") for rs in results.values() for r in rs}
    if len(budgets) == 1 and None not in budgets:
        budget = budgets.pop()
        notes.append(f"Every run had the same budget of {int(budget):,} generated rollout tokens; the step that "
                     "reaches it takes only the problems it has room for (one-process loop; the Ray loop's "
                     "steps are whole), so a run ends within about one problem's tokens past it.")
    elif budgets:
        notes.append("The runs had different generated-token budgets ("
                     + ", ".join("none" if b is None else f"{int(b):,}" for b in sorted(budgets, key=str))
                     + "): this is not an equal-compute comparison.")
    if trained:
        tokens = [r.generated_tokens for r in trained]
        flops = [r.total_flops for r in trained]
        if min(tokens) > 0:
            notes.append(f"Generated tokens ranged {_count(min(tokens))} to {_count(max(tokens))} "
                         f"(max / min = {max(tokens) / min(tokens):.3f}); rollout + learning FLOPs "
                         f"{min(flops):.3g} to {max(flops):.3g} (max / min = "
                         f"{max(flops) / max(min(flops), 1e-30):.2f}).")
    return notes


def markdown(rows: Sequence[Row], results: Mapping[str, Sequence[RunResult]], *, title: str,
             notes: Sequence[str] = (), plots: Sequence[str] = ()) -> str:
    """The report: headline, final table, differences, plots, learning curves, caveats, run folders."""
    any_run = next(r for rs in results.values() for r in rs)
    k = int(any_run.config.get("eval_k", 16))
    reference = any(r.reference is not None for r in rows)
    cfg = any_run.config
    final_count = cfg.get("final_eval_problems")
    final_count = cfg.get("eval_problems") if final_count is None else final_count

    def which(count) -> str:
        return f"all {cfg.get('test_size')}" if not count else f"the first {count}"

    where = (f"on {which(final_count)} problems of the held-out test split" if final_count == cfg.get("eval_problems")
             else f"at the end on {which(final_count)} problems of the held-out test split (the intermediate "
                  f"points on {which(cfg.get('eval_problems'))})")
    seeds = sorted({s for r in rows for s in r.seeds})
    lines = [f"# {title}", "",
             f"Model `{cfg.get('model')}` on `{cfg.get('env')}`. Evaluation: mean@{k}, {k} samples per test "
             f"problem at temperature {cfg.get('eval_temperature')}, up to {cfg.get('max_new_tokens')} new tokens, "
             f"sparse reward, no search, {where}, the same problems for every method. "
             f"Seeds: {', '.join(map(str, seeds))}.", ""]
    lines += [*notes, ""] if notes else []
    differences = paired_differences(results, rows)
    lines += ["## Result", "", headline(rows, differences), ""]
    lines += ["## Final table", "", *_markdown_table(rows, k, reference), ""]
    lines += [("Uncertainty: 95% bootstrap interval over seeds and test problems (two levels: seeds, then "
               "problems, resampled; the final evaluations' per-problem results)."
               if any(r.ci_low is not None for r in rows) else
               "Uncertainty: 95% Student-t interval over seeds of the final mean@k (the seed is the unit)."
               if any(r.ci95 is not None for r in rows) else
               "Uncertainty: standard error of mean@k over test problems (evaluation noise only; one seed "
               "does not measure training randomness).")
              + " Train time: seconds in rollouts and updates (evaluations excluded); wall time includes "
                "evaluations.", ""]
    if reference:
        lines += [f"The reference column is the reference run's published mean@16 with {REFERENCE_MODEL} "
                  "on 820 test problems: a different model and scale, the same protocol, shown for orientation "
                  "only.", ""]
    if differences:
        lines += ["## Differences", "", "Each method against the best and against pre-RL: the difference of "
                  "mean@k with a paired 95% bootstrap interval over seeds and test problems (the problems "
                  "resampled jointly for both rows); significant when the interval excludes 0.", "",
                  *_paired_table(differences), ""]
    else:
        lines += ["## Differences", "", "In combined standard errors, z = (a - b) / sqrt(se_a^2 + se_b^2) "
                  "(unpaired; |z| >= 2 is roughly a 95% difference).", "", *_differences(rows), ""]
    lines += ["## Compute", "", *[f"- {n}" for n in _compute_notes(rows, results)], ""]
    lines += _value_table(results)
    for plot in plots:
        lines += [f"![{Path(plot).stem}]({Path(plot).name})", ""]
    lines += ["## Learning curves", "", *_curve_table(results, k), ""]
    caveats = [*comparability_problems(results), *[f"{r.label}: {n}" for r in rows for n in r.notes]]
    if caveats:
        lines += ["## Caveats", "", *[f"- {c}" for c in caveats], ""]
    lines += ["## Run folders", ""]
    for label, runs in results.items():
        for r in runs:
            lines.append(f"- {label}, seed {r.seed}: `{r.run_dir}` ({r.steps} steps)")
    return "\n".join(lines) + "\n"


def _value_table(results: Mapping[str, Sequence[RunResult]]) -> list[str]:
    """The value heads at the final evaluation (value_probe.py), means over seeds; [] when no run has one."""
    out = []
    for label, runs in results.items():
        probed = [r.final_value for r in runs if "value_mse" in r.final_value]
        if not probed:
            continue
        rhos = [v["value_spearman"] for v in probed if v.get("value_spearman") is not None]
        rho = f"{statistics.fmean(rhos):+.3f}" if rhos else "n/a"
        out.append(f"| {label} | {len(probed)} | {rho} | {statistics.fmean(v['value_mse'] for v in probed):.4f} | "
                   f"{statistics.fmean(v['value_mse_const'] for v in probed):.4f} |")
    if not out:
        return []
    return ["## Value head", "", "At the final evaluation: V(prefix) against the mean reward of policy completions "
            "from step prefixes of test problems (value_probe.py); a useful head has Spearman > 0 and an MSE under "
            "the best constant's. Means over seeds.", "",
            "| method | seeds | Spearman | MSE | best constant's MSE |", "|---|---:|---:|---:|---:|", *out, ""]


# ---------------------------------------------------------------------------------------------------
# Plots


def _curve_series(runs: Sequence[RunResult], start: CurvePoint | None = None,
                  ) -> list[tuple[list[float], list[float], list[float], list[float]]]:
    """[(tokens, flops, accuracy %, 95% half width %)]: one averaged series when every seed has the same
    number of evaluations (half width: t-interval over seeds for n > 1, 1.96 eval s.e. for n = 1), else
    one series per seed. `start`: a shared pre-RL point put first in every series."""
    curves = [((start,) if start is not None else ()) + r.curve for r in runs]
    lengths = {len(c) for c in curves}
    if len(runs) > 1 and len(lengths) == 1:
        series = []
        for points in zip(*curves):
            acc = [p.accuracy for p in points]
            half = (confidence_interval(acc)[1] if len(set(acc)) > 1 else 0.0)
            series.append((statistics.fmean(p.generated_tokens for p in points),
                           statistics.fmean(p.total_flops for p in points), 100 * statistics.fmean(acc), 100 * half))
        return [tuple(map(list, zip(*series)))]
    return [([p.generated_tokens for p in c], [p.total_flops for p in c],
             [100 * p.accuracy for p in c], [196 * p.stderr for p in c]) for c in curves]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 12, "axes.titlesize": 14, "axes.labelsize": 12, "legend.fontsize": 11})
    return plt


def plot_curves(results: Mapping[str, Sequence[RunResult]], path: Path, *, title: str, k: int) -> Path:
    """mean@k against generated tokens (left) and against rollout + learning FLOPs (right), one line per
    label with its 95% band (over seeds; over test problems for one seed); a shared pre-RL evaluation
    (label PRE_RL) starts every line. Lines differ in colour, marker and dash, so runs that coincide
    stay visible."""
    from matplotlib.ticker import EngFormatter

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    several = any(len(runs) > 1 for label, runs in results.items() if label != PRE_RL)
    start = results[PRE_RL][0].initial if PRE_RL in results else None
    markers, dashes = "osD^vP*X", ("-", "--", "-.", ":")
    trained = [(label, runs) for label, runs in results.items() if label != PRE_RL]
    for i, (label, runs) in enumerate(trained):
        color = plt.get_cmap("tab10")(i % 10)
        for j, (tokens, flops, acc, err) in enumerate(_curve_series(runs, start)):
            for ax, x in zip(axes, (tokens, flops)):
                ax.plot(x, acc, color=color, marker=markers[i % len(markers)], markersize=6,
                        linestyle=dashes[i % len(dashes)], linewidth=2, label=label if j == 0 else None)
                ax.fill_between(x, [a - e for a, e in zip(acc, err)], [a + e for a, e in zip(acc, err)],
                                color=color, alpha=0.12, linewidth=0)
    axes[0].set_xlabel("generated rollout tokens")
    axes[1].set_xlabel("rollout + learning FLOPs (estimate)")
    axes[0].set_ylabel(f"mean@{k} accuracy on the test problems (%)")
    for ax in axes:
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(True, alpha=0.3)
        ax.set_xlim(left=0)
    axes[0].legend(loc="best", frameon=True)
    band = "95% CI over seeds" if several else "95% CI over test problems"
    fig.suptitle(f"{title}\n(first point: the model before RL; bands: {band})", fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_final(rows: Sequence[Row], path: Path, *, title: str, k: int) -> Path:
    """Final mean@k per row with its uncertainty, and the reference run's numbers beside (when given)."""
    plt = _pyplot()
    has_reference = any(r.reference is not None for r in rows)
    fig, ax = plt.subplots(figsize=(max(6.5, 1.6 * len(rows) + 2), 5.2))
    xs = list(range(len(rows)))
    width = 0.38 if has_reference else 0.6
    shift = width / 2 if has_reference else 0.0
    several = any(r.ci95 is not None for r in rows)
    ours = [100 * r.mean for r in rows]
    boot = any(r.ci_low is not None for r in rows)
    if boot:  # the bootstrap interval, asymmetric: [mean - low, high - mean]
        errs = [[100 * (r.mean - r.ci_low) if r.ci_low is not None else 0.0 for r in rows],
                [100 * (r.ci_high - r.mean) if r.ci_high is not None else 0.0 for r in rows]]
    else:
        errs = [100 * (r.ci95 if r.ci95 is not None else r.se) for r in rows]
    bars = ax.bar([x - shift for x in xs], ours, width, yerr=errs, capsize=4, color="tab:blue",
                  label=f"this run ({'95% CI over seeds and problems' if boot else '95% CI over seeds' if several else '± 1 s.e.'})")
    tops = errs[1] if boot else errs
    for bar, value, err in zip(bars, ours, tops):
        ax.annotate(f"{value:.2f}" if value < 10 else f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, value + err),
                    xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=10, fontweight="bold")
    if has_reference:
        ref_x = [x + shift for x, r in zip(xs, rows) if r.reference is not None]
        ref_y = [r.reference for r in rows if r.reference is not None]
        ref_bars = ax.bar(ref_x, ref_y, width, color="tab:gray", alpha=0.7, hatch="//",
                          label=f"reference run: {REFERENCE_MODEL}, 820 problems")
        for bar, value in zip(ref_bars, ref_y):
            ax.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 3),
                        textcoords="offset points", ha="center", va="bottom", fontsize=10)
        for x, r in zip(xs, rows):
            if r.reference is None:
                ax.annotate("not run", (x + shift, 0), xytext=(0, 3), textcoords="offset points", ha="center",
                            va="bottom", fontsize=9, color="dimgray")
    ax.set_xticks(xs)
    ax.set_xticklabels([r.label for r in rows], rotation=15 if len(rows) > 5 else 0)
    ax.set_ylabel(f"final mean@{k} accuracy (%)")
    ax.set_ylim(bottom=0)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------
# The entry point


def write_report(runs: Mapping[str, Sequence[str | Path]], out_dir: str | Path, *,
                 reference: Mapping[str, float | None] | None = None, title: str = "Equal-compute comparison",
                 notes: Sequence[str] = ()) -> Path:
    """Read the run folders (label -> one folder per seed), write OUT_DIR/report.md, curves.png,
    final.png, table.md (the notes, a short table and the headline, for a README) and summary.json;
    returns the report's path.

    reference: label -> the reference run's mean@16 in % (or None), shown beside ours; None: no column.
    notes: paragraphs placed under the title (how the runs were made)."""
    if not runs:
        raise UsageError("write_report needs at least one label with run folders")
    results = {label: [read_run(d) for d in dirs] for label, dirs in runs.items()}
    rows = summarize(results, reference)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k = int(next(r for rs in results.values() for r in rs).config.get("eval_k", 16))
    plots = [plot_final(rows, out / "final.png", title=f"{title}: final mean@{k}", k=k),
             plot_curves(results, out / "curves.png", title=f"{title}: mean@{k} against compute", k=k)]
    text = markdown(rows, results, title=title, notes=notes, plots=plots)
    path = out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    differences = paired_differences(results, rows)
    (out / "table.md").write_text("\n\n".join([*notes, "\n".join(compact_table(rows, k=k)),
                                                *(["\n".join(_paired_table(differences))] if differences else []),
                                                headline(rows, differences)]) + "\n")
    (out / "summary.json").write_text(json.dumps({"title": title, "rows": [r.to_dict() for r in rows],
                                                  "differences": differences,
                                                  "headline": headline(rows, differences)}, indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------
# One training run's report.md (written by the loops at the end of every run)


def write_run_report(run_dir: Path, cfg: TrainConfig, stop_reason: str, wall_s: float) -> str:
    """report.md from metrics.jsonl: the final evaluation, the learning curve as a table, compute."""
    records = read_metrics(run_dir)
    evals = [r for r in records if r.get("kind") == "eval"]
    trains = {r["step"]: r for r in records if r.get("kind") == "train"}
    k = cfg.eval_k
    lines = [f"# Training run: {cfg.method} on {cfg.env} with {cfg.model}", "",
             f"Stopped: {stop_reason}. Steps done: {max(trains, default=0)}. Wall time: {format_duration(wall_s)}.", ""]
    if evals:
        first, last = evals[0], evals[-1]
        lines += ["## Final evaluation (no search, sparse reward)", "",
                  f"mean@{k} at step {last['step']}: {100 * last['eval_accuracy']:.2f}% "
                  f"+- {100 * last['eval_stderr']:.2f} ({last['eval_problems']} test problems x {k} samples at "
                  f"T={cfg.eval_temperature}); at step {first['step']}: {100 * first['eval_accuracy']:.2f}% "
                  f"+- {100 * first['eval_stderr']:.2f}.", "",
                  "## Learning curve", "",
                  f"| step | generated tokens | total FLOPs | mean@{k} % | stderr | pass@{k} % | train reward |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in evals:
            reward = trains.get(r["step"], {}).get("reward_mean")
            lines.append(f"| {r['step']} | {r['rollout_generated_tokens']:,} | {r['total_flops']:.3g} | "
                         f"{100 * r['eval_accuracy']:.2f} | {100 * r['eval_stderr']:.2f} | "
                         f"{100 * r['eval_pass_at_k']:.1f} | {'' if reward is None else f'{reward:+.3f}'} |")
        lines.append("")
        probed = [r for r in evals if "value_mse" in r]
        if probed:
            lines += ["## Value head (value_probe.py)", "",
                      f"V(prefix) against the mean {cfg.reward} reward of {cfg.value_probe_k} policy completions "
                      f"(T={cfg.value_probe_temperature}) from step prefixes of test problems: a useful head has "
                      "Spearman > 0 and an MSE under the best constant's.", "",
                      "| step | prefixes | Spearman | MSE | best constant's MSE | mean target |",
                      "|---:|---:|---:|---:|---:|---:|"]
            for r in probed:
                rho = r.get("value_spearman")
                lines.append(f"| {r['step']} | {r['value_probe_prefixes']} | {'n/a' if rho is None else f'{rho:+.3f}'} | "
                             f"{r['value_mse']:.4f} | {r['value_mse_const']:.4f} | {r['value_probe_target_mean']:.3f} |")
            lines.append("")
    if trains:
        c = trains[max(trains)]
        lines += ["## Compute (cumulative)", "", "| quantity | rollout | learning |", "|---|---:|---:|",
                  f"| tokens | {c['rollout_generated_tokens']:,} generated, {c['rollout_prompt_tokens']:,} prefill, "
                  f"{c['rollout_cached_tokens']:,} from cache, {c['rollout_scored_tokens']:,} scored | "
                  f"{c['learn_train_tokens']:,} trained, {c['learn_inference_tokens']:,} no-grad |",
                  f"| forward calls | {c['rollout_forward_calls']:,} | {c['learn_forward_calls']:,} |",
                  f"| FLOPs (estimate) | {c['rollout_flops']:.3g} | {c['learn_flops']:.3g} |", ""]
    lines += ["## Config", "", "```yaml", to_yaml(cfg).rstrip(), "```", ""]
    text = "\n".join(lines)
    tmp = run_dir / "report.md.tmp"
    tmp.write_text(text)
    tmp.replace(run_dir / "report.md")
    return text
