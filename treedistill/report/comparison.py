"""`write_report`: an equal-compute comparison's files from run folders (report.md, table.md, the
plots, summary.json)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from treedistill.errors import UsageError
from treedistill.report.markdown import budget_axis, compact_table, headline, markdown, paired_table
from treedistill.report.plots import plot_curves, plot_final
from treedistill.report.runs import read_run
from treedistill.report.table import paired_differences, summarize

__all__ = ["write_report"]


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
                                                *(["\n".join(paired_table(differences))] if differences else []),
                                                headline(rows, differences, equal=budget_axis(results))]) + "\n")
    (out / "summary.json").write_text(json.dumps({"title": title, "rows": [r.to_dict() for r in rows],
                                                  "differences": differences,
                                                  "headline": headline(rows, differences, equal=budget_axis(results))},
                                                 indent=1) + "\n")
    return path
