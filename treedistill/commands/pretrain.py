"""`treedistill pretrain`: train the embedded tiny model from scratch on Countdown traces."""

from __future__ import annotations

import os
import sys
import time

from treedistill.commands import check_choice, check_counts, check_non_negative

HELP = "train the embedded tiny Countdown model from scratch (random legal play + a solver share)"

# The shipped checkpoint (treedistill/models/tiny_countdown) is `treedistill pretrain --seed 0` with
# these defaults; pretrain.json inside it records every setting.


def default_threads() -> int:
    """Every core this process may run on: pretraining is one long job (--threads and
    OMP_NUM_THREADS still win). On this project's machine 1 and 2 threads gave byte-identical
    weights for `--seed 0` (README)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def add_arguments(parser) -> None:
    from treedistill.pretrain import PretrainConfig

    d = PretrainConfig()
    parser.add_argument("--seed", type=int, default=d.seed, help=f"seed of init, data and order (default {d.seed})")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"language-model steps (default {d.steps})")
    parser.add_argument("--batch", type=int, default=d.batch, help=f"traces per step (default {d.batch})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    parser.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                        help=f"final learning rate over the peak, reached by cosine decay (default {d.min_lr_ratio})")
    parser.add_argument("--ema", type=float, default=d.ema,
                        help="keep a moving average of the weights with this decay per step as the result "
                             f"(default {d.ema}; 0: the last step's weights)")
    parser.add_argument("--solver-share", type=float, default=d.solver_share,
                        help=f"share of solver traces that reach a generator target (default {d.solver_share})")
    parser.add_argument("--miss-share", type=float, default=d.miss_share,
                        help="share of random play aimed at a generator target it usually misses "
                             f"(default {d.miss_share})")
    parser.add_argument("--step-format", default=d.step_format,
                        help="numbers: a step writes the two numbers it combines; substitute: numbers, then "
                             "the last step's expression expanded one earlier result at a time before the "
                             f"answer (default {d.step_format})")
    parser.add_argument("--no-value-fit", action="store_true",
                        help="leave the value head untrained (seeded), as in the reference run")
    parser.add_argument("--value-steps", type=int, default=d.value_steps,
                        help=f"value-head fitting steps (default {d.value_steps})")
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop the language-model phase after this many minutes (default: no limit)")
    parser.add_argument("--device", default="cpu",
                        help="cpu | cuda: where training and the test evaluation run (default cpu, where "
                             "the shipped checkpoint was trained; float results differ by device)")
    parser.add_argument("--out", default="tiny_countdown", help="output folder (default ./tiny_countdown)")
    parser.add_argument("--eval-k", type=int, default=16,
                        help="after training, evaluate on the test split with k samples (0: skip; default 16)")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test problems only")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line last")


def check_arguments(args) -> None:
    from treedistill.envs.countdown import STEP_FORMATS
    from treedistill.errors import UsageError

    check_counts(args, ("steps", "batch", "value_steps", "eval_limit"))
    if not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if not 0 <= args.min_lr_ratio <= 1:
        raise UsageError(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    if not 0 <= args.ema < 1:
        raise UsageError(f"--ema must be in [0, 1), got {args.ema}")
    if not 0 <= args.solver_share <= 1:
        raise UsageError(f"--solver-share must be in [0, 1], got {args.solver_share}")
    if not 0 <= args.miss_share <= 1 - args.solver_share:
        raise UsageError(f"--miss-share must be in [0, 1 - solver share], got {args.miss_share}")
    if args.minutes is not None and not args.minutes > 0:
        raise UsageError(f"--minutes must be > 0, got {args.minutes}")
    check_non_negative(args, ("eval_k",))
    from treedistill.checkpoint import check_replaceable

    check_replaceable(args.out)  # before any training, not when saving
    check_choice(args, "step_format", STEP_FORMATS)
    check_choice(args, "device", ("cpu", "cuda"))
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: this machine has no CUDA device")


def _reporter(total: int):
    """Progress of the two phases: tqdm on a terminal, else a line on stderr every 100 steps."""
    state = {"bar": None, "phase": None}

    def report(phase: str, step: int, metrics: dict) -> None:
        if sys.stderr.isatty():
            from tqdm import tqdm

            if state["phase"] != phase:
                if state["bar"] is not None:
                    state["bar"].close()
                state["bar"] = tqdm(total=total if phase == "lm" else None, desc=phase, file=sys.stderr)
                state["phase"] = phase
            state["bar"].update(1)
            state["bar"].set_postfix({k: f"{v:.4f}" for k, v in metrics.items()})
        elif step % 100 == 0:
            print(f"{phase} step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
                  file=sys.stderr, flush=True)

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].close()

    return report, close


def run(args) -> dict:
    check_arguments(args)
    from treedistill.datasets import load_split
    from treedistill.engine import make_engine
    from treedistill.envs import get_env
    from treedistill.evaluate import evaluate
    from treedistill.models.load import load_policy
    from treedistill.pretrain import PretrainConfig, pretrain, save_model_folder

    cfg = PretrainConfig(seed=args.seed, steps=args.steps, batch=args.batch, lr=args.lr,
                         solver_share=args.solver_share, miss_share=args.miss_share, value_fit=not args.no_value_fit,
                         step_format=args.step_format, value_steps=args.value_steps, max_minutes=args.minutes,
                         min_lr_ratio=args.min_lr_ratio, ema=args.ema, device=args.device)
    test = load_split("countdown", "test")
    started = time.perf_counter()
    report, close = _reporter(cfg.steps)
    try:
        result = pretrain(cfg, exclude=test, progress=report)
    finally:
        close()
    train_seconds = time.perf_counter() - started
    info = {"train_seconds": round(train_seconds, 1)}
    save_model_folder(result, args.out, info)
    if args.eval_k > 0:
        problems = test[:args.eval_limit] if args.eval_limit else test
        policy = load_policy(args.out, device=args.device, value_head=False)
        ev = evaluate(make_engine(policy, "hf"), policy, get_env("countdown"), problems, k=args.eval_k,
                      temperature=0.2, max_new_tokens=512, seed=0)
        info["eval"] = {"split": "test", **ev.to_dict()}
        save_model_folder(result, args.out, info)
    summary = {**result.summary(), **info, "out": str(args.out)}
    print(f"pretrained {summary['parameters']:,} parameters in {train_seconds / 60:.1f} min: "
          f"{summary['steps_done']} steps, final loss {summary['final_loss']:.4f}"
          + (f", value loss {summary['final_value_loss']:.4f}" if summary["final_value_loss"] else ""))
    if "eval" in info:
        ev = info["eval"]
        print(f"test ({ev['problems']} problems x {ev['k']} at T=0.2): mean@{ev['k']} "
              f"{100 * ev['accuracy']:.2f}% +- {100 * ev['stderr']:.2f}, format {100 * ev['format_rate']:.1f}%, "
              f"pass@{ev['k']} {100 * ev['pass_at_k']:.1f}% ({ev['seconds']:.0f} s)")
    print(f"saved to {args.out}")
    return summary
