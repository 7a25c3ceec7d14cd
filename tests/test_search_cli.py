"""`treedistill search` and `treedistill testtime` end to end: refusals, and smoke runs of the real CLI
on the embedded tiny model (a saved randomly initialised tiny model while its checkpoint is absent)."""

import json

import pytest

from treedistill.cli import main
from treedistill.models.presets import TINY_FOLDER


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    if (TINY_FOLDER / "config.json").is_file():
        return "tiny"
    import torch

    from treedistill.models.load import wrap_policy
    from treedistill.models.tiny import build_model, build_tokenizer

    folder = tmp_path_factory.mktemp("tiny-random")
    wrap_policy(build_model(0), build_tokenizer(), name="tiny-random", device=torch.device("cpu"),
                dtype=torch.float32, compact_prompt=True).save(folder)
    return str(folder)


@pytest.mark.parametrize("argv,message", [
    (["--numbers", "3", "0", "--target", "5"], "positive integers"),
    (["--numbers", "3", "4", "--target", "5", "--simulations", "0"], "--simulations"),
    (["--numbers", "3", "4", "--target", "5", "--select", "best"], "--select"),
    (["--numbers", "3", "4", "--target", "5", "--engine", "vllm"], "--engine"),
    (["--numbers", "3", "4", "--target", "5", "--widen-c", "-1"], "--widen-c"),
    (["--numbers", "3", "4", "--target", "5", "--terminal", "oracle"], "--terminal"),
])
def test_search_refuses_bad_arguments(argv, message, capsys):
    assert main(["search", "--model", "tiny", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, bound", [("--simulations", "100000000000", "10,000,000"),
                                                ("--k-children", "10000001", "10,000,000"),
                                                ("--step-max-tokens", "40000", "32,768")])
def test_search_counts_beyond_their_bound_are_refused_before_compute(flag, value, bound, capsys, monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr("treedistill.models.load.load_policy", no_loading)
    assert main(["search", "--numbers", "3", "4", "--target", "7", flag, value]) == 2
    err = capsys.readouterr().err
    assert f"{flag} must be at most {bound}, got {value}" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_long_search_shows_its_progress_on_stderr(model, capsys, monkeypatch):
    from treedistill.commands import search

    monkeypatch.setattr(search.SearchProgress, "EVERY_S", 0.0)  # a line every round, as a long search gets every 2 s
    assert main(["search", "--model", model, "--numbers", "3", "7", "9", "12", "--target", "24",
                 "--simulations", "16", "--parallel", "4", "--max-new-tokens", "64"]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("search simulations ")]
    assert lines and lines[-1].startswith("search simulations 16/16"), captured.err
    assert "search simulations" not in captured.out


def test_testtime_refuses_bad_budgets(capsys):
    assert main(["testtime", "--model", "tiny", "--budgets", "0,64"]) == 2
    assert "--budgets" in capsys.readouterr().err
    assert main(["testtime", "--model", "tiny", "--widen-alpha", "-0.5"]) == 2
    assert "--widen-alpha" in capsys.readouterr().err
    assert main(["testtime", "--model", "tiny", "--c-puct", "-1"]) == 2
    assert "--c-puct must be >= 0" in capsys.readouterr().err


@pytest.mark.slow
def test_search_cli_smoke(model, tmp_path, capsys):
    page = tmp_path / "tree.html"
    assert main(["search", "--model", model, "--numbers", "3", "7", "9", "12", "--target", "24",
                 "--simulations", "24", "--parallel", "4", "--max-new-tokens", "128", "--json",
                 "--widen-c", "1", "--terminal", "legal", "--html", str(page)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    out = json.loads(lines[-1])
    assert any(line.startswith("principal variation") for line in lines)
    assert out["tree"]["simulations"] == 24 and out["tree"]["nodes"] > 1 and out["tree"]["widenings"] >= 0
    assert -1.0 <= out["reward"] <= 1.0 and out["sparse"] in (0.0, 1.0)
    assert len(out["principal_variation"]) >= 1
    html = page.read_text()
    assert html.startswith("<!doctype html>") and "<details" in html and "http" not in html


@pytest.mark.slow
def test_testtime_cli_smoke(model, tmp_path, capsys):
    argv = ["--threads", "1", "testtime", "--model", model, "--budgets", "64,256", "--limit", "3", "--once-samples",
            "2", "--max-new-tokens", "96", "--out", str(tmp_path), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["problems"] == 3
    methods = {c["method"] for c in out["cells"]}
    assert {"mcts", "bon-majority", "bon-value"} <= methods
    bon = [c for c in out["cells"] if c["method"] == "bon-majority"]
    assert [c["tokens"] for c in bon] == [64, 256]
    assert (tmp_path / "testtime.png").stat().st_size > 1000
    assert f"Command: `treedistill {' '.join(argv)}`" in (tmp_path / "testtime.md").read_text()  # as typed


@pytest.mark.slow
def test_testtime_cli_subtrees_and_paired_differences(model, tmp_path, capsys):
    argv = ["--threads", "1", "testtime", "--model", model, "--budgets", "400", "--limit", "3", "--once-samples", "1",
            "--max-new-tokens", "96", "--rows", "verifier", "--subtrees", "2", "--repeat-penalty", "1",
            "--out", str(tmp_path), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["config"]["search"]["subtrees"], out["config"]["search"]["repeat_penalty"]) == (2, 1.0)
    cells = {(c["method"], c["budget"]): c for c in out["cells"]}
    mcts, bon = cells[("mcts+verifier", 400)], cells[("bon+verifier", 400)]
    assert len(mcts["detail"]["per_problem"]) == len(bon["detail"]["per_problem"]) == 3
    (d,) = out["differences"]
    assert (d["method"], d["against"], d["budget"]) == ("mcts+verifier", "bon+verifier", 400)
    assert d["difference"] == pytest.approx(mcts["accuracy"] - bon["accuracy"])
    assert d["low"] <= d["difference"] <= d["high"]
    assert "MCTS minus best-of-N" in (tmp_path / "testtime.md").read_text()
    assert "2 independent trees per problem" in (tmp_path / "testtime.md").read_text()
