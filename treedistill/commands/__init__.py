"""Subcommands of the `treedistill` CLI; see `treedistill/cli.py` for the contract."""

from collections.abc import Iterable


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_counts(args, names: Iterable[str]) -> None:
    """Refuse any of `args.<name>` below 1 or above its bound, as the config bounds its sizes
    (`config.LIMITS`): MAX_TOKENS for a number of tokens (`*_tokens`), else MAX_COUNT (None: not
    given, accepted)."""
    from treedistill.config import MAX_COUNT, MAX_TOKENS
    from treedistill.errors import UsageError, shown

    for name in names:
        value = getattr(args, name)
        bound = MAX_TOKENS if name.endswith("_tokens") else MAX_COUNT
        if value is not None and value < 1:
            raise UsageError(f"{_flag(name)} must be >= 1, got {shown(value)}")
        if value is not None and value > bound:
            raise UsageError(f"{_flag(name)} must be at most {bound:,}, got {shown(value)}")


def check_non_negative(args, names: Iterable[str]) -> None:
    """Refuse any of `args.<name>` below 0 or NaN (None: not given, accepted)."""
    from treedistill.errors import UsageError

    for name in names:
        value = getattr(args, name)
        if value is not None and not value >= 0:
            raise UsageError(f"{_flag(name)} must be >= 0, got {value}")


def check_choice(args, name: str, choices: Iterable[str]) -> None:
    """Refuse `args.<name>` outside `choices`, listing them (None: not given, accepted)."""
    from treedistill.errors import UsageError

    value, choices = getattr(args, name), list(choices)
    if value is not None and value not in choices:
        raise UsageError(f"unknown {_flag(name)} {value!r}: choose one of {', '.join(choices)}")


def add_pick_argument(parser, default: str | None = "best") -> None:
    """`--pick best|visits`: which path a test-time search answers with (SearchSettings.pick)."""
    parser.add_argument("--pick", default=default, choices=["best", "visits"],
                        help="the answer: best (the terminal node of highest value, as best-of-N picks; default) "
                             "or visits (the most-visited path, the training target)")


def add_leaf_arguments(parser, *, defaults: bool = True, rollout_lambda: float = 0.0) -> None:
    """`--rollout-lambda` and `--merge` (SearchSettings.rollout_lambda / merge); with defaults=False
    they default to None (the caller's settings decide)."""
    parser.add_argument("--rollout-lambda", type=float, default=rollout_lambda if defaults else None,
                        help="leaf value (1 - lambda) * value head + lambda * z, z the checked outcome of ONE "
                             "policy rollout from the leaf, whose finished line is also an answer candidate "
                             + (f"(0: the value head only, no rollout; 1: rollouts only; default {rollout_lambda:g})"
                                if defaults else
                                "(0: the value head only, no rollout; 1: rollouts only; default: the command's search "
                                "settings)"))
    parser.add_argument("--merge", default="tokens" if defaults else None, choices=["tokens", "canonical"],
                        help="sibling steps merged when their tokens are identical (tokens, default) or their "
                             "canonical form is (canonical: the environment's canonical_step, e.g. 4*5=20 == 5*4=20)")


def check_leaf_arguments(args) -> None:
    """Refuse --rollout-lambda outside [0, 1] (None: not given, accepted)."""
    from treedistill.errors import UsageError

    value = args.rollout_lambda
    if value is not None and not 0 <= value <= 1:
        raise UsageError(f"--rollout-lambda must be in [0, 1], got {value}")


def search_settings(args, **fields):
    """The SearchSettings of the flags named after its fields (`--c-puct` -> c_puct, ...) that `args`
    holds; `fields` set the others (or replace a flag's value, e.g. eval's --search-temperature)."""
    from dataclasses import fields as dataclass_fields

    from treedistill.search import SearchSettings

    flags = {f.name: getattr(args, f.name) for f in dataclass_fields(SearchSettings) if hasattr(args, f.name)}
    return SearchSettings(**{**flags, **fields})


def add_tree_arguments(parser, *, simulations: int, c_puct: float = 0.5) -> None:
    """The search tree's budget and selection: --simulations, --parallel, --select, --c-puct, --max-depth."""
    parser.add_argument("--simulations", type=int, default=simulations,
                        help=f"simulations per problem (default {simulations})")
    parser.add_argument("--parallel", type=int, default=8, help="descents per round, W (default 8)")
    parser.add_argument("--select", default="puct", help="selection rule: puct | uct | gumbel (default puct)")
    parser.add_argument("--c-puct", type=float, default=c_puct, help=f"exploration constant (default {c_puct:g})")
    parser.add_argument("--max-depth", type=int, default=16, help="steps from the root at most (default 16)")
