"""Extraction: the most-visited path, its tie-breaks, the Gumbel root action, incomplete paths, and
the per-node child statistics exported as targets."""

import math

import pytest

from treedistill.search import ROOT, Candidate, SearchSettings, Tree, extract, most_visited, search

EOS, STEP_END = 98, 99


def build(children_stats, terminal=False):
    """Root with children given as (tokens, prior, N, W); returns the tree."""
    t = Tree((1, 2))
    for tokens, prior, n, w in children_stats:
        c = t.add_node(ROOT, tokens, math.log(prior), prior, terminal=terminal, finish="eos" if terminal else "stop")
        t.visits[c], t.value_sum[c] = n, w
        if terminal:
            t.value[c] = w / n if n else 0.5
    t.expanded[ROOT], t.value[ROOT] = True, 0.0
    t.visits[ROOT] = 1 + sum(n for *_, n, _ in children_stats)
    return t


def test_most_visited_and_its_tie_breaks():
    # N: 3, 5, 5, 0 -> the two 5s tie; Q .2 vs .6 -> the higher Q (node 3)
    t = build([((5,), .4, 3, 0.9), ((6,), .3, 5, 1.0), ((7,), .2, 5, 3.0), ((8,), .1, 0, 0.0)])
    assert most_visited(t, ROOT) == 3
    # same N and same Q -> the lower id
    t = build([((5,), .5, 4, 2.0), ((6,), .5, 4, 2.0)])
    assert most_visited(t, ROOT) == 1
    # nothing visited -> None
    assert most_visited(build([((5,), 1.0, 0, 0.0)]), ROOT) is None


def test_complete_path_reports_reward_and_targets():
    t = build([((5, EOS), .7, 2, 1.0), ((6, EOS), .3, 1, -1.0)], terminal=True)
    ex = extract(t)
    assert ex.nodes == (0, 1) and ex.steps == ((5, EOS),) and ex.tokens == (5, EOS)
    assert ex.complete and ex.reward == pytest.approx(0.5) and ex.search_end == 2
    root = ex.targets[0]
    assert root.children == (1, 2) and root.visits == (2, 1) and root.prior == pytest.approx((.7, .3))
    assert root.q == pytest.approx((0.5, -1.0)) and root.visit_probs == pytest.approx((2 / 3, 1 / 3))
    assert ex.targets[1].children == () and ex.targets[1].visit_probs == ()


def test_incomplete_path_is_marked_not_scored():
    t = build([((5, STEP_END), .6, 2, 0.4), ((6, STEP_END), .4, 0, 0.0)])
    ex = extract(t)
    assert ex.steps == ((5, STEP_END),) and not ex.complete and ex.reward is None
    assert ex.search_end == len(ex.tokens) == 2
    # unvisited child: Q None, visit probability 0
    assert ex.targets[0].q[1] is None and ex.targets[0].visit_probs == (1.0, 0.0)
    # a root with no visited child gives the empty path, incomplete
    empty = extract(build([((5, STEP_END), 1.0, 0, 0.0)]))
    assert empty.nodes == (0,) and empty.tokens == () and not empty.complete


def test_gumbel_extraction_takes_the_sequential_halving_winner():
    # Two root children with equal (maximal) visits: most-visited picks the higher Q (node 1);
    # the Gumbel action is argmax g + log P + completed Q among them. Completed Q: [.5, .2] rescaled
    # to [1, 0], x (50 + 4) * .1 = 5.4: node 1 log .5 + 5.4 = 4.707; node 2 with g = 6: 6 + log .5 = 5.307.
    t = build([((5, EOS), .5, 4, 2.0), ((6, EOS), .5, 4, 0.8)], terminal=True)
    t.gumbel[2] = 6.0
    assert extract(t).nodes == (0, 1)
    assert extract(t, SearchSettings(select="gumbel")).nodes == (0, 2)
    t.gumbel[2] = 5.0  # 5 - .693 = 4.307 < 4.707
    assert extract(t, SearchSettings(select="gumbel")).nodes == (0, 1)


@pytest.mark.parametrize("rule", ["puct", "uct", "gumbel"])
@pytest.mark.parametrize("simulations", [1, 3, 7, 30])
def test_extraction_is_terminal_or_marked_incomplete(rule, simulations):
    # A 4-step game with 3 sampled steps per node and a step that ends the completion early.
    def expand(reqs):
        out = []
        for r in reqs:
            last = r.depth == 3
            out.append([Candidate((d, EOS if last or d == 2 else STEP_END), -float(d), last or d == 2)
                        for d in range(3)])
        return out

    def value(reqs):
        return [math.sin(len(r.completion) + sum(r.completion)) for r in reqs]

    cfg = SearchSettings(simulations=simulations, parallel=2, select=rule, max_depth=4)
    for tree in search([(1,), (2, 3)], expand, value, value, cfg).trees:
        ex = extract(tree, cfg)
        last = ex.nodes[-1]
        assert ex.complete == tree.terminal[last]
        assert (ex.reward is None) == (not ex.complete)
        if ex.complete:
            assert ex.reward == tree.value[last] and ex.tokens[-1] == EOS
        assert ex.tokens == tree.completion(last) and len(ex.targets) == len(ex.nodes)
        for step in ex.targets[:-1]:  # every node before the last has a visited child
            assert sum(step.visits) > 0


def test_pick_best_takes_the_valued_terminal_of_highest_value():
    # root -> a (N=5, not terminal) -> a1 (terminal, value 0.2); root -> b (N=2, terminal, value 0.9);
    # root -> c (terminal, never valued); most visits follows a -> a1, "best" takes b.
    t = build([((5, STEP_END), .5, 5, 2.0), ((6, EOS), .3, 2, 1.8), ((7, EOS), .2, 0, 0.0)])
    t.terminal[2] = t.terminal[3] = True
    t.value[2], t.value[3] = 0.9, None
    a1 = t.add_node(1, (8, EOS), 0.0, 1.0, terminal=True, finish="eos")
    t.visits[a1], t.value_sum[a1], t.value[a1] = 4, 0.8, 0.2
    assert extract(t).nodes == (0, 1, a1)
    best = extract(t, SearchSettings(pick="best"))
    assert best.nodes == (0, 2) and best.complete and best.reward == pytest.approx(0.9)
    # ties on value go to more visits
    t.value[a1] = 0.9
    assert extract(t, SearchSettings(pick="best")).nodes == (0, 1, a1)
    # no valued terminal: the most-visited path
    t.value[2] = t.value[a1] = None
    assert extract(t, SearchSettings(pick="best")).nodes == (0, 1, a1)
    with pytest.raises(Exception, match="pick"):
        SearchSettings(pick="first")
