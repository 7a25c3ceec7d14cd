"""`treedistill data`: generate Countdown splits, or check the overlap of two problem files."""

from __future__ import annotations

import time

HELP = "generate Countdown train/test splits, or check the overlap of two problem files"

_STATS = ("count", "min", "median", "mean", "max", "share_le_100")


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True
    gen = sub.add_parser("countdown", help="write DIR/train.jsonl and DIR/test.jsonl, disjoint splits")
    gen.add_argument("--train", type=int, default=20_000, help="training problems (default 20000, at most 10,000,000)")
    gen.add_argument("--test", type=int, default=820, help="test problems (default 820, at most 20,000)")
    gen.add_argument("--seed", type=int, default=42, help="random seed (default 42; 0 to 2**32 - 1)")
    gen.add_argument("--out", required=True, help="output folder")
    gen.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    gen.set_defaults(_action=_countdown)
    check = sub.add_parser("check", help="report the overlap of two Countdown problem files")
    check.add_argument("--train", required=True, help="JSONL file (ours or the reference's format)")
    check.add_argument("--test", required=True, help="JSONL file checked against --train")
    check.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    check.set_defaults(_action=_check)


def run(args) -> dict:
    return args._action(args)


def _print_stats(splits: dict) -> None:
    print(f"{'split':6s} " + " ".join(f"{name:>12s}" for name in _STATS))
    for split, stats in splits.items():
        print(f"{split:6s} " + " ".join(f"{'-' if stats[name] is None else str(stats[name]):>12s}" for name in _STATS))


def _countdown(args) -> dict:
    from treedistill.config import MAX_COUNT, MAX_SEED
    from treedistill.envs.countdown import MAX_TEST, generate_problems, overlap, target_stats, write_problems
    from treedistill.errors import UsageError
    from treedistill.jsonl import writable_folder

    if not (0 <= args.train <= MAX_COUNT and 0 <= args.test <= MAX_TEST):
        raise UsageError(f"--train must be in 0..{MAX_COUNT:,} and --test in 0..{MAX_TEST:,} "
                         f"(got {args.train:,} and {args.test:,})")
    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must be in 0..2**32 - 1 (got {args.seed})")
    out = writable_folder(args.out)  # before the generation, which takes a while
    start = time.perf_counter()
    try:
        train, test = generate_problems(args.train, args.test, args.seed)
    except ValueError as err:
        raise UsageError(str(err)) from None
    seconds = time.perf_counter() - start
    try:
        write_problems(out / "train.jsonl", train)
        write_problems(out / "test.jsonl", test)
    except OSError as err:
        raise UsageError(f"cannot write to {out}: {err.strerror or err}") from None
    result = {
        "train": target_stats(train),
        "test": target_stats(test),
        "overlap": overlap(train, test),
        "seconds": round(seconds, 2),
        "out": str(out),
        "seed": args.seed,
    }
    _print_stats({"train": result["train"], "test": result["test"]})
    print(f"overlap (test problems also in train): {result['overlap']}")
    print(f"generated in {result['seconds']} s; wrote {out / 'train.jsonl'} and {out / 'test.jsonl'}")
    return result


def _check(args) -> dict:
    from treedistill.envs.countdown import key, load_problems, overlap, target_stats

    train = load_problems(args.train)
    test = load_problems(args.test)
    result = {
        "train": target_stats(train),
        "test": target_stats(test),
        "overlap": overlap(train, test),
        "test_unique": len({key(p) for p in test}),
    }
    _print_stats({"train": result["train"], "test": result["test"]})
    print(f"overlap (test problems also in train): {result['overlap']} of {len(test)}")
    print(f"distinct test problems: {result['test_unique']}")
    return result
