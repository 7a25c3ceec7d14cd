"""`treedistill testtime`: search vs best-of-N vs one sample at equal budgets of generated tokens."""

from __future__ import annotations

import sys

from treedistill.commands import (
    add_diversity_arguments,
    add_leaf_arguments,
    add_pick_argument,
    add_widening_arguments,
    check_choice,
    check_counts,
    screened_search,
    search_settings,
)
from treedistill.search.contracts import TEST_TIME_SEARCH

HELP = "test-time compute: MCTS vs best-of-N (majority vote, value head) vs one sample, per token budget"


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="tiny",
                        help="preset name, model folder or hub id (default: tiny, the embedded model)")
    parser.add_argument("--budgets", default="256,1024,4096,16384",
                        help="generated tokens per problem, comma-separated (default 256,1024,4096,16384)")
    parser.add_argument("--env", default="countdown", help="environment (default countdown)")
    parser.add_argument("--data", default=None, help="JSONL file of problems (default: the env's test split)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N problems")
    # the search's settings: TEST_TIME_SEARCH (search/contracts.py) where a flag is not given; the
    # simulations are fitted to each budget
    parser.add_argument("--k-children", type=int, default=None,
                        help=f"sampled steps per expanded node (default {TEST_TIME_SEARCH.k_children})")
    parser.add_argument("--temperature", type=float, default=None,
                        help=f"temperature of search steps and best-of-N samples (default {TEST_TIME_SEARCH.temperature:g})")
    parser.add_argument("--parallel", type=int, default=None,
                        help=f"search descents per round, W (default {TEST_TIME_SEARCH.parallel})")
    parser.add_argument("--select", default=None,
                        help=f"search selection rule: puct | uct | gumbel (default {TEST_TIME_SEARCH.select})")
    parser.add_argument("--c-puct", type=float, default=None,
                        help=f"search exploration constant c (default {TEST_TIME_SEARCH.c_puct:g})")
    add_widening_arguments(parser, TEST_TIME_SEARCH)
    parser.add_argument("--mcts-terminal", default=None, choices=["legal", "value"],
                        help="how the mcts row values terminal nodes without a verifier: legal (value head, -1 "
                             "without a legal answer; default) or value (value head only)")
    add_pick_argument(parser, TEST_TIME_SEARCH)
    add_leaf_arguments(parser, TEST_TIME_SEARCH)
    add_diversity_arguments(parser, TEST_TIME_SEARCH)
    parser.add_argument("--max-new-tokens", type=int, default=512, help="tokens per completion (default 512)")
    parser.add_argument("--rows", default=None, choices=["free", "verifier", "both"],
                        help="free: no row uses the environment's reward; verifier: only mcts+verifier and "
                             "bon+verifier, which do; both (default where the reward reads only the prompt, "
                             "as on Countdown; else free)")
    parser.add_argument("--once-samples", type=int, default=16,
                        help="samples per problem to estimate one sample's accuracy (default 16)")
    parser.add_argument("--engine", default="native", help="generation backend: native | hf | vllm (default native; vllm: the treedistill[vllm] extra)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--out", default="runs/testtime", help="folder for testtime.md and testtime.png")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line last")


def check_arguments(args):
    """Refuse bad values before anything is loaded; returns the parsed budgets."""
    from treedistill.engine import BACKENDS, check_available
    from treedistill.testtime import parse_budgets

    budgets = parse_budgets(args.budgets)
    check_counts(args, ("k_children", "parallel", "max_new_tokens", "once_samples", "limit", "subtrees"))
    search_settings(args, TEST_TIME_SEARCH)
    check_choice(args, "engine", BACKENDS)
    if args.engine:
        check_available(args.engine)
    return budgets


def _say(message: str) -> None:
    print(f"[testtime] {message}", file=sys.stderr, flush=True)


def run(args) -> dict:
    budgets = check_arguments(args)
    import datetime
    import os
    import platform
    import shlex
    from pathlib import Path

    from treedistill.datasets import load_split
    from treedistill.engine import make_engine
    from treedistill.envs import get_env
    from treedistill.envs.base import reward_from_prompt
    from treedistill.errors import UsageError
    from treedistill.models.load import load_policy
    from treedistill.testtime import (
        SweepConfig,
        format_differences,
        format_table,
        plot_report,
        run_sweep,
        write_markdown,
    )

    env = get_env(args.env)
    problems = load_split(args.env, "test", path=args.data)
    if args.limit is not None:
        problems = problems[:args.limit]
    if not problems:
        raise UsageError(f"no problems in {args.data or 'the test split'}")
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create --out {out_dir}: {err}") from None
    policy = load_policy(args.model, device=args.device, value_head=True)
    engine = make_engine(policy, args.engine)
    terminal = {} if args.mcts_terminal is None else {"mcts_terminal": args.mcts_terminal}
    search, value_engine, note = screened_search(args, search_settings(args, TEST_TIME_SEARCH), policy)
    if note:
        _say(note)
    cfg = SweepConfig(budgets=budgets, search=search,
                      max_new_tokens=args.max_new_tokens, once_samples=args.once_samples, seed=args.seed,
                      rows=args.rows or ("both" if reward_from_prompt(env) else "free"), **terminal)
    report = run_sweep(engine, policy, env, problems, cfg, progress=_say, value_engine=value_engine)

    import torch

    machine = (f"{platform.machine()} {platform.processor() or ''}".strip()
               + f", {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, device {policy.device}")
    header = [f"Date: {datetime.date.today().isoformat()}; machine: {machine}.",
              f"Model `{args.model}`, {args.env} {args.data or 'test split'}, {len(problems)} problems, "
              f"engine {args.engine}.",
              f"Command: `treedistill {shlex.join(args.argv)}`"]
    md_path, png_path = out_dir / "testtime.md", out_dir / "testtime.png"
    write_markdown(report, md_path, header=header)
    plot_report(report, png_path)

    print(f"test-time compute: model {args.model}, {len(problems)} problems, budgets {','.join(map(str, budgets))}")
    print(format_table(report))
    print("generated tokens per finished answer (distinct answers per problem):")
    print(format_table(report, "answers"))
    if report.differences:
        print("MCTS minus best-of-N, paired over problems (95% bootstrap interval):")
        print(format_differences(report))
    print(f"wall {report.wall_s:.0f} s; wrote {md_path} and {png_path}")
    return {"model": args.model, "env": args.env, "data": args.data, "machine": machine,
            "markdown": str(md_path), "plot": str(png_path), **report.to_dict()}
