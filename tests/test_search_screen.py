"""Value-screened roots (`SearchSettings.screen`) on toy trees (no model): the first steps are sampled at
once, ranked by `value`, and each subtree starts beneath the next best one."""

import math

import pytest

from treedistill.errors import UsageError
from treedistill.search import ROOT, Candidate, LeafRollout, SearchSettings, search

STEP_END, EOS, PROMPT = 99, 98, (100, 101)
# The first steps a root request samples, in turn (token d = step d), and what the value says of each.
DRAWS = (0, 1, 2, 0, 3, 1, 4, 0)
WORTH = {0: -0.2, 1: 0.1, 2: 0.9, 3: 0.4, 4: -0.8}


class Screened:
    """Root requests draw the next first step of DRAWS; deeper requests always draw step 7. A leaf's
    rollout ends the line at once with z = 0. `value` is the first step's WORTH (only first steps are
    valued: lambda = 1)."""

    def __init__(self):
        self.drawn = 0
        self.expanded, self.valued, self.requests, self.rolled = [], [], [], []

    def expand(self, reqs):
        self.expanded.append([(r.tree, r.node, r.depth) for r in reqs])
        out = []
        for r in reqs:
            if r.node == ROOT:
                d = DRAWS[self.drawn % len(DRAWS)]
                self.drawn += 1
            else:
                d = 7
            out.append([Candidate((d, STEP_END), math.log(0.5))])
        return out

    def value(self, reqs):
        self.valued.append([r.completion for r in reqs])
        self.requests.append([(r.tree, r.completion) for r in reqs])
        return [WORTH[r.completion[0]] for r in reqs]

    def reward(self, reqs):
        raise AssertionError("no terminal node in this game")

    def rollout(self, reqs):
        self.rolled.extend((r.tree, r.node) for r in reqs)
        return [LeafRollout((EOS,), 0.0) for _ in reqs]

    def run(self, prompts=(PROMPT,), **cfg):
        cfg = {"simulations": 12, "parallel": 2, "rollout_lambda": 1.0, "k_children": 1, "widen_c": 1.0,
               "max_depth": 2, "screen": 8, **cfg}
        return search(list(prompts), self.expand, self.value, self.reward, SearchSettings(**cfg),
                      rollout=self.rollout)


def first_steps(tree):
    return [tree.tokens[c][0] for c in tree.children[ROOT]]


def test_the_first_steps_are_sampled_at_once_valued_and_dealt_to_the_subtrees_best_first():
    game = Screened()
    result = game.run(subtrees=3)
    # one expand call of 8 root requests (K = 1), before anything else
    assert game.expanded[0] == [(0, ROOT, 0)] * 8
    # the 5 distinct first steps valued in one call, each once (duplicates merged)
    assert sorted(game.valued[0]) == [(d, STEP_END) for d in range(5)]
    # best first: 2 (0.9), 3 (0.4), 1 (0.1); each subtree's root holds only its own
    assert [first_steps(t) for t in result.of_prompt(0)] == [[2], [3], [1]]
    for tree in result.trees:
        child = tree.children[ROOT][0]
        assert tree.prior[child] == 1.0 and tree.expanded[ROOT]
        assert tree.value[child] is not None  # rolled out by the first descent, not by the screen
    # the screen is the root's evaluation: its first visit backs up its step's value, no rollout from the prompt
    assert [t.value[ROOT] for t in result.trees] == [0.9, 0.4, 0.1]
    assert (0, ROOT) not in game.rolled and len(game.rolled) == sum(t.stats.rollout_requests for t in result.trees)
    assert all(t.visits[ROOT] == 1 + t.stats.simulations for t in result.trees)
    # the sampled count is kept: step 1 was drawn twice
    assert result.trees[2].count[result.trees[2].children[ROOT][0]] == 2
    # the screen's cost is booked on the prompt's first subtree
    first = result.trees[0]
    assert first.stats.expand_requests >= 8 and first.stats.value_requests == 5


def test_a_screened_root_is_widened_only_past_its_share_of_the_screen():
    # One subtree holds all 8 samples: widen_c 1 * N^0.5 > 8 needs N > 64, so 20 simulations never
    # sample the root again (unscreened, with widen_c 1, it would be at its second visit).
    game = Screened()
    tree = game.run(subtrees=1, simulations=20).trees[0]
    assert first_steps(tree) == [2] and tree.sampled[ROOT] == 8
    assert [e for call in game.expanded[1:] for e in call if e[1] == ROOT] == []
    assert tree.stats.simulations == 20
    # Four subtrees share them, 2 each: a root is widened once N^0.5 > 2, from its 5th visit on.
    game = Screened()
    trees = game.run(subtrees=4, simulations=60, parallel=1).trees
    for tree in trees:  # (the widened samples may merge into the screened step: DRAWS repeats)
        assert 2 < tree.sampled[ROOT] <= tree.visits[ROOT] ** 0.5 + 1
    assert [e for call in game.expanded[1:] for e in call if e[1] == ROOT] != []
    game = Screened()
    trees = game.run(subtrees=4, simulations=12, parallel=1).trees  # 3 simulations each: N(root) = 4
    assert all(tree.sampled[ROOT] == 2 and len(first_steps(tree)) == 1 for tree in trees)


def test_fewer_distinct_first_steps_than_subtrees_wrap_round():
    game = Screened()
    game.expand = lambda reqs: [[Candidate((3 if r.node == ROOT else 7, STEP_END), 0.0)] for r in reqs]
    result = game.run(subtrees=3)
    assert [first_steps(t) for t in result.trees] == [[3], [3], [3]]


def test_several_prompts_are_screened_in_one_call_each():
    game = Screened()
    result = game.run(prompts=(PROMPT, (100, 102)), subtrees=2)
    assert len(game.expanded[0]) == 16 and {t for t, _, _ in game.expanded[0]} == {0, 1}
    # each prompt's 5 distinct first steps valued once, in the same call
    assert len(game.valued[0]) == 10 and len(game.requests[0]) == 10 and len(set(game.requests[0])) == 10
    assert len(result.trees) == 4 and all(len(t.children[ROOT]) == 1 for t in result.trees)


def test_terminal_first_steps_are_scored_by_reward_and_ranked_with_the_rest():
    def expand(reqs):
        return [[Candidate((5, EOS), 0.0, terminal=True, finish="eos")] if i % 2 == 0 and r.node == ROOT
                else [Candidate((1, STEP_END), 0.0)] for i, r in enumerate(reqs)]

    rewarded = []

    def reward(reqs):
        rewarded.append([r.completion for r in reqs])
        return [1.0 for _ in reqs]

    result = search([PROMPT], expand, lambda reqs: [0.1] * len(reqs), reward,
                    SearchSettings(simulations=4, parallel=1, rollout_lambda=1.0, k_children=1, subtrees=2, screen=4,
                                   max_depth=2),
                    rollout=lambda reqs: [LeafRollout((EOS,), 0.0) for _ in reqs])
    assert rewarded[0] == [(5, EOS)]
    best = result.trees[0]
    child = best.children[ROOT][0]
    assert best.terminal[child] and best.value[child] == 1.0
    assert first_steps(result.trees[1]) == [1]


def test_screen_zero_is_todays_search():
    a, b = Screened(), Screened()
    plain = a.run(screen=0, subtrees=2).trees
    again = b.run(screen=0, subtrees=2).trees
    assert a.valued == [] and [t.tokens for t in plain] == [t.tokens for t in again]
    assert a.expanded[0] == [(0, ROOT, 0), (0, ROOT, 0)]  # one root expansion per subtree


def test_the_screen_setting_is_checked():
    with pytest.raises(UsageError, match="screen"):
        SearchSettings(screen=-1)


def test_screen_top_deals_the_best_steps_round_the_subtrees():
    game = Screened()
    result = game.run(subtrees=4, screen_top=2)
    # best first: 2 (0.9), 3 (0.4); subtrees 0 and 2 start from 2, subtrees 1 and 3 from 3
    assert [first_steps(t) for t in result.of_prompt(0)] == [[2], [3], [2], [3]]
    # the two subtrees below one step search it apart: each rolls out from it on its own
    assert all(t.stats.rollout_requests >= 1 for t in result.trees)
    # each kept step stands for half of the 8 samples: its roots are widened once N^0.5 > 4, not > 2
    game = Screened()
    trees = game.run(subtrees=4, screen_top=2, simulations=60, parallel=1).trees  # 15 each: N(root) = 16
    assert all(tree.sampled[ROOT] == 4 and len(first_steps(tree)) == 1 for tree in trees)
    game = Screened()
    trees = game.run(subtrees=4, screen_top=2, simulations=120, parallel=1).trees
    assert all(4 < tree.sampled[ROOT] <= tree.visits[ROOT] ** 0.5 + 1 for tree in trees)
    # more kept than subtrees: one each, as screen_top 0
    game = Screened()
    assert [first_steps(t) for t in game.run(subtrees=3, screen_top=8).trees] == [[2], [3], [1]]
    with pytest.raises(UsageError, match="screen_top"):
        SearchSettings(screen=8, screen_top=-1)
