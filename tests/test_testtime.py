"""Test-time comparison: selectors worked by hand, no selector reads the ground truth, budgets are
spent exactly by best-of-N, and a small sweep with a real (random) tiny model."""

from dataclasses import replace
from fractions import Fraction

import pytest
import torch

from treedistill.engine import make_engine
from treedistill.envs import get_env, inputs_only
from treedistill.errors import UsageError
from treedistill.models.load import wrap_policy
from treedistill.models.tiny import build_model, build_tokenizer
from treedistill.search.contracts import TEST_TIME_SEARCH
from treedistill.testtime import (
    MethodResult,
    SweepConfig,
    SweepReport,
    format_table,
    majority_vote,
    parse_budgets,
    plot_report,
    run_sweep,
    value_pick,
    write_markdown,
)
from treedistill.testtime.sweep import _MctsCost, _prefix_of_stream

ENV = get_env("countdown")


def sweep_search(**fields):
    return replace(TEST_TIME_SEARCH, **fields)
PROBLEM = {"numbers": [3, 7, 9, 12], "target": 24}


def answer_value(env, problem, completion):
    return env.answer_value(inputs_only(problem), completion)


def test_answer_value_is_exact_and_legal_only():
    assert answer_value(ENV, PROBLEM, "<step>x</step><answer>(12-9)*7+3</answer>") == 24
    assert answer_value(ENV, PROBLEM, "<answer>7/3</answer>") == Fraction(7, 3)
    assert answer_value(ENV, PROBLEM, "<answer>7*7</answer>") is None    # 7 used twice
    assert answer_value(ENV, PROBLEM, "<answer>5+3</answer>") is None    # 5 not given
    assert answer_value(ENV, PROBLEM, "<answer>3+</answer>") is None     # does not parse
    assert answer_value(ENV, PROBLEM, "no tag") is None


def test_inputs_only_drops_the_ground_truth():
    assert inputs_only({"numbers": [1, 2], "target": 3}) == {"numbers": [1, 2]}
    assert inputs_only({"question": "q", "answer": "#### 4"}) == {"question": "q"}


def test_majority_vote_by_hand():
    # values 21, 24, 21, None, 24, 24: 24 has 3 votes, first at index 1
    assert majority_vote([21, 24, 21, None, 24, 24]) == 1
    # tie 2-2: the value seen first wins (21 at index 0)
    assert majority_vote([21, 24, 21, None, 24]) == 0
    # equal values in different forms count as one (exact arithmetic)
    assert majority_vote([Fraction(1, 2), 3, Fraction(2, 4)]) == 0
    assert majority_vote([None, None]) is None


def test_value_pick_by_hand():
    # legal answers at 0 and 2: the higher head value among them (index 2, .3), not index 1 (.9, no answer)
    assert value_pick([21, None, 24], [0.1, 0.9, 0.3]) == 2
    # no legal answer: the highest head value over all samples; ties go to the first
    assert value_pick([None, None, None], [0.2, 0.5, 0.5]) == 1
    assert value_pick([], []) is None


def test_selection_never_reads_the_target():
    texts = ["<answer>12+9+3</answer>", "<answer>(12-9)*7+3</answer>", "<answer>12+9+3</answer>", "none"]
    picks = set()
    for target in (24, 25, 10 ** 6):
        problem = {"numbers": [3, 7, 9, 12], "target": target}
        values = [answer_value(ENV, problem, t) for t in texts]
        picks.add((majority_vote(values), value_pick(values, [0.0, 0.4, 0.1, 0.9])))
    assert picks == {(0, 1)}


def test_prefix_of_stream_spends_the_budget_exactly():
    stream = [(1,) * 30, (2,) * 50, (3,) * 40]
    assert _prefix_of_stream(stream, 30) == [(1,) * 30]
    assert _prefix_of_stream(stream, 31) == [(1,) * 30, (2,)]           # 30 + 1, the second cut at the budget
    assert _prefix_of_stream(stream, 100) == [(1,) * 30, (2,) * 50, (3,) * 20]
    assert _prefix_of_stream(stream, 10) == [(1,) * 10]


def test_parse_budgets():
    assert parse_budgets("1024,256, 256") == (256, 1024)
    assert parse_budgets("10000000") == (10_000_000,)
    for bad in ("", "0,5", "a,b", "-3", "256,10000001", "99999999999999999999"):
        with pytest.raises(UsageError):
            parse_budgets(bad)


def test_table_marks_skipped_cells_and_own_cost():
    report = SweepReport(config=SweepConfig(budgets=(64, 256)), problems=2, cells=[
        MethodResult("once T=0.8", None, 0.5, 0.5, 40.0, 1.0),
        MethodResult("mcts", 64, None, None, None, None, note="skipped"),
        MethodResult("mcts", 256, 0.25, 0.1, 250.0, 2.0, detail={}),
    ])
    table = format_table(report).splitlines()
    assert table[0] == "| method | B=64 | B=256 | at its own cost |"
    assert table[2] == "| once T=0.8 |  |  |  50.0 +- 50.0 (40 tok) |"
    assert table[3] == "| mcts | skipped |  25.0 +- 10.0 (250 tok) |  |"


@pytest.fixture(scope="module")
def policy():
    return wrap_policy(build_model(0), build_tokenizer(), name="tiny-random", device=torch.device("cpu"),
                       dtype=torch.float32, compact_prompt=True)


def test_small_sweep_with_a_real_model(policy, tmp_path):
    problems = [PROBLEM, {"numbers": [1, 5, 6, 13], "target": 59}]
    cfg = SweepConfig(budgets=(40, 400), max_new_tokens=48, search=sweep_search(step_max_tokens=8, k_children=2, parallel=2),
                      pilot_problems=2, pilot_simulations=4, rows="both", budget_tries=1,
                      once_temperatures=(0.8, 0.2), once_samples=1)
    report = run_sweep(make_engine(policy, "native"), policy, ENV, problems, cfg)
    cells = {(c.method, c.budget): c for c in report.cells}
    assert set(report.methods()) == {"once T=0.8", "once T=0.2", "mcts", "mcts+verifier", "bon-majority",
                                     "bon-value", "bon+verifier"}
    # with the same samples, the verifier's pick is never worse than a ground-truth-free pick
    for b in (40, 400):
        assert cells[("bon+verifier", b)].accuracy >= cells[("bon-majority", b)].accuracy
    for b in (40, 400):
        for method in ("bon-majority", "bon-value"):
            assert cells[(method, b)].tokens == b  # sampling until the budget is spent, no more
    assert cells[("bon-majority", 400)].detail["n_min"] >= 400 // 48
    # 40 tokens cannot pay for a root expansion (2 steps of up to 8 tokens), a simulation and a completion
    mcts = cells[("mcts", 40)]
    assert mcts.accuracy is None and mcts.note.startswith("skipped")
    assert cells[("mcts", 400)].detail["simulations"] >= 1
    for c in report.cells:
        assert c.accuracy is None or 0.0 <= c.accuracy <= 1.0
    write_markdown(report, tmp_path / "t.md")
    plot_report(report, tmp_path / "t.png")
    assert "| mcts | skipped |" in (tmp_path / "t.md").read_text()
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulation_guess_by_hand():
    # no run yet: the pilot's linear cost, (250 - 100 - 50) // 20 = 5
    cost = _MctsCost(root=100, per_simulation=20, completion=50)
    assert cost.guess(250) == 5 and cost.minimum() == 170
    cost.runs.append((10, 1000.0))  # one run: proportional, 10 * 2000 / 1000
    assert cost.guess(2000) == 20
    # two runs, tokens = a * S^b with b = log(2000/1000) / log(40/10) = 0.5: 4000 tokens at 40 * 2^2
    cost.runs.append((40, 2000.0))
    assert cost.guess(4000) == 160
    # bracketing pair (40, 2000) and (160, 4000), b = 0.5: 3000 tokens at 160 * (3/4)^2 = 90
    cost.runs.append((160, 4000.0))
    assert cost.guess(3000) == 90


def test_saturated_search_is_reported_not_stretched(policy):
    # Without widening, 16-token completions cut into steps of at most 8 tokens, K = 2: a tree holds at
    # most 2 + 4 steps (~48 tokens), so a 600-token budget cannot be spent by the search; best-of-N still spends it all.
    # (No rollout leaves: each would add a completion of up to 16 tokens to the tree's cost; one tree per problem.)
    problems = [PROBLEM, {"numbers": [1, 5, 6, 13], "target": 59}]
    cfg = SweepConfig(budgets=(300, 600), max_new_tokens=16, once_samples=1, pilot_problems=2, pilot_simulations=4,
                      search=sweep_search(step_max_tokens=8, k_children=2, parallel=2, widen_c=0.0, rollout_lambda=0.0,
                                          subtrees=1, screen=0),
                      once_temperatures=(0.8,))
    report = run_sweep(make_engine(policy, "native"), policy, ENV, problems, cfg)
    cells = {(c.method, c.budget): c for c in report.cells}
    first, second = cells[("mcts", 300)], cells[("mcts", 600)]
    assert first.note.startswith("saturated") and first.detail["saturated"] and first.tokens <= 2 * 8 + 4 * 8 + 16
    assert second.accuracy is None and second.note.startswith("skipped: the trees saturate")
    assert cells[("bon-majority", 600)].tokens == 600


def test_widening_lets_the_search_spend_a_budget_a_finite_tree_cannot(policy):
    # The saturation set-up above, with progressive widening: the trees keep growing, so the search
    # reaches the 300-token budget (within the 10% tolerance) instead of saturating near 48 tokens.
    # (No rollout leaves, as above: the tree alone has to spend the budget.)
    problems = [PROBLEM, {"numbers": [1, 5, 6, 13], "target": 59}]
    cfg = SweepConfig(budgets=(300,), max_new_tokens=16, once_samples=1, pilot_problems=2, pilot_simulations=4,
                      search=sweep_search(step_max_tokens=8, k_children=2, parallel=2, widen_c=2.0, rollout_lambda=0.0,
                                          subtrees=1, max_depth=16),
                      once_temperatures=(0.8,))
    report = run_sweep(make_engine(policy, "native"), policy, ENV, problems, cfg)
    mcts = {(c.method, c.budget): c for c in report.cells}[("mcts", 300)]
    assert not mcts.note and "saturated" not in mcts.detail
    assert abs(mcts.tokens - 300) <= 0.1 * 300


def test_verifier_rows_alone(policy):
    cfg = SweepConfig(budgets=(300,), max_new_tokens=48, search=sweep_search(step_max_tokens=8, k_children=2, parallel=2),
                      pilot_problems=1,
                      pilot_simulations=2, rows="verifier", budget_tries=1, once_temperatures=(0.2,), once_samples=1)
    report = run_sweep(make_engine(policy, "native"), policy, ENV, [PROBLEM], cfg)
    assert report.methods() == ["once T=0.2", "mcts+verifier", "bon+verifier"]
    with pytest.raises(UsageError, match="rows must be one of"):
        run_sweep(make_engine(policy, "native"), policy, ENV, [PROBLEM], replace(cfg, rows="all"))


def test_mcts_terminal_rule_must_be_verifier_free(policy):
    cfg = SweepConfig(budgets=(100,), mcts_terminal="reward")
    with pytest.raises(UsageError, match="verifier-free"):
        run_sweep(make_engine(policy, "native"), policy, ENV, [PROBLEM], cfg)
