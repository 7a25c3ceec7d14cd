"""Search options that spread a problem's search over more distinct answers, on toy trees (no model):
independent subtrees (DVTS) and answer-level novelty (`repeat_penalty`)."""

import math

import pytest

from treedistill.search import ROOT, Candidate, LeafRollout, SearchSettings, extract, pick_tree, search
from treedistill.search.tree import Tree

STEP_END, EOS, PROMPT = 99, 98, (100, 101)


class Arms:
    """Two first steps: `a` (token 0, prior 0.9) and `b` (token 1, prior 0.1); below them every node
    has the same two non-terminal steps, so lines never end inside the tree. A leaf's rollout ends the
    line at once (one EOS token): under `a` it always answers "A" with z = 0.5; under `b` it answers a
    new value every time with z = 0.3; the root's rollout answers "R" with z = 0. The answer of a line
    is read from its prefix only (the last token before EOS is the answer's id), as a caller's would be."""

    def __init__(self):
        self.rolled = 0
        self.answer_calls = []
        self.expanded = []

    def expand(self, reqs):
        self.expanded.append([(r.tree, r.node) for r in reqs])
        return [[Candidate((d, STEP_END), math.log(p)) for d, p in ((0, 0.9), (1, 0.1))] for r in reqs]

    def value(self, reqs):
        raise AssertionError("lambda = 1: the value head is never asked")

    def reward(self, reqs):
        raise AssertionError("no terminal node in this game")

    def rollout(self, reqs):
        out = []
        for r in reqs:
            first = r.completion[0] if r.completion else None
            self.rolled += 1
            answer = {None: 1000, 0: 1001}.get(first, 2000 + self.rolled)
            out.append(LeafRollout((answer, EOS), {None: 0.0, 0: 0.5}.get(first, 0.3)))
        return out

    def answer(self, reqs):
        self.answer_calls.append(len(reqs))
        return [r.prefix[-2] for r in reqs]  # the answer id the rollout wrote before EOS

    def run(self, **cfg):
        cfg = {"simulations": 24, "parallel": 1, "rollout_lambda": 1.0, "c_puct": 0.5, "max_depth": None, **cfg}
        return search([PROMPT], self.expand, self.value, self.reward, SearchSettings(**cfg), rollout=self.rollout,
                      answer=self.answer)


def first_step_visits(tree):
    return {tree.tokens[c][0]: tree.visits[c] for c in tree.children[ROOT]}


# --- answer-level novelty ------------------------------------------------------------------------

def test_repeated_answers_back_up_their_value_less_the_penalty_by_hand():
    # parallel 1: the root's rollout ("R", z = 0) is new; every later rollout under `a` repeats "A"
    # after the first. With penalty 1 each repeat backs up 0.5 - 1 = -0.5; rollouts under `b` are new
    # (0.3). So the root's W = 0 + 0.5 (first A) - 0.5 * (A repeats) + 0.3 * (b rollouts).
    game = Arms()
    tree = game.run(repeat_penalty=1.0).trees[0]
    under = {0: [], 1: []}
    for node in range(1, len(tree)):
        if tree.rollout[node] is not None:
            under[tree.completion(node)[0]].append(node)
    repeats_a = len(under[0]) - 1
    assert [tree.repeat[n] for n in under[0]].count(True) == repeats_a >= 1
    assert not any(tree.repeat[n] for n in under[1])
    assert tree.stats.repeats == repeats_a
    assert tree.value_sum[ROOT] == pytest.approx(0.0 + 0.5 - 0.5 * repeats_a + 0.3 * len(under[1]))
    # a line keeps its own value: the value and the rollout's z are the line's, unlowered
    assert all(tree.value[n] == tree.rollout[n].value == 0.5 for n in under[0])
    # one `answer` call per round that made a finished line (here: every round, one line each)
    assert game.answer_calls == [1] * (tree.stats.simulations + 1)


def test_the_penalty_steers_descents_to_steps_that_find_new_answers():
    plain, novel = Arms().run().trees[0], Arms().run(repeat_penalty=1.0).trees[0]
    # without the penalty the search stays under `a` (Q 0.5 > 0.3), with it under `b` (repeats at -0.5)
    assert first_step_visits(plain)[0] > first_step_visits(plain)[1]
    assert first_step_visits(novel)[1] > first_step_visits(novel)[0]
    assert len(novel.answers) > 2 * len({tree_answer(plain, n) for n in range(len(plain))} - {None})
    # the pick still reads what the lines are worth: the best line is an `a` rollout (z = 0.5)
    ex = extract(novel, SearchSettings(pick="best", rollout_lambda=1.0))
    assert ex.rollout is not None and ex.rollout.value == 0.5


def tree_answer(tree, node):
    roll = tree.rollout[node]
    return None if roll is None else roll.tokens[0]


def test_no_penalty_is_the_search_without_answers():
    game = Arms()
    a = game.run().trees[0]
    assert game.answer_calls == [] and not any(a.repeat) and a.answers == set()
    b = Arms().run(repeat_penalty=0.0).trees[0]
    assert [a.visits, a.value_sum, a.tokens] == [b.visits, b.value_sum, b.tokens]


def test_lines_without_an_answer_never_repeat():
    game = Arms()
    game.answer = lambda reqs: [None] * len(reqs)
    tree = search([PROMPT], game.expand, game.value, game.reward,
                  SearchSettings(simulations=12, parallel=1, rollout_lambda=1.0, repeat_penalty=1.0),
                  rollout=game.rollout, answer=game.answer).trees[0]
    assert not any(tree.repeat) and tree.stats.repeats == 0


def test_repeated_terminal_nodes_are_lowered_on_every_visit():
    # A bandit whose four arms are terminal; arms 0 and 1 hold the same answer. Arm 1 is created after
    # arm 0 in the same expansion, so it is the repeat: each visit backs up 0.4 - 0.5 = -0.1.
    def expand(reqs):
        return [[Candidate((a, EOS), math.log(0.25), terminal=True, finish="eos") for a in range(4)] for _ in reqs]

    rewards = (0.4, 0.4, 0.0, 0.1)
    tree = search([PROMPT], expand, lambda reqs: [0.0] * len(reqs),
                  lambda reqs: [rewards[r.completion[0]] for r in reqs],
                  SearchSettings(simulations=40, parallel=1, repeat_penalty=0.5),
                  answer=lambda reqs: ["same" if r.completion[0] < 2 else r.completion[0] for r in reqs]).trees[0]
    arm = {tree.tokens[c][0]: c for c in tree.children[ROOT]}
    assert tree.repeat[arm[1]] and not tree.repeat[arm[0]] and tree.value[arm[1]] == 0.4
    assert tree.visits[arm[1]] >= 1
    assert tree.value_sum[arm[1]] == pytest.approx(-0.1 * tree.visits[arm[1]])
    assert tree.visits[arm[0]] > tree.visits[arm[1]]


def test_penalty_needs_an_answer_callable_and_a_sane_value():
    game = Arms()
    with pytest.raises(ValueError, match="answer"):
        search([PROMPT], game.expand, game.value, game.reward,
               SearchSettings(rollout_lambda=1.0, repeat_penalty=1.0), rollout=game.rollout)
    from treedistill.errors import UsageError

    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(UsageError, match="repeat_penalty"):
            SearchSettings(repeat_penalty=bad)


# --- independent subtrees ------------------------------------------------------------------------

def test_subtrees_split_the_simulations_and_run_in_one_lock_step():
    game = Arms()
    result = game.run(simulations=10, subtrees=3, parallel=2)
    assert len(result.trees) == 3 and result.subtrees == 3 and result.of_prompt(0) == result.trees
    # 10 = 4 + 3 + 3, the first tree one more; every root expanded in the first call
    assert [t.stats.simulations for t in result.trees] == [4, 3, 3]
    assert [t.visits[ROOT] for t in result.trees] == [5, 4, 4]
    assert [(t.index, t.subtree) for t in result.trees] == [(0, 0), (0, 1), (0, 2)]
    assert game.expanded[0] == [(0, ROOT)] * 3  # the requests carry the prompt's index
    # one expand call per round for all trees: ceil(4 / 2) rounds after the roots'
    assert len(game.expanded) == result.stats.expand_calls == 1 + 2


def test_subtrees_of_several_prompts_are_prompt_major():
    game = Arms()
    result = search([PROMPT, PROMPT + (7,)], game.expand, game.value, game.reward,
                    SearchSettings(simulations=4, subtrees=2, parallel=1, rollout_lambda=1.0), rollout=game.rollout)
    assert [(t.index, t.subtree) for t in result.trees] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(t.prompt == PROMPT + (7,) for t in result.of_prompt(1))
    assert all(t.stats.simulations == 2 for t in result.trees)


def test_one_subtree_is_the_one_tree_search_and_the_others_draw_their_own_gumbel():
    game = Arms()
    one = game.run(select="gumbel", seed=3).trees[0]
    first, second = game.run(select="gumbel", seed=3, subtrees=2, simulations=48).trees
    # subtree 0 draws from the one-tree search's Gumbel stream; subtree 1 from its own
    assert [one.gumbel[c] for c in one.children[ROOT]] == [first.gumbel[c] for c in first.children[ROOT]]
    assert [first.gumbel[c] for c in first.children[ROOT]] != [second.gumbel[c] for c in second.children[ROOT]]
    assert first.stats.simulations == second.stats.simulations == 24


def test_more_subtrees_than_simulations_leaves_some_trees_at_their_root():
    result = Arms().run(simulations=2, subtrees=3)
    assert [t.stats.simulations for t in result.trees] == [1, 1, 0]
    assert result.trees[2].visits[ROOT] == 1 and result.trees[2].rollout[ROOT] is not None


def _tree_with_line(value, visits=1):
    """A root with one rollout leaf whose line is worth `value`, visited `visits` times."""
    tree = Tree(PROMPT)
    child = tree.add_node(ROOT, (0, STEP_END), 0.0, 1.0, terminal=False, finish="stop")
    tree.rollout[child] = LeafRollout((EOS,), value)
    tree.value[child] = value
    for _ in range(visits):
        tree.add_virtual([ROOT, child])
        tree.backup([ROOT, child], value)
    return tree


def test_pick_tree_by_hand():
    best = SearchSettings(pick="best")
    low, high, tie = _tree_with_line(0.2, visits=3), _tree_with_line(0.7), _tree_with_line(0.7)
    assert pick_tree([low, high, tie], best) is high            # the best line; ties: the first tree
    assert pick_tree([low, _tree_with_line(0.2, visits=5)], best) is not low  # same value: more visits
    # "visits": the tree whose root has the highest mean value (0.2 * 3 / 4 = 0.15 against 0.35)
    assert pick_tree([low, high], SearchSettings(pick="visits")) is high
    bare = Tree(PROMPT)
    assert pick_tree([bare], best) is bare
    with pytest.raises(ValueError):
        pick_tree([], best)


def test_a_prompts_subtrees_share_their_answers():
    # Every subtree's first rollout under `a` answers "A"; with one answer set per prompt only the
    # first "A" of all three trees is new, and only one root rollout ("R") is.
    game = Arms()
    trees = game.run(subtrees=3, simulations=24, repeat_penalty=1.0).trees
    assert trees[0].answers is trees[1].answers is trees[2].answers
    lines = [(t, n) for t in trees for n in range(len(t)) if t.rollout[n] is not None]
    by_answer: dict = {}
    for t, n in lines:
        by_answer.setdefault(t.rollout[n].tokens[0], []).append(t.repeat[n])
    assert by_answer[1000].count(False) == 1 and len(by_answer[1000]) == 3   # the three roots' "R"
    assert by_answer[1001].count(False) == 1 and len(by_answer[1001]) >= 2   # "A", found by several trees
    assert sum(t.stats.repeats for t in trees) == sum(len(v) - 1 for v in by_answer.values())
    assert trees[0].answers == set(by_answer)
    # two prompts keep two answer sets
    two = search([PROMPT, PROMPT + (7,)], game.expand, game.value, game.reward,
                 SearchSettings(simulations=4, subtrees=2, parallel=1, rollout_lambda=1.0, repeat_penalty=1.0),
                 rollout=game.rollout, answer=game.answer)
    assert two.trees[0].answers is two.trees[1].answers is not two.trees[2].answers


def test_same_seed_same_subtrees():
    a = Arms().run(subtrees=2, select="gumbel", seed=5, repeat_penalty=0.5).trees
    b = Arms().run(subtrees=2, select="gumbel", seed=5, repeat_penalty=0.5).trees
    assert [(t.visits, t.value_sum) for t in a] == [(t.visits, t.value_sum) for t in b]


def test_subtrees_setting_is_checked():
    from treedistill.errors import UsageError

    with pytest.raises(UsageError, match="subtrees"):
        SearchSettings(subtrees=0)
