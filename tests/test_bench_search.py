"""`bench search`'s real-search part: the search core driven by the tiny model on Countdown prompts,
at two tree sizes, beside the unchanged synthetic expansion workload."""

import json

import pytest

from treedistill.commands.bench import TREE_SIMS_AUTO, parse_tree_sims
from treedistill.errors import UsageError


def test_parse_tree_sims():
    assert parse_tree_sims("auto", "tiny") == TREE_SIMS_AUTO["tiny"] == (16, 1600)
    assert parse_tree_sims("auto", "random-qwen2.5-tiny") == ()
    assert parse_tree_sims("off", "tiny") == ()
    assert parse_tree_sims("16, 1600", "x") == (16, 1600)
    for bad in ("0", "a,b", ""):
        with pytest.raises(UsageError, match="--tree-sims"):
            parse_tree_sims(bad, "tiny")


def test_bench_search_reports_the_real_search(capsys):
    from treedistill.cli import main

    assert main(["bench", "search", "--model", "tiny", "--prompt-len", "16", "--breadth", "2", "--depth", "2",
                 "--simulations", "2", "--step-tokens", "4", "--no-hf", "--device", "cpu",
                 "--tree-sims", "4,24", "--trees", "2", "--tree-parallel", "4", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    # the synthetic workload's fields are unchanged
    assert result["speedup"] > 0 and set(result["engines"]) == {"native_cache", "native_no_cache"}
    ts = result["tree_search"]
    assert set(ts["runs"]) == {"4", "24"} and ts["trees"] == 2
    for sims, run in ts["runs"].items():
        assert run["simulations"] == 2 * int(sims) and run["simulations_per_s"] > 0
        assert 0 <= run["bookkeeping_share"] <= 1
        assert run["search_s"] == pytest.approx(run["model_s"] + run["bookkeeping_s"], abs=2e-4)
        assert run["expand_calls"] >= 1 and run["generated_tokens"] > 0
    # bookkeeping per simulation at the largest tree over that at the smallest
    runs = ts["runs"]
    assert ts["cost_growth"] == pytest.approx(runs["24"]["bookkeeping_us_per_simulation"]
                                              / runs["4"]["bookkeeping_us_per_simulation"], abs=5e-4)
    assert ts["bookkeeping_share_max"] == max(r["bookkeeping_share"] for r in runs.values())
    assert any(line.startswith("real search:") for line in out)


def test_bench_search_refuses_bad_tree_arguments(capsys):
    from treedistill.cli import main

    assert main(["bench", "search", "--model", "tiny", "--tree-sims", "x", "--device", "cpu"]) == 2  # a usage error
    out = capsys.readouterr()
    assert "--tree-sims" in out.err and len(out.err.strip().splitlines()) == 1
    assert "bench search:" not in out.out  # refused before the expansion benchmark ran


def test_bench_search_refuses_bad_tree_counts_before_any_compute(capsys):
    from treedistill.cli import main

    for flag in ("--trees", "--tree-parallel", "--tree-k"):
        assert main(["bench", "search", "--model", "tiny", flag, "0", "--device", "cpu"]) != 0
        out = capsys.readouterr()
        assert f"{flag} must be >= 1, got 0" in out.err
        assert "bench search:" not in out.out  # the expansion benchmark did not run first
