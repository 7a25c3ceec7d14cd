"""`treedistill value-model`: fit a value model for the test-time search on training problems (a copy of
the model fine-tuned with a fresh value head to the environment's solver label; value_model.py), report
its held-out AUC per depth, and write it as a model folder."""

from __future__ import annotations

from treedistill.commands import check_counts

HELP = ("fit a value model for the test-time search (the model fine-tuned to tell whether a step prefix can "
        "still reach the target) on training problems; writes a model folder")


def add_arguments(parser) -> None:
    from treedistill.value_model import ValueFitConfig

    d = ValueFitConfig()
    parser.add_argument("--model", default="tiny", help="the policy whose prefixes are valued (default tiny)")
    parser.add_argument("--env", default="countdown", help="environment with a solver (default countdown)")
    parser.add_argument("--out", required=True,
                        help="model folder to write (MODEL/value_model/ is where `eval --search mcts` finds it)")
    parser.add_argument("--problems", type=int, default=d.problems,
                        help=f"the first N training problems are fitted (default {d.problems})")
    parser.add_argument("--held-out", type=int, default=d.held_out,
                        help=f"the last N training problems measure the AUC (default {d.held_out})")
    parser.add_argument("--lines", type=int, default=d.lines, help=f"lines sampled per problem (default {d.lines})")
    parser.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs (default {d.epochs})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"seed (default {d.seed})")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line last")


def run(args) -> dict:
    import sys

    from treedistill.datasets import load_split
    from treedistill.engine import make_engine
    from treedistill.envs import get_env
    from treedistill.errors import UsageError
    from treedistill.models.load import load_policy
    from treedistill.value_model import ValueFitConfig, fit_value_model

    check_counts(args, ("problems", "held_out", "lines", "epochs"))
    if not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    cfg = ValueFitConfig(problems=args.problems, held_out=args.held_out, lines=args.lines, epochs=args.epochs,
                         lr=args.lr, seed=args.seed)
    env = get_env(args.env)
    if getattr(env, "reachable", None) is None:
        raise UsageError(f"a value model is fitted to the environment's solver; {args.env} has none")
    problems = load_split(args.env, "train")
    policy = load_policy(args.model, device=args.device, value_head=True)
    engine = make_engine(policy, "native")
    value_model, report = fit_value_model(policy, engine, env, problems, cfg,
                                          log=lambda line: print(line, file=sys.stderr, flush=True))
    meta = {"value_model": {"of": args.model, "env": args.env, "label": "reachable", **report}}
    value_model.save(args.out, meta=meta)
    print(f"value model of {args.model} on {args.env}: {report['prefixes']} prefixes of {cfg.problems} training "
          f"problems, {report['steps']} steps, {report['seconds']:.0f} s -> {args.out}")
    for depth, r in report["held_out"].items():
        if r["auc"] is None:  # no prefix that deep, or one class only
            print(f"  held-out AUC at depth {depth}: undefined ({r['prefixes']} prefixes of the last "
                  f"{cfg.held_out} training problems, not both reachable and unreachable ones)")
            continue
        print(f"  held-out AUC at depth {depth}: {r['auc']:.3f} ({r['prefixes']} prefixes of the last "
              f"{cfg.held_out} training problems, {r['reachable']:.1%} reachable)")
    return {"out": str(args.out), "model": args.model, "env": args.env, **report}
