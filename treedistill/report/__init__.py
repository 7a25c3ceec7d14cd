"""Equal-compute comparison reports from run folders: a table, the learning curves, markdown, PNGs.

Input: run folders written by `treedistill train` (config.yaml + metrics.jsonl), grouped by label
(one folder per seed). Nothing here trains or loads a model; any finished or running run folder can
be reported on (`write_report`). A single training run's own RUN/report.md, its final evaluation and
learning curve, is `write_run_report`. No torch import.

What is compared. Each run's FINAL evaluation (its last "eval" line: mean@k, sparse reward, no
search) against the compute it used: generated rollout tokens (the fairness knob of an equal-compute
comparison), rollout + learning FLOPs (metrics.ComputeCounters' estimate) and the seconds spent in
rollouts and updates (evaluation excluded). The "pre-RL" row is the model before RL: a shared
evaluation, or else the step-0 evaluations the runs start with (one value per seed).

The modules, in the order data flows:
- runs.py        reading run folders (curve, compute, final evaluation)
- stats.py       Student t, confidence intervals, z-scores, the two-level bootstrap
- table.py       the final table's rows, paired differences, comparability checks, reference numbers
- markdown.py    the headline and the tables as text, report.md's body
- plots.py       curves.png and final.png
- comparison.py  write_report: every file of a comparison
- run_report.py  write_run_report: one training run's report.md
"""

from treedistill.report.comparison import write_report
from treedistill.report.markdown import compact_table, headline, markdown, table_text
from treedistill.report.plots import plot_curves, plot_final
from treedistill.report.run_report import write_run_report
from treedistill.report.runs import CurvePoint, RunResult, read_records, read_run
from treedistill.report.stats import (
    bootstrap_interval,
    confidence_interval,
    t_cdf,
    t_quantile,
    verdict,
    z_score,
)
from treedistill.report.table import (
    PRE_RL,
    REFERENCE,
    REFERENCE_MODEL,
    Row,
    comparability_problems,
    paired_differences,
    summarize,
)

__all__ = [
    "PRE_RL",
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
