"""Subcommands of the `treedistill` CLI; see `treedistill/cli.py` for the contract."""

from collections.abc import Iterable


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_at_least_one(args, names: Iterable[str]) -> None:
    """Refuse any of `args.<name>` below 1 (None: not given, accepted)."""
    from treedistill.errors import UsageError

    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"{_flag(name)} must be >= 1, got {value}")


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
