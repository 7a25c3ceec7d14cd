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


def _one_line_error(out, *fragments):
    assert out.returncode == 2 and out.stdout == "", (out.returncode, out.stderr)
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    for fragment in fragments:
        assert fragment in out.stderr, (fragment, out.stderr)


@pytest.mark.parametrize("args,fragment", [
    (["--train", 10**12], "--train must be in 0..10,000,000"),
    (["--test", 10**7], "--test in 0..20,000"),
    (["--seed", -1], "--seed must be in 0..2**32 - 1"),
])
def test_data_countdown_refuses_sizes_and_seeds_out_of_range_at_once(tmp_path, cli, args, fragment):
    _one_line_error(cli("data", "countdown", *args, "--out", tmp_path / "out"), fragment)
    assert not (tmp_path / "out").exists()


def test_data_countdown_refuses_an_output_it_cannot_write_before_generating(tmp_path, cli):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _one_line_error(cli("data", "countdown", "--train", 5, "--test", 5, "--out", a_file), "is a file, not a folder")
    _one_line_error(cli("data", "countdown", "--train", 5, "--test", 5, "--out", a_file / "sub"), "cannot write to")
    assert a_file.read_text() == "x"


def test_data_countdown_refuses_a_read_only_output(tmp_path, cli, make_read_only):
    out = tmp_path / "ro"
    out.mkdir()
    make_read_only(out)
    _one_line_error(cli("data", "countdown", "--train", 5, "--test", 5, "--out", out), "cannot write to")
    assert list(out.iterdir()) == []  # refused before generating: nothing written


@pytest.mark.parametrize("content,fragment", [
    (b"", "no records (the file is empty)"),
    (b"\n  \n", "no records (the file is empty)"),
    (b'{"numbers": [1, 2], "target": 3, "completion": ""}\n{"numbers": [1, \xff], "target": 3}\n',
     "c.jsonl:2: not UTF-8 (byte 17 of the line)"),
    (b'{"numbers": [1, 2], "target": 3, "completion": ""}\n' + b"[" * 100_000 + b"\n", "c.jsonl:2: JSON nested too deeply"),
    (b'{"numbers": [1, 2], "target": ' + b"7" * 5000 + b', "completion": ""}\n', "c.jsonl:1: not usable JSON"),
    (b'{"numbers": [' + b"9" * 300 + b', 2], "target": 3, "completion": ""}\n',
     'c.jsonl:1: "numbers" must hold positive integers below 1,000,000'),
    (b'{"numbers": [1, 2], "target": 1000000, "completion": ""}\n', '"target" must be a positive integer below 1,000,000'),
])
def test_score_and_data_check_name_file_and_line_of_bad_input(tmp_path, cli, content, fragment):
    path = tmp_path / "c.jsonl"
    path.write_bytes(content)
    _one_line_error(cli("score", "--data", path), fragment)
    _one_line_error(cli("data", "check", "--train", path, "--test", path), fragment)


def test_train_refuses_problems_too_long_for_any_model_before_loading_one(tmp_path, capsys, monkeypatch):
    import treedistill.models.load as load

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the problem files were checked")

    monkeypatch.setattr(load, "load_policy", no_loading)
    monkeypatch.setattr("treedistill.learner.load_policy", no_loading)
    path = tmp_path / "train.jsonl"
    path.write_text('{"numbers": [1, 2, 3, 4], "target": 24}\n' + json.dumps({"numbers": [10**200, 2], "target": 5}) + "\n")
    code = main(["train", "--preset", "countdown-tiny-grpo", "--set", f"train_path={path}", "--run-dir",
                 str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "train.jsonl:2:" in err and "got [1000" in err and len(err.splitlines()) == 1
