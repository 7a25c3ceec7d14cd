"""The plots of a comparison report: learning curves against compute, and the final mean@k per row."""

from __future__ import annotations

import statistics
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

from treedistill.report.runs import CurvePoint, RunResult
from treedistill.report.stats import bootstrap_interval
from treedistill.report.table import PRE_RL, REFERENCE_MODEL, Row

__all__ = ["plot_curves", "plot_final"]


def _curve_series(runs: Sequence[RunResult], start: CurvePoint | None = None,
                  ) -> tuple[list[tuple[list[float], list[float], list[float], list[float], list[float]]], int | None]:
    """([(tokens, flops, accuracy %, band low %, band high %)], problems). Where every seed has the same
    evaluations and each logged its per-problem results: one averaged series, every point on the same
    test problems (the first `problems` of the split, which every evaluation of these runs covers: a
    final evaluation on more problems is cut to them), banded by the table's two-level bootstrap over
    seeds and problems. Else one series per seed, banded by 1.96 evaluation standard errors (problems
    None). Bands are clipped to [0, 100]. `start`: a shared pre-RL point put first in every series."""
    import numpy as np

    curves = [((start,) if start is not None else ()) + r.curve for r in runs]
    if len({len(c) for c in curves}) == 1 and all(p.per_problem for c in curves for p in c):
        problems = min(len(p.per_problem) for c in curves for p in c)
        series = []
        for points in zip(*curves):
            _, low, high = bootstrap_interval(np.array([p.per_problem[:problems] for p in points]))
            series.append((statistics.fmean(p.generated_tokens for p in points),
                           statistics.fmean(p.total_flops for p in points),
                           100 * statistics.fmean(statistics.fmean(p.per_problem[:problems]) for p in points),
                           100 * max(0.0, low), 100 * min(1.0, high)))
        return [tuple(map(list, zip(*series)))], problems
    return [([p.generated_tokens for p in c], [p.total_flops for p in c], [100 * p.accuracy for p in c],
             [max(0.0, 100 * p.accuracy - 196 * p.stderr) for p in c],
             [min(100.0, 100 * p.accuracy + 196 * p.stderr) for p in c]) for c in curves], None


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
    start = results[PRE_RL][0].initial if PRE_RL in results else None
    counts = set()
    markers, dashes = "osD^vP*X", ("-", "--", "-.", ":")
    trained = [(label, runs) for label, runs in results.items() if label != PRE_RL]
    for i, (label, runs) in enumerate(trained):
        color = plt.get_cmap("tab10")(i % 10)
        series, problems = _curve_series(runs, start)
        counts.add(problems)
        for j, (tokens, flops, acc, low, high) in enumerate(series):
            for ax, x in zip(axes, (tokens, flops)):
                ax.plot(x, acc, color=color, marker=markers[i % len(markers)], markersize=6,
                        linestyle=dashes[i % len(dashes)], linewidth=2, label=label if j == 0 else None)
                ax.fill_between(x, low, high, color=color, alpha=0.12, linewidth=0)
    axes[0].set_xlabel("generated rollout tokens")
    axes[1].set_xlabel("rollout + learning FLOPs (estimate)")
    axes[0].set_ylabel(f"mean@{k} accuracy on the test problems (%)")
    for ax in axes:
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(True, alpha=0.3)
        ax.set_xlim(left=0)
    axes[0].legend(loc="best", frameon=True)
    band = ("95% bootstrap CI over seeds and problems; every point of a line on the same first "
            + (f"{counts.pop()} " if len(counts) == 1 else "") + "test problems" if None not in counts
            else "± 1.96 evaluation s.e. (per seed)")
    fig.suptitle(textwrap.fill(title, 100) + f"\n(first point: the model before RL; bands: {band})", fontsize=12)
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
    ax.set_title(textwrap.fill(title, max(40, int(12 * fig.get_figwidth()))), fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
