"""Test-time compute: search vs best-of-N vs one sample, at equal budgets of GENERATED tokens.

- config.py  the sweep's settings (SweepConfig, budgets) and results (MethodResult, SweepReport)
- sweep.py   the methods and how each budget is spent (best-of-N streams, MCTS simulations fitted to it)
- output.py  the tables, testtime.md and testtime.png
"""

from treedistill.testtime.config import (
    MethodResult,
    SweepConfig,
    SweepReport,
    parse_budgets,
)
from treedistill.testtime.output import format_differences, format_table, plot_report, write_markdown
from treedistill.testtime.sweep import (
    MCTS_VARIANTS,
    SELECTORS,
    best_of_n_at,
    majority_vote,
    paired_differences,
    run_sweep,
    value_pick,
)

__all__ = ["MCTS_VARIANTS", "SELECTORS", "MethodResult", "SweepConfig", "SweepReport", "best_of_n_at",
           "format_differences", "format_table", "majority_vote", "paired_differences", "parse_budgets",
           "plot_report", "run_sweep", "value_pick", "write_markdown"]

