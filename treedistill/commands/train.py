"""`treedistill train`: online RL (MCTS distillation or a baseline) with compute budgets and exact resume."""

from __future__ import annotations

from pathlib import Path

HELP = "train a policy by online RL: mcts | mcts-tree | tree-fork | bon | grpo | cispo | ppo, with compute budgets and exact resume"


def add_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="a shipped preset, e.g. countdown-tiny-mcts (see treedistill/presets/)")
    source.add_argument("--config", help="a YAML config file (may `inherit:` a preset)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, dotted for nested ones (search.simulations=64); repeatable")
    parser.add_argument("--steps", type=int, default=None, help="training steps (overrides the config's steps)")
    parser.add_argument("--budget-generated-tokens", type=int, default=None,
                        help="stop once rollouts generated this many tokens (equal-compute comparisons)")
    parser.add_argument("--budget-flops", type=float, default=None,
                        help="stop once rollout + learning FLOPs (estimated) reach this")
    parser.add_argument("--run-dir", default=None,
                        help="run folder (default runs/<preset or config name>)")
    parser.add_argument("--resume", default="auto",
                        help="auto (continue from the run folder's newest checkpoint, else start; default), "
                             "never, or a checkpoint / run folder to continue from")
    parser.add_argument("--engine", default="native", help="generation backend: native (default) | hf | vllm (the treedistill[vllm] extra)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line last")
    ray = parser.add_argument_group("distributed (Ray; pip install 'treedistill[ray]')")
    ray.add_argument("--distributed", choices=["ray"], default=None,
                     help="generators as Ray actors, the learner in this process (or FSDP over --learner-gpus)")
    ray.add_argument("--generators", type=int, default=None, help="generator actors, each with a policy copy (2)")
    ray.add_argument("--learner-gpus", type=int, default=None,
                     help="0: this process learns (default); L >= 1 on a GPU cluster: L FSDP learner processes")
    ray.add_argument("--max-staleness", type=int, default=None,
                     help="weight versions a trajectory may lag the learner; older ones are dropped (1)")
    ray.add_argument("--sync-every", type=int, default=None, help="publish weights every this many steps (1)")
    ray.add_argument("--address", default=None,
                     help="Ray cluster to join (auto: the one `ray start` runs); default: start a local one")


def run(args) -> dict:
    from treedistill.config import load_config
    from treedistill.engine import BACKENDS, check_available
    from treedistill.errors import UsageError

    overrides = list(args.overrides)
    for flag, key in (("steps", "steps"), ("budget_generated_tokens", "budget_generated_tokens"),
                      ("budget_flops", "budget_flops")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(preset=args.preset, path=args.config, overrides=overrides)  # validates, before any compute
    if args.engine not in BACKENDS:
        raise UsageError(f"unknown --engine {args.engine!r}: choose one of {', '.join(BACKENDS)}")
    check_available(args.engine)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / (args.preset or Path(args.config).stem)
    layout = {name: getattr(args, name) for name in ("generators", "learner_gpus", "max_staleness", "sync_every",
                                                      "address") if getattr(args, name) is not None}
    if layout and args.distributed is None:
        raise UsageError(f"--{next(iter(layout)).replace('_', '-')} needs --distributed ray")

    settings = None
    if args.distributed == "ray":
        try:
            from treedistill.distributed import DistributedSettings
        except ImportError as e:
            raise UsageError(f"--distributed ray needs Ray: pip install 'treedistill[ray]' ({e})") from e
        settings = DistributedSettings(**layout)
        settings.check()  # before any compute
    from treedistill.train import train

    summary = train(cfg, run_dir, resume=args.resume, engine=args.engine, distributed=settings)
    k = summary["eval_k"]
    print(f"{cfg.method} on {cfg.env} with {cfg.model}: {summary['stop_reason']} "
          f"(step {summary['steps']}, {summary['wall_s'] / 60:.1f} min, {summary['skipped_updates']} skipped updates)")
    print(f"{'step':>6} {'generated tokens':>17} {'FLOPs':>9}  mean@{k} +- stderr")
    for point in summary["curve"]:
        print(f"{point['step']:>6} {point['generated_tokens']:>17,} {point['total_flops']:>9.3g}  "
              f"{100 * point['accuracy']:6.2f}% +- {100 * point['stderr']:.2f}")
    if args.distributed:
        print(f"{summary['distributed']['generators']} generators: {summary['problems_trained']} problems trained, "
              f"{summary['dropped_stale']} dropped as stale, {summary['requeued_problems']} requeued, "
              f"{summary['generator_restarts']} generator restarts")
    print(f"run folder: {run_dir} (report.md, metrics.jsonl, samples.jsonl, checkpoints/, "
          f"final/: the trained model)")
    return summary
