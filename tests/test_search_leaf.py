"""Leaf evaluation by rollouts (AlphaGo's lambda mix) and merging of equivalent sibling steps, on toy
trees whose values are worked out by hand (no model)."""

import math
from dataclasses import replace

import pytest

from treedistill.envs.countdown import canonical_step
from treedistill.errors import UsageError
from treedistill.search import ROOT, Candidate, LeafRollout, SearchSettings, extract, search

STEP_END, EOS, PROMPT = 99, 98, (100, 101)


class TwoDigits:
    """Write 2 digits (0 or 1), one per step; the second step is terminal. Every terminal scores
    `terminal_reward` (a line the tree itself finishes is never good here). The value head says
    `head` everywhere. A rollout from a node writes the missing digits as 1s and ends; its z is +1
    when the line's first digit is 1, else -1 (the root's rollout: first digit 1, z = +1)."""

    def __init__(self, head=0.5, terminal_reward=-0.5):
        self.head, self.terminal_reward = head, terminal_reward
        self.evaluated, self.rolled = [], []

    def expand(self, reqs):
        out = []
        for r in reqs:
            last = r.depth == 1
            out.append([Candidate((d, EOS if last else STEP_END), math.log(p), terminal=last,
                                  finish="eos" if last else "stop") for d, p in ((0, 0.9), (1, 0.1))])
        return out

    def evaluate(self, reqs):
        self.evaluated.extend(r.node for r in reqs)
        return [self.head] * len(reqs)

    def reward(self, reqs):
        return [self.terminal_reward] * len(reqs)

    def rollout(self, reqs):
        self.rolled.extend(r.node for r in reqs)
        out = []
        for r in reqs:
            digits = r.completion[::2]
            tokens = tuple(t for _ in range(2 - len(digits)) for t in (1, STEP_END))[:-1] + (EOS,)
            first = digits[0] if digits else 1
            out.append(LeafRollout(tokens, 1.0 if first == 1 else -1.0, (-0.1,) * len(tokens), "eos"))
        return out

    def run(self, **cfg):
        cfg = {"simulations": 6, "parallel": 1, **cfg}
        return search([PROMPT], self.expand, self.evaluate, self.reward, SearchSettings(**cfg),
                      rollout=self.rollout).trees[0]


def test_leaf_value_is_alphago_lambda_mix_by_hand():
    # v = (1 - lambda) * V + lambda * z with V = 0.5, lambda = 0.25:
    # z = +1 (root, digit 1): 0.375 + 0.25 = 0.625;  z = -1 (digit 0): 0.375 - 0.25 = 0.125.
    game = TwoDigits()
    tree = game.run(rollout_lambda=0.25)
    assert tree.value[ROOT] == pytest.approx(0.625)
    for node in range(1, len(tree)):
        if tree.terminal[node]:
            assert tree.value[node] == -0.5  # terminal nodes keep their reward, never a rollout
            assert tree.rollout[node] is None
        elif tree.value[node] is not None:
            first = tree.tokens[node][0]
            assert tree.value[node] == pytest.approx(0.625 if first == 1 else 0.125)
            assert tree.rollout[node] is not None
    assert sorted(game.evaluated) == sorted(game.rolled)  # every new leaf: one value, one rollout
    stats = tree.stats
    assert stats.rollout_requests == len(game.rolled)
    assert stats.rollout_tokens == sum(len(tree.rollout[n].tokens) for n in range(len(tree)) if tree.rollout[n])
    # backup: the root's W is the sum of every value backed up through it
    assert tree.visits[ROOT] == 7


def test_lambda_one_never_asks_the_value_head():
    game = TwoDigits()

    def no_value_head(reqs):
        raise AssertionError("evaluate called at lambda = 1")

    tree = search([PROMPT], game.expand, no_value_head, game.reward, SearchSettings(simulations=6, parallel=1,
                  rollout_lambda=1.0), rollout=game.rollout).trees[0]
    assert tree.value[ROOT] == 1.0
    assert tree.stats.value_requests == 0 and tree.stats.rollout_requests >= 3


def test_lambda_zero_is_the_search_without_rollouts():
    game = TwoDigits()

    def no_rollout(reqs):
        raise AssertionError("rollout called at lambda = 0")

    a = search([PROMPT], game.expand, game.evaluate, game.reward, SearchSettings(simulations=6, parallel=2),
               rollout=no_rollout).trees[0]
    b = search([PROMPT], game.expand, game.evaluate, game.reward, SearchSettings(simulations=6, parallel=2)).trees[0]
    assert (a.visits, a.value_sum, a.value, a.tokens) == (b.visits, b.value_sum, b.value, b.tokens)
    assert all(r is None for r in a.rollout)


def test_best_pick_chooses_a_rollouts_finished_line():
    # Terminals score -0.5; the rollouts of digit-1 nodes (and the root's) finish with z = +1: the pick
    # is a node whose rollout has z = 1, the one with the most visits, then the earliest: the root.
    game = TwoDigits()
    tree = game.run(rollout_lambda=1.0)
    ex = extract(tree, SearchSettings(pick="best"))
    assert ex.nodes == (ROOT,) and ex.rollout is tree.rollout[ROOT] and ex.rollout.value == 1.0
    assert not ex.complete and ex.reward is None
    # a terminal above every rollout's z wins (on a tie the rollout's root, with more visits, would)
    game = TwoDigits(terminal_reward=2.0)
    tree = game.run(rollout_lambda=1.0)
    ex = extract(tree, SearchSettings(pick="best"))
    assert ex.complete and ex.reward == 2.0 and ex.rollout is None


def test_most_visited_path_ends_with_its_leafs_rollout():
    tree = TwoDigits().run(rollout_lambda=1.0, simulations=1)
    ex = extract(tree, SearchSettings(pick="visits"))
    assert len(ex.nodes) == 2 and not ex.complete
    assert ex.rollout is tree.rollout[ex.nodes[-1]]


def test_deferred_expansion_samples_a_leafs_steps_when_a_descent_returns_by_hand():
    # lambda 1, c 0.5, fpu 0. Round 0: the root is expanded (d0 prior .9, d1 .1) and rolled out (z +1).
    # 1: pUCT picks d0 (0.45 against 0.05); its rollout says z -1; it is NOT expanded.
    # 2: d0 scores -1 + 0.5 * .9 * sqrt(2) / 2 = -0.68, d1 0.07: d1 is rolled out, z +1.
    # 3: d1 again (1.04 against -0.61): valued and not expanded, so this descent expands it and backs
    #    nothing up. 4: through d1 to its first terminal child (reward -0.5): the third simulation.
    game = TwoDigits()
    expanded = []

    def expand(reqs):
        expanded.extend(r.node for r in reqs)
        return game.expand(reqs)

    cfg = SearchSettings(simulations=3, parallel=1, rollout_lambda=1.0, defer_expansion=True)
    tree = search([PROMPT], expand, game.evaluate, game.reward, cfg, rollout=game.rollout).trees[0]
    d0, d1 = tree.children[ROOT]
    assert game.rolled == [ROOT, d0, d1] and expanded == [ROOT, d1]
    assert not tree.expanded[d0] and tree.value[d0] == -1.0
    assert tree.visits[ROOT] == 4 and tree.visits[d1] == 2 and tree.value_sum[d1] == pytest.approx(0.5)
    assert tree.stats.simulations == 3 and tree.stats.expand_requests == 2 and tree.stats.widenings == 0
    # without deferring, each new leaf is expanded as it is rolled out: d0's steps are sampled and
    # never followed
    expanded.clear()
    game.rolled.clear()
    tree = search([PROMPT], expand, game.evaluate, game.reward, replace(cfg, defer_expansion=False),
                  rollout=game.rollout).trees[0]
    assert expanded[:3] == [ROOT, 1, 2] and not any(tree.visits[c] for c in tree.children[1])


@pytest.mark.parametrize("parallel", [1, 8])
def test_deferred_expansion_keeps_the_counts(parallel):
    # Every expanded node other than the root holds its rollout; N and W still add up.
    game = TwoDigits()
    cfg = SearchSettings(simulations=12, parallel=parallel, rollout_lambda=1.0, defer_expansion=True, widen_c=1.0,
                         c_puct=2.0)
    tree = search([PROMPT], game.expand, game.evaluate, game.reward, cfg, rollout=game.rollout).trees[0]
    assert tree.visits[ROOT] == tree.stats.simulations + 1 == 13
    for v in range(len(tree)):
        assert tree.virtual[v] == 0
        if tree.expanded[v]:
            assert v == ROOT or tree.rollout[v] is not None
            assert tree.visits[v] == 1 + sum(tree.visits[c] for c in tree.children[v])
            assert tree.value_sum[v] == pytest.approx(tree.value[v] + sum(tree.value_sum[c] for c in tree.children[v]))
    assert tree.stats.expand_requests == sum(tree.expansions)


def test_options_that_need_a_callable_refuse_to_run_without_it():
    game = TwoDigits()
    with pytest.raises(ValueError, match="rollout"):
        search([PROMPT], game.expand, game.evaluate, game.reward, SearchSettings(rollout_lambda=0.5))
    with pytest.raises(ValueError, match="step_key"):
        search([PROMPT], game.expand, game.evaluate, game.reward, SearchSettings(merge="canonical"))


def test_settings_refuse_bad_values():
    for bad in ({"rollout_lambda": 1.5}, {"rollout_lambda": -0.1}, {"rollout_lambda": math.nan},
                {"merge": "text"}):
        with pytest.raises(UsageError, match="search\\."):
            SearchSettings(**bad)
    assert SearchSettings().rollout_lambda == 0.0 and SearchSettings().merge == "tokens"


class Commuting:
    """The root proposes (a, b, STEP_END) steps with given log-probs; under `step_key` a step is its
    operand multiset, so (1, 2) and (2, 1) are one step. The last candidate is terminal."""

    CANDS = [((1, 2, STEP_END), math.log(0.4), False), ((2, 1, STEP_END), math.log(0.3), False),
             ((3, 3, STEP_END), math.log(0.2), False), ((2, 1, EOS), math.log(0.1), True)]

    def expand(self, reqs):
        return [[Candidate(t, lp, terminal=term, finish="eos" if term else "stop") for t, lp, term in self.CANDS]
                for _ in reqs]

    def evaluate(self, reqs):
        return [0.0] * len(reqs)

    def reward(self, reqs):
        return [0.0] * len(reqs)

    @staticmethod
    def step_key(tokens):
        return tuple(sorted(tokens[:2]))


def test_canonical_merge_on_a_toy_tree():
    toy = Commuting()
    cfg = SearchSettings(simulations=1, parallel=1, max_depth=1)
    plain = search([PROMPT], toy.expand, toy.evaluate, toy.reward, cfg).trees[0]
    assert len(plain.children[ROOT]) == 4  # four distinct token sequences
    merged = search([PROMPT], toy.expand, toy.evaluate, toy.reward, SearchSettings(simulations=1, parallel=1,
                    max_depth=1, merge="canonical"), step_key=toy.step_key).trees[0]
    kids = merged.children[ROOT]
    # (1,2) and (2,1) merge (first sample's tokens kept, priors 0.4 + 0.3); the terminal (2,1) does not
    assert [merged.tokens[c] for c in kids] == [(1, 2, STEP_END), (3, 3, STEP_END), (2, 1, EOS)]
    assert [merged.prior[c] for c in kids] == pytest.approx([0.7, 0.2, 0.1])
    assert [merged.count[c] for c in kids] == [2, 1, 1]


def test_countdown_canonical_step():
    same = ["4*5=20", "5*4=20", "4 * 5 = 20", " 5 *4= 20 "]
    assert {canonical_step(s) for s in same} == {"4*5=20"}
    tagged = ["<step>4*5=20 (7 20)</step>", "<step>5 * 4 = 20 (20 7)</step>", "\n<step>5*4=20 (20  7)</step>"]
    assert {canonical_step(s) for s in tagged} == {"<step>4*5=20 (7 20)</step>"}
    # order matters for - and /; different remaining numbers or a missing tag are different steps
    assert canonical_step("9-4=5") != canonical_step("4-9=5")
    assert canonical_step("8/2=4") != canonical_step("2/8=4")
    assert canonical_step("<step>4*5=20 (7 20)</step>") != canonical_step("<step>4*5=20 (3 20)</step>")
    assert canonical_step("<step>4*5=20 (7 20)") != canonical_step("<step>4*5=20 (7 20)</step>")
    assert canonical_step("<answer>(4*5)+7</answer>") == "<answer>(4*5)+7</answer>"
    assert canonical_step("free  text\nhere") == "free text here"
