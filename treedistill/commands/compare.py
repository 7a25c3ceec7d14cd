"""`treedistill compare`: presets x seeds trained to the same budget (generated tokens or FLOPs), with 95% CIs."""

from __future__ import annotations

import sys

HELP = ("train presets x seeds to the same budget (generated tokens or FLOPs) and report them with 95% confidence "
        "intervals")


def add_arguments(parser) -> None:
    parser.add_argument("--presets", required=True,
                        help="comma-separated presets, e.g. countdown-tiny-mcts,countdown-tiny-grpo "
                             "(ablations: ablation-select-uct, ablation-parallel-1, ablation-sims-64, ...)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per preset: 0 .. N-1 (default 3, at most 1,000)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-generated-tokens", type=int,
                        help="every run stops at the first step that reaches this many generated rollout tokens")
    budget.add_argument("--budget-flops", type=float,
                        help="every run stops at the first step that reaches this many rollout + learning FLOPs")
    parser.add_argument("--out", default="runs/compare", help="output folder (default runs/compare); "
                        "runs go to OUT/<preset>/seed-<s>, finished ones are reused")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting in every run (dotted for nested ones); repeatable")
    parser.add_argument("--evaluations", type=int, default=3,
                        help="evaluations along the budget, at budget*i/N (default 3; plus the one before RL)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs at once, one torch thread each (default: min(2, CPU count))")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line last")


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(args) -> dict:
    from treedistill.compare import MAX_SEEDS, run_comparison
    from treedistill.errors import UsageError, shown

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    if not presets:
        raise UsageError("--presets needs at least one preset name")
    if not 1 <= args.seeds <= MAX_SEEDS:
        raise UsageError(f"--seeds must be in 1..{MAX_SEEDS:,} (got {shown(args.seeds)})")
    axis = "tokens" if args.budget_generated_tokens is not None else "flops"
    budget = args.budget_generated_tokens if axis == "tokens" else args.budget_flops
    if not (budget is not None and budget >= 1 and budget < float("inf")):
        raise UsageError(f"--budget-{'generated-tokens' if axis == 'tokens' else 'flops'} must be a number >= 1 "
                         f"(got {shown(budget)})")
    summary = run_comparison({p: p for p in presets}, seeds=range(args.seeds), budget=budget, axis=axis,
                             out_dir=args.out, overrides=args.overrides, evaluations=args.evaluations,
                             jobs=args.jobs, log=_log,
                             title=f"Equal-compute comparison: {', '.join(presets)}",
                             notes=[f"Command: `treedistill compare --presets {','.join(presets)} --seeds {args.seeds} "
                                    + (f"--budget-generated-tokens {budget}" if axis == "tokens" else
                                       f"--budget-flops {budget:g}")
                                    + "".join(f" --set {o}" for o in args.overrides) + "`."])
    print(summary["table"])
    print()
    print(summary["headline"].replace("**", ""))
    print(f"report: {summary['report']}")
    return {k: v for k, v in summary.items() if k != "table"}
