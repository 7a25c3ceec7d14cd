import json
import subprocess
import sys


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "treedistill", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_subcommands():
    out = run_cli("--help")
    assert out.returncode == 0, out.stderr
    assert "env" in out.stdout


def test_env_json_last_line():
    out = run_cli("env", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["device"] in {"cpu", "cuda"}
    assert info["threads"] >= 1
    assert info["torch"] and info["transformers"]


def test_every_subcommand_has_working_help():
    import pytest

    from treedistill.cli import COMMANDS, _available_commands, build_parser

    commands = _available_commands()
    assert set(commands) == set(COMMANDS), "a registered subcommand module is missing"
    parser = build_parser(commands)
    top = parser.format_help()
    for name in COMMANDS:
        assert name in top, f"{name} missing from --help"
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([name, "--help"])
        assert exit_info.value.code == 0, f"{name} --help failed"


def test_thread_count_precedence(monkeypatch):
    """--threads wins, then OMP_NUM_THREADS, then the command's default (pretrain: every core)."""
    import os

    import torch

    from treedistill.cli import set_threads
    from treedistill.commands import env as env_command
    from treedistill.commands import pretrain as pretrain_command

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        set_threads(None, 3)
        assert os.environ["OMP_NUM_THREADS"] == "3" and torch.get_num_threads() == 3
        set_threads(None, 2)  # the variable, once set, wins over a default
        assert os.environ["OMP_NUM_THREADS"] == "3" and torch.get_num_threads() == 3
        set_threads(2, 1)
        assert os.environ["OMP_NUM_THREADS"] == "2" and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert pretrain_command.default_threads() == len(os.sched_getaffinity(0))
    assert not hasattr(env_command, "default_threads")  # other commands: 1 thread unless asked
