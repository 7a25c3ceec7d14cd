"""The text of a comparison report: the headline, tables (markdown and plain), report.md's body."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from treedistill.metrics import format_duration
from treedistill.report.runs import RunResult
from treedistill.report.stats import verdict, z_score
from treedistill.report.table import PRE_RL, REFERENCE_MODEL, Row, comparability_problems, paired_differences

__all__ = ["budget_axis", "compact_table", "headline", "markdown", "paired_table", "table_text"]


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


def headline(rows: Sequence[Row], differences: Sequence[dict] = (), *, equal: str = "generated tokens") -> str:
    """Which trained row scored highest, by how much over the runner-up: with the paired 95% interval
    of the difference where `differences` (paired_differences) has it, else in combined standard
    errors. equal: what the runs were matched on (`budget_axis`)."""
    trained = sorted((r for r in rows if r.label != PRE_RL), key=lambda r: r.mean, reverse=True)
    if not trained:
        return "No trained runs to compare."
    best = trained[0]
    if len(trained) == 1:
        return f"Only one trained method ({best.label}): {_pct(best.mean)}% mean@k."
    second = trained[1]
    if best.mean == second.mean:
        return (f"No method scored highest: {best.label} and {second.label} tie at {_pct(best.mean)}% "
                f"at equal {equal}.")
    paired = next((d for d in differences if d["label"] == second.label and d["versus"] == best.label), None)
    if paired is not None:
        lo, hi = -100 * paired["ci_high"], -100 * paired["ci_low"]
        return (f"**{best.label}** scored highest at equal {equal}: {_pct(best.mean)}% against "
                f"{_pct(second.mean)}% for the runner-up {second.label}, a difference of "
                f"{100 * (best.mean - second.mean):.2f} points, paired 95% CI [{lo:.2f}, {hi:.2f}] over seeds and "
                f"problems: " + ("significant (the interval excludes 0)." if paired["significant"] else
                                 "not significant (the interval includes 0): neither can be called better."))
    z = z_score(best.mean, best.se, second.mean, second.se)
    unit = "seed-level standard errors" if best.ci95 is not None else "combined standard errors (evaluation only)"
    return (f"**{best.label}** scored highest at equal {equal}: {_pct(best.mean)}% against "
            f"{_pct(second.mean)}% for the runner-up {second.label}, a difference of "
            f"{100 * (best.mean - second.mean):.2f} points = {z:.2f} {unit}: {verdict(z)}.")


def budget_axis(results: Mapping[str, Sequence[RunResult]]) -> str:
    """What a comparison's runs were matched on: "FLOPs" when every run had a FLOP budget, else
    "generated tokens"."""
    configs = [r.config for label, runs in results.items() if label != PRE_RL for r in runs]
    return "FLOPs" if configs and all(c.get("budget_flops") is not None for c in configs) else "generated tokens"


def paired_table(differences: Sequence[dict]) -> list[str]:
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
            + "generated tokens | rollout FLOPs | learning FLOPs | rollout + learning FLOPs | "
              "FLOPs per generated token (rollout / learning) | steps | train time | wall time |" + (f" reference mean@16 % ({REFERENCE_MODEL}) |" if reference else ""))
    lines = [head, "|---" + "|---:" * (head.count("|") - 2) + "|"]
    for r in rows:
        spread = _interval(r) or (f"± {_pct(r.ci95)}" if r.ci95 is not None else f"± {_pct(r.se)}")
        seeds = (" / ".join(_pct(x) for x in r.finals) + " | ") if several else ""
        ref = (" " + ("-" if r.reference is None else f"{r.reference:.1f}") + " |") if reference else ""
        per_token = (f"{r.rollout_flops / r.generated_tokens:.3g} / {r.learn_flops / r.generated_tokens:.3g}"
                     if r.generated_tokens else "-")
        compute = ("0 | - | - | - | - | 0 | - | - |" if r.label == PRE_RL else
                   f"{_count(r.generated_tokens)} | {r.rollout_flops:.3g} | {r.learn_flops:.3g} | "
                   f"{r.total_flops:.3g} | {per_token} | {r.steps:.0f} | {format_duration(r.train_s)} | "
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
    budgets = {(r.config.get("budget_generated_tokens"), r.config.get("budget_flops"))
               for rs in results.values() for r in rs}
    if len(budgets) == 1 and budgets != {(None, None)}:
        tokens, flops = budgets.pop()
        if tokens is not None:
            notes.append(f"Every run had the same budget of {int(tokens):,} generated rollout tokens; the step that "
                         "reaches it takes only the problems it has room for, so a run ends within about one "
                         "problem's tokens past it.")
        else:
            notes.append(f"Every run had the same budget of {float(flops):.3g} rollout + learning FLOPs: each ended "
                         "at the first step that reached it (a step is not cut for a FLOP budget).")
    elif budgets:
        notes.append("The runs had different budgets ("
                     + ", ".join("none" if t is None and f is None else f"{int(t):,} tokens" if t is not None
                                 else f"{float(f):.3g} FLOPs" for t, f in sorted(budgets, key=str))
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
    lines += ["## Result", "", headline(rows, differences, equal=budget_axis(results)), ""]
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
                  *paired_table(differences), ""]
    else:
        lines += ["## Differences", "", "In combined standard errors, z = (a - b) / sqrt(se_a^2 + se_b^2) "
                  "(unpaired; |z| >= 2 is roughly a 95% difference).", "", *_differences(rows), ""]
    lines += ["## Compute", "", *[f"- {n}" for n in _compute_notes(rows, results)], ""]
    lines += _learned_table(results)
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


def _learned_table(results: Mapping[str, Sequence[RunResult]]) -> list[str]:
    """What each method's rollouts learn (means over seeds); [] when no run logged it."""
    out = []
    for label, runs in results.items():
        shares = [r.learned_token_share for r in runs if r.learned_token_share is not None]
        lines = [r.lines_per_1k_tokens for r in runs if r.lines_per_1k_tokens is not None]
        if shares:
            out.append(f"| {label} | {statistics.fmean(shares):.3f} | "
                       f"{f'{statistics.fmean(lines):.1f}' if lines else '-'} |")
    if not out:
        return []
    return ["## What the rollouts learn", "", "Learned-token share: generated rollout tokens that end in a learned "
            "row, per generated token (GRPO's is 1; best-of-N's 1/N). Finished lines per 1,000 generated tokens: "
            "a tree method's lines (its search's terminal nodes and rollouts, and the completion of its path). "
            "Means over seeds, each step weighted by its generated tokens.", "",
            "| method | learned-token share | finished lines per 1,000 tokens |", "|---|---:|---:|", *out, ""]


def _value_table(results: Mapping[str, Sequence[RunResult]]) -> list[str]:
    """The value heads at the final evaluation (value_probe.py), means over seeds; [] when no run has one."""
    out = []
    for label, runs in results.items():
        probed = [r.final_value for r in runs if "value_mse" in r.final_value]
        if not probed:
            continue
        rhos = [v["value_spearman"] for v in probed if v.get("value_spearman") is not None]
        rho = f"{statistics.fmean(rhos):+.3f}" if rhos else "n/a"
        aucs = [v["value_auc_reachable"] for v in probed if v.get("value_auc_reachable") is not None]
        auc = f"{statistics.fmean(aucs):.3f}" if aucs else "n/a"
        out.append(f"| {label} | {len(probed)} | {rho} | {statistics.fmean(v['value_mse'] for v in probed):.4f} | "
                   f"{statistics.fmean(v['value_mse_const'] for v in probed):.4f} | {auc} |")
    if not out:
        return []
    return ["## Value head", "", "At the final evaluation: V(prefix) against the mean reward of policy completions "
            "from step prefixes of test problems (value_probe.py); a useful head has Spearman > 0 and an MSE under "
            "the best constant's. AUC: V against the environment's exact \"the answer is still reachable\" label "
            "(Countdown's solver; 0.5 = chance; n/a where the environment has none). Means over seeds.", "",
            "| method | seeds | Spearman | MSE | best constant's MSE | AUC (reachable) |", "|---|---:|---:|---:|---:|---:|",
            *out, ""]
