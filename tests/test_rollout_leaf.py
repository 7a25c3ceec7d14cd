"""Rollout leaves and canonical merging through the search bridge, with a randomly initialised tiny
model: rollout tokens are generated tokens (the engine's counter and the per-tree account agree), a
path finished by a rollout is not sampled again, and the test-time sweep reports tokens per finished
answer, with rollouts, merging and the Gumbel root at every budget."""

from dataclasses import replace

import pytest
import torch

from treedistill.engine import make_engine
from treedistill.envs import get_env
from treedistill.models.load import wrap_policy
from treedistill.models.tiny import build_model, build_tokenizer
from treedistill.rollout import SearchBridge, search_problems
from treedistill.search import SearchSettings
from treedistill.search.contracts import TEST_TIME_SEARCH
from treedistill.testtime import SweepConfig, format_table, run_sweep

PROBLEMS = [{"numbers": [3, 7, 9, 12], "target": 24}, {"numbers": [1, 5, 6, 13], "target": 59}]
ENV = get_env("countdown")


@pytest.fixture(scope="module")
def policy():
    return wrap_policy(build_model(0), build_tokenizer(), name="tiny-random", device=torch.device("cpu"),
                       dtype=torch.float32, compact_prompt=True)


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_rollout_tokens_are_counted_and_finish_the_path(policy, lam):
    engine = make_engine(policy, "native")
    cfg = SearchSettings(simulations=6, parallel=2, max_depth=3, k_children=2, step_max_tokens=8, rollout_lambda=lam)
    before = engine.counters.generated_tokens
    outs = search_problems(engine, policy, ENV, PROBLEMS, search=cfg, max_new_tokens=40, terminal_value="reward")
    assert sum(o.generated_tokens for o in outs) == engine.counters.generated_tokens - before
    for o in outs:
        stats, ex = o.trajectory.stats, o.extraction
        assert stats["rollouts"] >= 1 and stats["rollout_tokens"] >= 1
        assert o.batch.rollout_calls >= 1
        if not ex.complete:  # every evaluated leaf has a rollout: it finishes the path, no new sample
            assert ex.rollout is not None and stats["finished_by_rollout"] and stats["completion_tokens"] == 0
            assert o.trajectory.completion_ids == ex.tokens + ex.rollout.tokens
            assert len(o.trajectory.behaviour_logprobs) == len(o.trajectory.completion_ids)
        assert len(o.trajectory.completion_ids) <= 40
        assert 0 <= stats["distinct_answers"] <= stats["finished_answers"]


def test_without_the_options_nothing_is_rolled_out(policy):
    engine = make_engine(policy, "native")
    cfg = SearchSettings(simulations=6, parallel=2, max_depth=3, k_children=2, step_max_tokens=8)
    for o in search_problems(engine, policy, ENV, PROBLEMS, search=cfg, max_new_tokens=40):
        assert o.trajectory.stats["rollouts"] == 0 and not o.trajectory.stats["finished_by_rollout"]
        assert o.batch.rollout_calls == 0


def test_step_key_is_the_environments_canonical_step(policy):
    prompt = policy.prompt_ids(ENV.messages(PROBLEMS[0], compact=True))
    bridge = SearchBridge(make_engine(policy, "native"), policy, ENV, PROBLEMS[:1], [prompt])
    ids = policy.tokenizer.encode
    a = bridge.step_key(tuple(ids("<step>5 * 4 = 20 (20 7)</step>", add_special_tokens=False)))
    b = bridge.step_key(tuple(ids("<step>4*5=20 (7 20)</step>", add_special_tokens=False)))
    assert a == b == "<step>4*5=20 (7 20)</step>"
    engine = make_engine(policy, "native")
    cfg = SearchSettings(simulations=6, parallel=2, max_depth=3, k_children=4, step_max_tokens=8, merge="canonical")
    outs = search_problems(engine, policy, ENV, PROBLEMS, search=cfg, max_new_tokens=40)
    for o in outs:  # no two siblings share a canonical form
        tree = o.tree
        for node in range(len(tree)):
            keys = [(tree.terminal[c], bridge.step_key(tree.tokens[c])) for c in tree.children[node]]
            assert len(keys) == len(set(keys))


def test_sweep_reports_cost_per_answer_with_rollouts_merge_and_gumbel(policy):
    # unscreened (a screened root holds one first step, and Gumbel's Sequential Halving picks among several)
    search = replace(TEST_TIME_SEARCH, step_max_tokens=8, k_children=2, parallel=2, select="gumbel", widen_c=0.0,
                     rollout_lambda=1.0, merge="canonical", screen=0)
    # budgets above the cost of the default 4 subtrees' roots (~220 tokens here)
    cfg = SweepConfig(budgets=(300, 600), max_new_tokens=32, search=search, pilot_problems=2, pilot_simulations=2,
                      rows="verifier", budget_tries=1, once_temperatures=(0.8,), once_samples=1)
    report = run_sweep(make_engine(policy, "native"), policy, ENV, PROBLEMS, cfg)
    cells = {(c.method, c.budget): c for c in report.cells}
    assert set(cells) == {("once T=0.8", None), *((m, b) for m in ("mcts+verifier", "bon+verifier")
                                                    for b in (300, 600))}
    # the random model writes no legal answer in 32 tokens: every cell runs, scores 0 and has no answer to
    # charge its tokens to
    for (method, budget), c in cells.items():
        assert c.accuracy == 0.0 and c.tokens > 0, (method, budget)
        if budget is not None:
            assert (c.detail["finished_answers"], c.detail["distinct_answers"]) == (0.0, 0.0)
            assert c.detail["tokens_per_answer"] is None
    for b in (300, 600):
        assert cells[("bon+verifier", b)].tokens == b  # best-of-N spends its budget to the token
        mcts = cells[("mcts+verifier", b)].detail
        assert mcts["rollout_tokens"] > 0  # the leaves were rolled out
    # Gumbel at the larger budget: more simulations, a larger tree
    small, large = cells[("mcts+verifier", 300)].detail, cells[("mcts+verifier", 600)].detail
    assert large["simulations"] > small["simulations"] and large["tree_nodes_mean"] > small["tree_nodes_mean"]
    assert "| bon+verifier | - (0.0 distinct) | - (0.0 distinct) |" in format_table(report, "answers")


def test_answer_cost_by_hand():
    from treedistill.testtime.sweep import answer_cost

    # 300 tokens over two problems whose lines finished 2 and 1 legal answers (1 and 1 distinct values):
    # 1.5 answers per problem, 300 / 3 = 100 tokens per answer
    assert answer_cost(300, [2, 1], [1, 1]) == {"finished_answers": 1.5, "distinct_answers": 1.0,
                                                 "tokens_per_answer": 100.0}
    assert answer_cost(300, [0, 0], [0, 0])["tokens_per_answer"] is None


def test_q_normalize_tracks_the_extreme_values_a_real_search_backed_up(policy):
    # Every Q = W / N is a mean of backed-up leaf values, and each leaf value is its leaf's Q right after
    # its first backup: so the running min / max over all Qs are the min / max of the visited nodes' values.
    search = SearchSettings(simulations=12, parallel=2, max_depth=3, k_children=2, step_max_tokens=8,
                            q_normalize=True)
    outs = search_problems(make_engine(policy, "native"), policy, ENV, PROBLEMS, search=search, max_new_tokens=24,
                           terminal_value="reward")
    for o in outs:
        tree = o.tree
        visited = [n for n in range(len(tree)) if tree.visits[n] > 0]
        values = [tree.value[n] for n in visited]
        assert None not in values and len(visited) >= 4
        assert (tree.q_min, tree.q_max) == (min(values), max(values))
        assert tree.q_min < tree.q_max  # the normalisation is on: two different values were seen
        qs = [tree.value_sum[n] / tree.visits[n] for n in visited]
        assert all(-1e-12 <= tree.normalize(q) <= 1 + 1e-12 for q in qs)
        assert tree.normalize(tree.q_min) == 0.0 and tree.normalize(tree.q_max) == 1.0
    # q_normalize changes which children the search picks (the same seed, the same engine calls otherwise)
    plain = search_problems(make_engine(policy, "native"), policy, ENV, PROBLEMS,
                            search=replace(search, q_normalize=False), max_new_tokens=24, terminal_value="reward")
    assert [o.tree.visits for o in plain] != [o.tree.visits for o in outs]
