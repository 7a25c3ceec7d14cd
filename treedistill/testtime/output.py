"""A test-time sweep's output: the markdown tables (accuracy, dense reward, tokens per answer), the
notes, DIR/testtime.md and the DIR/testtime.png plot. The JSON is `SweepReport.to_dict`."""

from __future__ import annotations

from collections.abc import Sequence

from treedistill.testtime.config import MethodResult, SweepReport
from treedistill.testtime.sweep import MCTS_VARIANTS

__all__ = ["format_differences", "format_table", "plot_report", "write_markdown"]


def _accuracy_text(c: MethodResult) -> str:
    if c.accuracy is None:
        return "skipped"
    return f"{100 * c.accuracy:5.1f} +- {100 * c.stderr:4.1f} ({c.tokens:.0f} tok)"


def _dense_text(c: MethodResult) -> str:
    return "skipped" if c.accuracy is None else f"{c.detail.get('dense', float('nan')):+.3f}"


def _answers_text(c: MethodResult) -> str:
    if c.accuracy is None or "tokens_per_answer" not in c.detail:
        return "skipped" if c.accuracy is None else ""
    per = c.detail["tokens_per_answer"]
    return (f"{per:.0f}" if per is not None else "-") + f" ({c.detail['distinct_answers']:.1f} distinct)"


# What a table cell shows: accuracy (+- stderr, tokens), the mean dense reward of the chosen answers,
# or the generated tokens per finished answer (distinct answers per problem).
CELL_TEXT = {"accuracy": _accuracy_text, "dense": _dense_text, "answers": _answers_text}


def format_table(report: SweepReport, metric: str = "accuracy") -> str:
    """Markdown table: method x budget, accuracy % +- stderr (mean generated tokens per problem), with
    metric="dense" the mean dense reward of the chosen answers, with metric="answers" the generated
    tokens per finished answer (distinct answers per problem)."""
    _cell_text = CELL_TEXT[metric]
    budgets = sorted(report.config.budgets)
    lines = ["| method | " + " | ".join(f"B={b}" for b in budgets) + " | at its own cost |",
             "|---|" + "---|" * (len(budgets) + 1)]
    for method in report.methods():
        cells = [c for c in report.cells if c.method == method]
        by_budget = {c.budget: c for c in cells}
        row = [_cell_text(by_budget[b]) if b in by_budget else "" for b in budgets]
        own = by_budget.get(None)
        lines.append(f"| {method} | " + " | ".join(row) + f" | {_cell_text(own) if own else ''} |")
    return "\n".join(lines)


def format_differences(report: SweepReport) -> str:
    """Markdown table: MCTS minus best-of-N at each budget, accuracy points, paired over problems with
    the 95% bootstrap interval."""
    lines = ["| budget | MCTS row | best-of-N row | difference, points [95% interval] | tokens (MCTS / best-of-N) |",
             "|---|---|---|---|---|"]
    for d in report.differences:
        lines.append(f"| {d['budget']} | {d['method']} | {d['against']} | {100 * d['difference']:+.1f} "
                     f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] | {d['tokens']:.0f} / {d['against_tokens']:.0f} |")
    return "\n".join(lines)


def _notes(report: SweepReport) -> list[str]:
    out = []
    for c in report.cells:
        if c.note:
            out.append(f"- {c.method} at B={c.budget}: {c.note}")
        if c.method in MCTS_VARIANTS and c.accuracy is not None:
            d = c.detail
            runs = ", ".join(f"{s} sims -> {t:.0f}" for s, t in d["runs"])
            out.append(f"- {c.method} at B={c.budget}: {d['simulations']} simulations (runs: {runs}), tokens "
                       f"per problem {d['tokens_min']}..{d['tokens_max']} (mean {c.tokens:.0f}), "
                       f"{100 * d['completed_by_policy']:.0f}% of paths completed by the policy, "
                       f"{d['tree_nodes_mean']:.0f} nodes per tree, wall {c.wall_s:.1f} s")
        if c.method == ("bon+verifier" if report.config.rows == "verifier" else "bon-majority"):
            d = c.detail
            out.append(f"- best-of-N at B={c.budget}: N = {d['n_min']}..{d['n_max']} samples "
                       f"(mean {d['n_mean']:.1f})")
    return out


def write_markdown(report: SweepReport, path, *, header: Sequence[str] = ()) -> None:
    """`DIR/testtime.md`: header lines, the table, the per-cell notes and the method."""
    from pathlib import Path

    cfg, s = report.config, report.config.search
    lines = ["# Test-time compute: search vs best-of-N at equal generated tokens", "", *header, "",
             f"{report.problems} problems; accuracy = sparse reward of the chosen answer, % +- standard error "
             "over problems; (tok) = mean generated tokens actually used per problem.", "",
             format_table(report), "",
             "Mean dense reward of the chosen answers (1 at the target, -0.9 invalid, -1 no answer):", "",
             format_table(report, "dense"), "",
             "Generated tokens per finished answer (a line that holds a legal answer: best-of-N's samples; MCTS's "
             "terminal nodes, rollouts and completion), and in brackets the distinct answer values per problem:",
             "",
             format_table(report, "answers"), "",
             "MCTS minus best-of-N at each budget, paired over the same problems (95% bootstrap interval, "
             "problems resampled jointly):", "", format_differences(report), "",
             "Notes:", *_notes(report), "",
             f"Settings: K={s.k_children} steps per node, T={s.temperature}, steps <= {s.step_max_tokens} tokens, "
             f"completions <= {cfg.max_new_tokens} tokens, {s.select} (c={s.c_puct}), W={s.parallel}, "
             f"virtual loss {s.virtual_loss}, "
             f"progressive widening " + (f"widen_c={s.widen_c:g}, widen_alpha={s.widen_alpha:g}" if s.widen_c > 0
                                         else "off") + ", "
             + {"free": f"mcts terminal values: {cfg.mcts_terminal}, ",
                "verifier": "mcts+verifier terminal values: the environment's dense reward, ",
                "both": f"mcts terminal values: {cfg.mcts_terminal} (mcts+verifier: the dense reward), "}[cfg.rows]
             + ("a leaf's steps sampled when a descent comes back to it, " if s.defer_expansion else "")
             + f"MCTS answer: {s.pick}, "
             + (f"rollout leaf values lambda={s.rollout_lambda:g}, " if s.rollout_lambda > 0 else "")
             + ("sibling steps merged by canonical form, " if s.merge == "canonical" else "")
             + (f"{s.subtrees} independent trees per problem, " if s.subtrees > 1 else "")
             + (f"repeated answers backed up {s.repeat_penalty:g} lower, " if s.repeat_penalty > 0 else "")
             + f"max depth {s.max_depth}, seed {cfg.seed}; sampling once: {cfg.once_samples} samples per "
             f"problem at each temperature. Total wall time {report.wall_s:.0f} s.", "",
             "Method: MCTS answers with its best valued terminal node (or its most-visited path with "
             "--pick visits); best-of-N samples until the budget is spent (the last sample cut at it). "
             + ("Without a checker, best-of-N picks by majority vote over legal answer values or by the "
                "value head at each sample's end and no selection sees the target (MCTS values terminal nodes "
                "with the value head too, and with 'legal' gives -1 to those without a legal answer, the "
                "legality filter best-of-N applies). " if cfg.rows != "verifier" else "")
             + "MCTS simulations are chosen from its measured token cost per "
             "simulation, so its budget holds on average, not per problem."
             + (" Rows marked +verifier DO use the environment's reward (the target): MCTS valuing "
                "terminal nodes by the dense reward, best-of-N keeping the best dense reward." if cfg.rows != "free"
                else ""),
             ""]
    Path(path).write_text("\n".join(lines), encoding="utf-8")


def plot_report(report: SweepReport, path) -> None:
    """`DIR/testtime.png`: accuracy against mean generated tokens per problem (log x), error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    markers = {"mcts": "o", "bon-majority": "s", "bon-value": "^", "mcts+verifier": "v", "bon+verifier": "P"}
    for method in report.methods():
        cells = [c for c in report.cells if c.method == method and c.accuracy is not None]
        if not cells:
            continue
        xs = [c.tokens for c in cells]
        ys = [100 * c.accuracy for c in cells]
        es = [100 * c.stderr for c in cells]
        if cells[0].budget is None:
            ax.errorbar(xs, ys, yerr=es, fmt="D", capsize=3, label=f"{method} (its own cost)")
        else:
            line = "--" if "+verifier" in method else "-"  # dashed: uses the ground truth
            ax.errorbar(xs, ys, yerr=es, fmt=f"{line}{markers.get(method, 'o')}", capsize=3, label=method)
    for b in report.config.budgets:
        ax.axvline(b, color="#ccc", lw=0.8, zorder=0)
    top = max([100 * (c.accuracy + c.stderr) for c in report.cells if c.accuracy is not None], default=0.0)
    ax.set_ylim(0, max(top * 1.1, 5.0))
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per problem (mean actually used; grey lines: budgets)")
    ax.set_ylabel("accuracy (% of problems solved)")
    ax.set_title(f"Test-time compute on {report.problems} problems (+- 1 standard error)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
