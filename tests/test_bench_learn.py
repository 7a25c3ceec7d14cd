"""`bench learn`: the learner's step on a real mcts-tree rollout of the tiny preset, packed and per-row
(tiny sizes: 2 trees of 8 simulations, one timed repeat)."""

import json

import pytest


def test_bench_learn_reports_ratios_and_equal_updates(capsys):
    from treedistill.cli import main

    assert main(["bench", "learn", "--trees", "2", "--repeats", "1", "--device", "cpu",
                 "--set", "search.simulations=8", "--set", "reward=dense", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["method"] == "mcts-tree" and result["trees"] == 2
    row, packed = result["per_row"], result["packed"]
    # the same update, at fewer computed positions (every row repeats its tree's prompt and steps above)
    assert result["max_metric_difference"] < 1e-5
    assert len(row["updates"]) == len(packed["updates"]) >= 1
    assert packed["train_positions"] < row["train_positions"] == result["row_tokens"]
    assert result["flops_ratio"] == pytest.approx(row["flops_per_tree"] / packed["flops_per_tree"])
    assert result["flops_ratio"] > 1 and result["seconds_ratio"] > 0
    for way in (row, packed):  # throughput: the rows' tokens over the median step time (one repeat: its time)
        assert way["row_tokens_per_s"] == pytest.approx(result["row_tokens"] / way["seconds_all"][0], rel=1e-2)
    assert any(line.startswith("per-row / packed:") for line in out)


def test_bench_learn_refuses_bad_counts_before_any_compute():
    from treedistill.cli import main

    assert main(["bench", "learn", "--trees", "0"]) != 0
