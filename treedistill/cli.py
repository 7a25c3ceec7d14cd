"""The `treedistill` console command.

Each subcommand lives in `treedistill/commands/<name>.py` and exposes `HELP` (one line),
`add_arguments(parser)` and `run(args) -> dict | None`. Command modules import torch and
transformers inside `run`, so `treedistill --help` stays fast.

Contract: a measuring subcommand accepts `--json`; when it is given, the dict that `run` returns is
printed as ONE JSON object on the LAST line of stdout (human-readable output and progress go first,
progress bars to stderr).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from treedistill.errors import UsageError

# name -> module. The CLI chooses from this plain dict; nothing else branches on command names.
COMMANDS = {
    "env": "treedistill.commands.env",
    "data": "treedistill.commands.data",
    "score": "treedistill.commands.score",
    "pretrain": "treedistill.commands.pretrain",
    "sft": "treedistill.commands.sft",
    "eval": "treedistill.commands.eval",
    "search": "treedistill.commands.search",
    "train": "treedistill.commands.train",
    "demo": "treedistill.commands.demo",
    "compare": "treedistill.commands.compare",
    "export": "treedistill.commands.export",
    "testtime": "treedistill.commands.testtime",
    "bench": "treedistill.commands.bench",
    "value-model": "treedistill.commands.value_model",
}


def _available_commands() -> dict:
    """Import the command modules that exist (later issues add more)."""
    found = {}
    for name, module_name in COMMANDS.items():
        try:
            found[name] = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
    return found


def set_threads(threads: int | None, default: int = 1) -> None:
    """Pick the torch CPU thread count before torch is imported (torch reads OMP_NUM_THREADS).

    `threads` (--threads) wins, then OMP_NUM_THREADS, then `default`: 1 for most commands, because on
    small CPUs torch's default (one thread per core) makes small models many times slower as soon as
    anything else runs; a command module may raise it with a `default_threads()` function (pretrain:
    every core, as one long job). Setting the variable instead of calling torch keeps commands that
    need no torch fast.
    """
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(max(1, threads))
    else:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, default)))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def build_parser(commands: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="treedistill",
        description="Tree search over reasoning steps, distilled into a language model by online RL.",
    )
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: OMP_NUM_THREADS, else 1; pretrain: every core)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module in commands.items():
        p = sub.add_parser(name, help=module.HELP.replace("%", "%%"), description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    commands = _available_commands()
    parser = build_parser(commands)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed: reports quote their command
    set_threads(args.threads, getattr(args._module, "default_threads", lambda: 1)())
    try:
        result = args._module.run(args)
    except UsageError as err:
        print(f"treedistill {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if getattr(args, "json", False) and result is not None:
        sys.stdout.flush()
        print(json.dumps(result, default=_json_default))
    return 0


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


if __name__ == "__main__":
    sys.exit(main())
