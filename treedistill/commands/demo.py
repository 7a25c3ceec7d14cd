"""`treedistill demo` (what `make demo` runs): MCTS distillation (from the extracted path, and from the
whole searched tree) against best-of-N, CISPO and GRPO at the same budget of generated tokens, on the
embedded tiny model, in minutes on 2 CPU cores.

Every method starts from the same tiny model, trains to the same generated-token budget with the
same update structure (four minibatch updates per rollout batch) and a warm-up that is the same
share of the budget, and is evaluated the same way (mean@16, sparse reward, no search, temperature
0.2) on the same fixed subset of the held-out test split: its first EVAL_PROBLEMS problems. The model
before RL is evaluated once and shared. The subset, not all 820, is what lets the evaluations fit the
time limit; the intervals say what it costs. Nothing is tuned toward a winner: the methods run their
shipped presets.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys

from treedistill.errors import UsageError

HELP = ("the demo: MCTS distillation (path and whole tree) vs best-of-N, CISPO and GRPO at equal generated tokens "
        "(tiny model, CPU)")

# Report rows in the reference's order; label -> preset.
DEMO_PRESETS = {
    "best-of-N": "countdown-tiny-bon",
    "CISPO": "countdown-tiny-cispo",
    "GRPO": "countdown-tiny-grpo",
    "MCTS distillation": "countdown-tiny-mcts",
    "MCTS whole tree": "countdown-tiny-mcts-tree",
}
# Time model of the demo on 2 CPU cores, 2 jobs: wall = FIXED_S + SECONDS_PER_TOKEN x budget, fitted on
# shared cores and kept as a margin over the idle machine's measured time (docs/log.md, "the demo's time
# model").
DEFAULT_MINUTES = 15.0
FIXED_S = 320.0
SECONDS_PER_TOKEN = 1.24e-3
MARGIN = 0.75                 # plan for 75% of the time limit
EVAL_PROBLEMS = 200           # the first 200 problems of the test split, for every method
EVALUATIONS = 2               # evaluation points along the budget (plus the one before RL)
# Start the methods that cost the most time per generated token first, so 2 parallel jobs end together
# (measured per generated token: mcts-tree > CISPO, GRPO > best-of-N, mcts).
RUN_FIRST = ("MCTS whole tree", "GRPO", "CISPO", "MCTS distillation", "best-of-N")


def add_arguments(parser) -> None:
    parser.add_argument("--run-dir", default="runs/demo", help="output folder (default runs/demo); "
                        "re-running with the same folder reuses finished runs")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-generated-tokens", type=int, default=None,
                        help=f"generated rollout tokens per method (default {DEFAULT_BUDGET:,}, sized for "
                             f"{DEFAULT_MINUTES:.0f} minutes on 2 CPU cores)")
    budget.add_argument("--minutes", type=float, default=None,
                        help="size the budget for about this many minutes on 2 CPU cores instead "
                             f"(the default budget is sized for {DEFAULT_MINUTES:.0f})")
    parser.add_argument("--jobs", type=int, default=None,
                        help="methods trained at once, one torch thread each (default: min(2, CPU count))")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line last")


def budget_for(minutes: float) -> int:
    """The generated-token budget (a multiple of 10,000) that the time model fits into MARGIN of
    `minutes`."""
    usable = MARGIN * minutes * 60.0 - FIXED_S
    if usable < 10_000 * SECONDS_PER_TOKEN:
        raise UsageError(f"--minutes {minutes:g} is too short: the demo's fixed cost (start-up and "
                         f"evaluations) alone is about {FIXED_S / 60:.1f} minutes at {MARGIN:.0%} of the limit")
    return int(usable / SECONDS_PER_TOKEN) // 10_000 * 10_000


DEFAULT_BUDGET = budget_for(DEFAULT_MINUTES)


def _log(line: str) -> None:
    print(f"demo: {line}", file=sys.stderr, flush=True)


def run(args) -> dict:
    from treedistill.compare import run_comparison
    from treedistill.report import REFERENCE

    if args.budget_generated_tokens is not None:
        budget = args.budget_generated_tokens
        if budget < 1:
            raise UsageError(f"--budget-generated-tokens must be >= 1 (got {budget})")
    else:
        budget = budget_for(args.minutes if args.minutes is not None else DEFAULT_MINUTES)
    today = datetime.date.today().isoformat()
    notes = [
        f"Made by `treedistill demo --budget-generated-tokens {budget}` on {today}, {_machine()}, "
        f"{_cores()} CPU cores usable. Each method trains from the same embedded tiny model to the same budget of "
        f"{budget:,} generated rollout tokens (the fairness knob) with its shipped preset (learning rates chosen on training problems, docs/log.md); "
        f"evaluated when it passes each of {EVALUATIONS} equally spaced budget points (never cutting a step for "
        f"one) on the first {EVAL_PROBLEMS} problems of the held-out test split (the same subset for every "
        "method); the model before RL evaluated once, on the same problems, and shared.",
    ]
    _log(f"{len(DEMO_PRESETS)} methods x {budget:,} generated tokens each, evaluations on {EVAL_PROBLEMS} test "
         f"problems x 16 samples, output in {args.run_dir}")
    summary = run_comparison(DEMO_PRESETS, seeds=[0], budget=budget, out_dir=args.run_dir,
                             overrides=[f"eval_problems={EVAL_PROBLEMS}"], evaluations=EVALUATIONS,
                             jobs=args.jobs, log=_log, reference=REFERENCE, notes=notes, run_first=RUN_FIRST,
                             title="MCTS distillation (path, whole tree) vs best-of-N, CISPO and GRPO at equal "
                                   "generated tokens")
    print(summary["table"])
    print()
    print(summary["headline"].replace("**", ""))
    print(f"report: {summary['report']} (plots: final.png, curves.png); wall {summary['wall_s'] / 60:.1f} min, "
          f"CPU {summary['cpu_s'] / 60:.1f} min")
    return {k: v for k, v in summary.items() if k != "table"}


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _machine() -> str:
    """The CPU's model name where the OS tells it (Linux), else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() or "unknown CPU"
