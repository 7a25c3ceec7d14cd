"""`treedistill eval`: mean@k accuracy of a model without search, with its standard error."""

from __future__ import annotations

import sys

HELP = "evaluate a model without search: mean@k accuracy (+- stderr), pass@k, format rate"


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="tiny",
                        help="preset name, model folder or hub id (default: tiny, the embedded model)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--split", help="named split of the environment, e.g. test")
    source.add_argument("--data", help="JSONL file of problems")
    parser.add_argument("--env", default="countdown", help="environment (default countdown)")
    parser.add_argument("--k", type=int, default=16, help="samples per problem (default 16)")
    parser.add_argument("--temperature", type=float, default=0.2, help="sampling temperature (default 0.2)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="tokens per sample at most (default 512)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems")
    parser.add_argument("--batch", type=int, default=256,
                        help="sequences per engine call (problems per call = batch // k; default 256)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--engine", default="hf", help="generation backend: hf | native (default hf)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line last")


def check_arguments(args) -> None:
    """Refuse bad values before anything is loaded."""
    from treedistill.engine import BACKENDS
    from treedistill.errors import UsageError

    if args.k < 1:
        raise UsageError(f"--k must be >= 1, got {args.k}")
    if not args.temperature >= 0:  # also refuses nan
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    if args.engine not in BACKENDS:
        raise UsageError(f"unknown --engine {args.engine!r}: choose one of {', '.join(BACKENDS)}")


def _progress_bar(total: int):
    """tqdm on stderr when it is a terminal, else nothing; returns (callback, close)."""
    if not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="problem", file=sys.stderr, dynamic_ncols=True)

    def update(done: int) -> None:
        bar.update(done - bar.n)

    return update, bar.close


def run(args) -> dict:
    check_arguments(args)
    from treedistill.datasets import load_split
    from treedistill.engine import make_engine
    from treedistill.envs import get_env
    from treedistill.evaluate import evaluate
    from treedistill.models.load import load_policy

    env = get_env(args.env)
    problems = load_split(args.env, args.split or "test", path=args.data)
    if args.limit is not None:
        problems = problems[:args.limit]
    if not problems:
        from treedistill.errors import UsageError

        raise UsageError(f"no problems to evaluate in {args.data or args.split}")
    policy = load_policy(args.model, device=args.device, value_head=False)
    engine = make_engine(policy, args.engine)
    update, close = _progress_bar(len(problems))
    try:
        result = evaluate(engine, policy, env, problems, k=args.k, temperature=args.temperature,
                          max_new_tokens=args.max_new_tokens, batch=args.batch, seed=args.seed,
                          progress=update)
    finally:
        close()
    out = {"model": args.model, "env": args.env, "split": args.split, "data": args.data,
           **result.to_dict()}
    print(f"model {args.model}  {args.env} {args.data or args.split}: {result.problems} problems x "
          f"{result.k} samples at T={result.temperature}")
    print(f"  mean@{result.k} accuracy  {100 * result.accuracy:6.2f}% +- {100 * result.stderr:.2f}")
    print(f"  pass@{result.k}           {100 * result.pass_at_k:6.2f}%")
    print(f"  format rate        {100 * result.format_rate:6.2f}%")
    print(f"  mean dense reward  {result.mean_dense:+.3f}")
    print(f"  generated tokens   {result.generated_tokens} ({out['tokens_per_sample']:.1f} per sample, "
          f"{result.truncated} truncated)")
    print(f"  wall seconds       {result.seconds:.1f}")
    return out
