"""CLI runs of `treedistill data countdown|check` and `treedistill score`.

Two tests start the real console command in a subprocess; the others call `treedistill.cli.main`
in-process (same parsing, same code, without paying interpreter and torch start-up per call).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from treedistill.cli import main
from treedistill.envs.countdown import CountdownEnv, load_problems

REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "countdown-reference"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "treedistill", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def last_json(out):
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


class Result:
    """What `run_cli` returns, for an in-process run."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys):
    def call(*args):
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return call


def test_data_countdown_and_check(tmp_path, cli):
    result = last_json(run_cli("data", "countdown", "--train", 400, "--test", 40, "--seed", 3,
                               "--out", tmp_path, "--json"))
    assert result["overlap"] == 0 and result["train"]["count"] == 400 and result["test"]["count"] == 40
    assert set(result["test"]) == {"count", "min", "median", "mean", "max", "share_le_100"}
    assert result["seconds"] >= 0
    train, test = load_problems(tmp_path / "train.jsonl"), load_problems(tmp_path / "test.jsonl")
    assert len(train) == 400 and len(test) == 40
    again = last_json(cli("data", "countdown", "--train", 400, "--test", 40, "--seed", 3,
                          "--out", tmp_path / "again", "--json"))
    assert (tmp_path / "again" / "train.jsonl").read_text() == (tmp_path / "train.jsonl").read_text()
    assert again["train"] == result["train"]
    # `check` against itself: every test problem is in the test file
    check = last_json(cli("data", "check", "--train", tmp_path / "test.jsonl",
                          "--test", tmp_path / "test.jsonl", "--json"))
    assert check["overlap"] == 40 and check["test_unique"] == 40
    assert last_json(cli("data", "check", "--train", tmp_path / "train.jsonl",
                         "--test", tmp_path / "test.jsonl", "--json"))["overlap"] == 0


@pytest.mark.skipif(not (REFERENCE / "test.jsonl").exists(), reason="reference files are not here")
def test_data_check_on_reference_files(cli):
    check = last_json(cli("data", "check", "--train", REFERENCE / "train.jsonl",
                              "--test", REFERENCE / "test.jsonl", "--json"))
    assert check["overlap"] == 699  # the reference's known defect
    assert check["train"]["median"] == 38 and check["test"]["median"] == 43.5


def test_data_errors(tmp_path, cli):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"numbers": [1, 2, 3, 4], "target": 5}\n{"numbers": [1, 2], "target": "x"}\n')
    out = cli("data", "check", "--train", bad, "--test", bad)
    assert out.returncode == 2 and "bad.jsonl:2:" in out.stderr
    out = cli("data", "countdown", "--train", -1, "--out", tmp_path)
    assert out.returncode == 2


def test_score_countdown_agrees_with_the_environment(tmp_path):
    from test_countdown import CASES, PROBLEM

    path = tmp_path / "completions.jsonl"
    path.write_text("".join(json.dumps({**PROBLEM, "completion": c}) + "\n" for c, *_ in CASES))
    out = run_cli("score", "--data", path)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == len(CASES)
    for line, (completion, dense, sparse, reason) in zip(lines, CASES):
        score = CountdownEnv().score(PROBLEM, completion)
        assert line == {"dense": score.dense, "sparse": score.sparse, "reason": score.reason}
        assert line["reason"] == reason and line["sparse"] == sparse
        assert line["dense"] == pytest.approx(dense, abs=1e-12)


def test_score_strict_mode_and_gsm8k(tmp_path, cli):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"numbers": [13, 9, 5, 7], "target": 27, "completion": "<answer>13+9+5</answer>"}))
    assert last_json(cli("score", "--data", path))["sparse"] == 1.0
    assert last_json(cli("score", "--data", path, "--require-all-numbers"))["reason"] == "invalid:not_all_numbers"
    gsm = tmp_path / "g.jsonl"
    gsm.write_text(json.dumps({"answer": "so #### 1,000", "completion": "<answer>$1000</answer>"}) + "\n"
                   + json.dumps({"answer": 7, "completion": "<answer>8</answer>"}) + "\n")
    out = cli("score", "--data", gsm, "--env", "gsm8k")
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["dense"] for line in out.stdout.splitlines()] == [1.0, -0.9]


@pytest.mark.parametrize(
    "line",
    ['{"numbers": [1, 2, 3, 4], "target": 5}',  # no completion
     '{"numbers": [1, 2, 3, 4], "target": 5, "completion": 3}',
     "not json"],
)
def test_score_malformed_line_names_file_and_line(tmp_path, line, cli):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"numbers": [1, 2, 3, 4], "target": 10, "completion": ""}) + "\n" + line + "\n")
    out = cli("score", "--data", path)
    assert out.returncode == 2 and "c.jsonl:2:" in out.stderr and out.stdout == ""
