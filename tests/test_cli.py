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
    from treedistill.cli import COMMANDS

    out = run_cli("--help")
    assert out.returncode == 0, out.stderr
    for name in COMMANDS:
        assert name in out.stdout, f"{name} missing from --help"
        sub = run_cli(name, "--help")
        assert sub.returncode == 0, f"{name} --help failed: {sub.stderr[-500:]}"
