"""The search core on toy problems with known answers, driven by fake expand / evaluate / reward
callables (no model): bandits, a 3-step digit game, invariants of the counts, parallel rounds,
batching across trees, determinism, and a cost-per-simulation benchmark helper."""

import math
import subprocess
import sys

import pytest

from treedistill.errors import UsageError
from treedistill.search import ROOT, Candidate, SearchSettings, extract, search

STEP_END, EOS, PROMPT = 99, 98, (100, 101)


class DigitGame:
    """Write 3 digits, one per step; the optimum is `target`. A step is (d, STEP_END), the third
    (d, EOS) and terminal. Reward = 2 * matches / 3 - 1, so only `target` scores 1.0. The prior
    prefers digit 0 (log-probs log .6, .3, .1 for digits 0, 1, 2): misleading for the target 2 0 1.
    The value head says 0 (uninformative) unless `informative`. Records every call."""

    def __init__(self, target=(2, 0, 1), informative=False, duplicates=False, probs=(0.6, 0.3, 0.1)):
        self.target, self.informative, self.duplicates = target, informative, duplicates
        self.probs = probs
        self.expanded, self.evaluated, self.rewarded = [], [], []
        self.expand_calls, self.evaluate_calls, self.reward_calls = [], [], []

    @staticmethod
    def digits(req):
        return req.completion[::2]

    def matches(self, digits):
        return sum(a == b for a, b in zip(digits, self.target))

    def expand(self, reqs):
        self.expand_calls.append([(r.tree, r.node) for r in reqs])
        out = []
        for r in reqs:
            self.expanded.append((r.tree, r.node, self.digits(r)))
            last = len(self.digits(r)) == 2
            probs = self.probs if not self.duplicates else (*self.probs, self.probs[0])
            digits = (0, 1, 2) if not self.duplicates else (0, 1, 2, 0)
            out.append([Candidate((d, EOS if last else STEP_END), math.log(p), terminal=last,
                                  finish="eos" if last else "stop") for d, p in zip(digits, probs)])
        return out

    def evaluate(self, reqs):
        self.evaluate_calls.append([(r.tree, r.node) for r in reqs])
        self.evaluated.extend((r.tree, r.node, self.digits(r)) for r in reqs)
        return [(self.matches(self.digits(r)) / 3 if self.informative else 0.0) for r in reqs]

    def reward(self, reqs):
        self.reward_calls.append([(r.tree, r.node) for r in reqs])
        self.rewarded.extend((r.tree, r.node, self.digits(r)) for r in reqs)
        return [2 * self.matches(self.digits(r)) / 3 - 1 for r in reqs]

    def run(self, n_trees=1, **cfg):
        return search([PROMPT] * n_trees, self.expand, self.evaluate, self.reward, SearchSettings(**cfg))


class Bandit:
    """One step: K terminal arms with fixed rewards; the prior prefers the worst arms."""

    def __init__(self, rewards=(0.2, -0.1, 0.0, 0.8), priors=(0.4, 0.3, 0.2, 0.1)):
        self.rewards, self.priors = rewards, priors

    def expand(self, reqs):
        return [[Candidate((a, EOS), math.log(p), terminal=True, finish="eos")
                 for a, p in enumerate(self.priors)] for _ in reqs]

    def evaluate(self, reqs):
        return [0.0] * len(reqs)

    def reward(self, reqs):
        return [self.rewards[r.completion[0]] for r in reqs]


def snapshot(tree):
    """(parent, step tokens, N, W rounded) per node: the golden-tree format."""
    return [(tree.parent[i], tree.tokens[i], tree.visits[i], round(tree.value_sum[i], 4))
            for i in range(len(tree))]


def check_invariants(tree, cfg):
    """For every expanded node: N(v) = 1 + sum N(children) (its own value-head evaluation plus the
    simulations that went on below) and W(v) = value(v) + sum W(children); leaves (terminal, at
    max depth, or never selected) have no children; N(root) = simulations + 1; nothing in flight."""
    assert tree.visits[ROOT] == tree.stats.simulations + 1 == cfg.simulations + 1
    for v in range(len(tree)):
        assert tree.virtual[v] == 0
        kids = tree.children[v]
        if tree.expanded[v]:
            assert not tree.terminal[v] and tree.depth[v] < cfg.max_depth
            assert tree.visits[v] == 1 + sum(tree.visits[c] for c in kids)
            assert tree.value_sum[v] == pytest.approx(tree.value[v] + sum(tree.value_sum[c] for c in kids))
            assert sum(tree.prior[c] for c in kids) == pytest.approx(1.0)
        else:
            assert kids == []
            if tree.visits[v]:  # every visit of a leaf backed up its cached value
                assert tree.value_sum[v] == pytest.approx(tree.visits[v] * tree.value[v])


# --- (b) toy problems with known answers --------------------------------------------------------

@pytest.mark.parametrize("rule", ["puct", "uct", "gumbel"])
def test_bandit_best_arm(rule):
    bandit = Bandit()
    cfg = SearchSettings(simulations=64, parallel=1, select=rule)
    tree = search([PROMPT], bandit.expand, bandit.evaluate, bandit.reward, cfg).trees[0]
    ex = extract(tree, cfg)
    assert ex.steps == ((3, EOS),) and ex.complete and ex.reward == 0.8


@pytest.mark.parametrize("seed", range(5))
def test_gumbel_root_picks_best_arm_with_enough_simulations(seed):
    # The Gumbel root acts by argmax of g + log P + completed Q among the most-visited arms, with
    # completed Q rescaled to [0, 1] and scaled by (50 + max N) * 0.1. With 32 simulations that
    # scale is 6.2: the best arm's Q edge over arm 1, 6.2 * (0.9 - 0.3) / 1.4 = 2.66, minus its
    # prior handicap log(.3 / .05) = 1.79 leaves 0.87, which a Gumbel difference often exceeds (the
    # final action is a sample of the improved policy, by design). With 200 simulations the scale is
    # (50 + 125) * 0.1 = 17.5: edge 7.5 - 1.79 = 5.7, beaten with probability ~e^-5.7 = 0.3%.
    bandit = Bandit(rewards=(0.1, 0.3, -0.5, 0.9), priors=(0.5, 0.3, 0.15, 0.05))
    cfg = SearchSettings(simulations=200, parallel=4, select="gumbel", seed=seed)
    tree = search([PROMPT], bandit.expand, bandit.evaluate, bandit.reward, cfg).trees[0]
    assert extract(tree, cfg).steps == ((3, EOS),)
    # Sequential Halving's schedule (mctx): 4 arms x int(200 / (2 * 4)) = 25 visits, then the best
    # two share the rest, int(200 / (2 * 2)) = 50 more each per round of the last phase.
    visits = sorted(tree.visits[c] for c in tree.children[ROOT])
    assert visits == [25, 25, 75, 75]


@pytest.mark.parametrize("rule,parallel,informative",
                         [("puct", 1, False), ("puct", 4, False), ("uct", 1, False), ("gumbel", 4, True)])
def test_digit_game_finds_the_optimum(rule, parallel, informative):
    # Gumbel needs an informative value head: below the root its deterministic rule follows
    # softmax(log P + completed Q), and with a value head stuck at 0 the first visited child (Q > 0)
    # outranks the unvisited ones, completed by a mixed value pulled toward 0, so it never looks aside.
    game = DigitGame(informative=informative)
    res = game.run(simulations=200, parallel=parallel, select=rule, max_depth=3)
    ex = extract(res.trees[0], SearchSettings(select=rule))
    assert ex.complete and ex.reward == pytest.approx(1.0)
    assert [s[0] for s in ex.steps] == [2, 0, 1]


# Golden tree: DigitGame (informative value), pUCT, W = 2, 10 simulations, default virtual loss (1.0).
# Regenerate only on a deliberate change of the search: print(snapshot(DigitGame(informative=True).run(
#     simulations=10, parallel=2, max_depth=3).trees[0])) and paste it here.
GOLDEN = [
    (-1, (), 11, 1.3333),
    (0, (0, 99), 5, 0.3333), (0, (1, 99), 3, -0.0), (0, (2, 99), 2, 1.0),
    (1, (0, 99), 3, 0.3333), (1, (1, 99), 1, 0.0), (1, (2, 99), 0, 0.0),
    (2, (0, 99), 2, -0.0), (2, (1, 99), 0, 0.0), (2, (2, 99), 0, 0.0),
    (4, (0, 98), 1, -0.3333), (4, (1, 98), 1, 0.3333), (4, (2, 98), 0, 0.0),
    (7, (0, 98), 1, -0.3333), (7, (1, 98), 0, 0.0), (7, (2, 98), 0, 0.0),
    (5, (0, 98), 0, 0.0), (5, (1, 98), 0, 0.0), (5, (2, 98), 0, 0.0),
    (3, (0, 99), 1, 0.6667), (3, (1, 99), 0, 0.0), (3, (2, 99), 0, 0.0),
    (19, (0, 98), 0, 0.0), (19, (1, 98), 0, 0.0), (19, (2, 98), 0, 0.0),
]


def test_golden_tree_snapshot():
    tree = DigitGame(informative=True).run(simulations=10, parallel=2, max_depth=3).trees[0]
    assert snapshot(tree) == GOLDEN


@pytest.mark.parametrize("rule", ["puct", "uct", "gumbel"])
@pytest.mark.parametrize("parallel", [1, 3, 16])
@pytest.mark.parametrize("virtual_loss", [0.0, 1.0])
def test_counts_add_up_and_nothing_left_in_flight(rule, parallel, virtual_loss):
    game = DigitGame(informative=True)
    cfg = dict(simulations=37, parallel=parallel, select=rule, max_depth=3, virtual_loss=virtual_loss)
    for tree in game.run(n_trees=2, **cfg).trees:
        check_invariants(tree, SearchSettings(**cfg))


def test_max_depth_leaves_are_evaluated_never_expanded():
    game = DigitGame(informative=True)
    cfg = SearchSettings(simulations=40, parallel=2, max_depth=2)
    tree = search([PROMPT], game.expand, game.evaluate, game.reward, cfg).trees[0]
    check_invariants(tree, cfg)
    assert all(len(digits) < 2 for _, _, digits in game.expanded)
    assert max(tree.depth) == 2 and not any(tree.terminal)
    deep = [v for v in range(len(tree)) if tree.depth[v] == 2 and tree.visits[v]]
    assert deep and all(tree.value[v] == pytest.approx(game.matches(tree.completion(v)[::2]) / 3)
                        for v in deep)
    # each max-depth leaf was evaluated once, however often it was visited
    evaluated = [n for _, n, d in game.evaluated if len(d) == 2]
    assert sorted(evaluated) == sorted(set(evaluated)) == sorted(deep)
    assert not extract(tree, cfg).complete


def test_terminal_nodes_never_expanded_nor_valued_by_the_value_head():
    game = DigitGame(informative=True)
    tree = game.run(simulations=80, parallel=4, max_depth=3).trees[0]
    terminals = {v for v in range(len(tree)) if tree.terminal[v]}
    assert terminals and tree.stats.reward_requests == len(terminals)
    assert not terminals & {n for _, n, _ in game.expanded}
    assert not terminals & {n for _, n, _ in game.evaluated}
    # rewarded once each, at creation, and that reward is what every visit backed up
    assert sorted(n for _, n, _ in game.rewarded) == sorted(terminals)
    for v in terminals:
        assert tree.value[v] == pytest.approx(2 * game.matches(tree.completion(v)[::2]) / 3 - 1)
        assert not tree.expanded[v] and tree.children[v] == []


def test_duplicate_siblings_are_merged_and_priors_add_up():
    game = DigitGame(duplicates=True)  # candidates 0, 1, 2, 0 with probs .6 .3 .1 .6
    tree = game.run(simulations=5, parallel=1, max_depth=3).trees[0]
    kids = tree.children[ROOT]
    assert [tree.tokens[c][0] for c in kids] == [0, 1, 2]
    # softmax of log(.6, .3, .1, .6) = (.6, .3, .1, .6) / 1.6; digit 0 gets (.6 + .6) / 1.6 = .75
    assert [tree.prior[c] for c in kids] == pytest.approx([0.75, 0.3 / 1.6, 0.1 / 1.6])
    assert [tree.count[c] for c in kids] == [2, 1, 1]


def test_mean_prior_option_uses_length_normalised_logprobs():
    def expand(reqs):  # a 1-token step at log-prob -1 and a 4-token step at -2 (-0.5 per token)
        return [[Candidate((1, EOS), -1.0, True), Candidate((2, 3, 4, EOS), -2.0, True)] for _ in reqs]

    def zeros(reqs):
        return [0.0] * len(reqs)

    for prior, (p_short, p_long) in {"sum": (-1.0, -2.0), "mean": (-0.5, -0.5)}.items():
        tree = search([PROMPT], expand, zeros, zeros, SearchSettings(simulations=1, prior=prior)).trees[0]
        z = math.exp(p_short) + math.exp(p_long)
        assert [tree.prior[c] for c in tree.children[ROOT]] == pytest.approx(
            [math.exp(p_short) / z, math.exp(p_long) / z])


# --- parallel rounds ----------------------------------------------------------------------------

def test_first_round_descends_distinct_paths():
    # Uniform prior (4 arms at .25): virtual visits alone push each descent to a new child.
    game = Bandit(rewards=(0, 0, 0, 0), priors=(0.25,) * 4)
    calls = []

    def expand(reqs):
        calls.append([r.node for r in reqs])
        return [[Candidate((a, STEP_END), math.log(0.25)) for a in range(4)] for _ in reqs]

    res = search([PROMPT], expand, game.evaluate, game.reward, SearchSettings(simulations=8, parallel=4))
    assert calls[0] == [ROOT] and sorted(calls[1]) == sorted(res.trees[0].children[ROOT])
    assert res.trees[0].stats.collisions == 0


def test_virtual_loss_spreads_descents_under_a_peaked_prior():
    # Prior .7/.1/.1/.1: without virtual loss the 2nd descent prefers the in-flight child again
    # (0.5*.7*1/2 = .175 > 0.5*.1*1/1 = .05): a collision; a virtual loss of 1 lowers its Q by 1.
    def run(vl):
        calls = []

        def expand(reqs):
            calls.append([r.node for r in reqs])
            return [[Candidate((a, STEP_END), math.log(p)) for a, p in enumerate((0.7, 0.1, 0.1, 0.1))]
                    for _ in reqs]

        res = search([PROMPT], expand, lambda r: [0.0] * len(r), lambda r: [0.0] * len(r),
                     SearchSettings(simulations=4, parallel=4, virtual_loss=vl, max_depth=5))
        return calls, res.trees[0]

    calls, tree = run(1.0)
    assert len(calls[1]) == 4 and tree.stats.collisions == 0
    calls, tree = run(0.0)
    assert len(calls[1]) < 4 and tree.stats.collisions > 0
    check_invariants(tree, SearchSettings(simulations=4, max_depth=5))


def test_uct_visits_every_root_child_before_going_deeper_puct_does_not():
    def first_expansions(rule):
        game = DigitGame(probs=(0.7, 0.2, 0.1))
        game.run(simulations=4, parallel=1, select=rule, max_depth=3)
        return [d for _, _, d in game.expanded]

    assert first_expansions("uct")[:4] == [(), (0,), (1,), (2,)]
    # pUCT (c = .5, all values 0): 2nd descent, N_root = 2: the visited .7 child scores
    # .5*.7*sqrt(2)/2 = .247 > .5*.2*sqrt(2)/1 = .141 for the .2 child, so it goes deeper;
    # 3rd, N_root = 3: .5*.7*sqrt(3)/3 = .202 > .5*.2*sqrt(3) = .173, deeper again.
    assert first_expansions("puct")[:3] == [(), (0,), (0, 0)]


def test_one_batched_call_per_round_whatever_the_number_of_trees():
    rounds = {}
    for n_trees in (1, 5):
        game = DigitGame(informative=True)
        res = game.run(n_trees=n_trees, simulations=24, parallel=4, max_depth=3)
        stats = res.stats
        # one call for the roots, then at most one per round (none when no leaf needs it)
        assert len(game.expand_calls) == stats.expand_calls <= stats.rounds + 1
        assert len(game.evaluate_calls) == stats.value_calls <= stats.rounds + 1
        assert len(game.reward_calls) == stats.reward_calls <= stats.rounds + 1
        assert all(t.stats.simulations == 24 for t in res.trees)
        rounds[n_trees] = (stats.rounds, stats.expand_calls, stats.value_calls)
        if n_trees == 5:  # lock-step: identical trees, so every call carries a leaf of every tree
            assert all({t for t, _ in call} == set(range(5)) for call in game.expand_calls)
            assert all({t for t, _ in call} == set(range(5)) for call in game.evaluate_calls)
    assert rounds[5] == rounds[1]


def test_batched_equals_unbatched():
    cfg = dict(simulations=30, parallel=3, select="gumbel", max_depth=3, seed=7)
    together = DigitGame(informative=True).run(n_trees=3, **cfg).trees
    alone = DigitGame(informative=True).run(n_trees=1, **cfg).trees[0]
    assert snapshot(together[0]) == snapshot(alone)
    # trees differ only through their Gumbel draws: tree 1 draws from its own stream
    assert together[1].gumbel[1:4] != together[0].gumbel[1:4]


@pytest.mark.parametrize("rule", ["puct", "uct", "gumbel"])
def test_same_seed_same_tree(rule):
    cfg = dict(simulations=50, parallel=4, select=rule, max_depth=3, seed=3)
    a = DigitGame(informative=True).run(**cfg).trees[0]
    b = DigitGame(informative=True).run(**cfg).trees[0]
    assert snapshot(a) == snapshot(b) and a.gumbel == b.gumbel
    c = DigitGame(informative=True).run(**{**cfg, "seed": 4}).trees[0]
    assert c.gumbel != a.gumbel


def test_budget_exact_and_accounting():
    game = DigitGame(informative=True)
    res = game.run(n_trees=2, simulations=33, parallel=5, max_depth=3)
    for tree in res.trees:
        s = tree.stats
        assert s.simulations == 33 and s.nodes == len(tree) and s.max_depth == 3
        assert s.expand_requests == sum(tree.expanded) == sum(1 for t, *_ in game.expanded if t == tree.index)
        assert s.value_requests == sum(1 for t, *_ in game.evaluated if t == tree.index)
        # prefixes: prompt (2 tokens) + 2 tokens per step of depth; 3 candidates of 2 tokens per expand
        sent = [v for v in range(len(tree)) if tree.value[v] is not None and not tree.terminal[v]]
        assert s.request_tokens == sum(2 + 2 * tree.depth[v] for v in sent) * 2 - sum(
            2 + 2 * tree.depth[v] for v in sent if not tree.expanded[v])
        assert s.step_tokens == 3 * 2 * s.expand_requests
    assert 0 <= res.stats.callback_s <= res.stats.wall_s and res.stats.bookkeeping_s >= 0


# --- bad input ----------------------------------------------------------------------------------

def test_bad_callables_and_config_fail_clearly():
    game = DigitGame()
    with pytest.raises(ValueError, match="value returned 0 results for 1"):
        search([PROMPT], game.expand, lambda r: [], game.reward, SearchSettings(simulations=2))
    with pytest.raises(ValueError, match="no candidate"):
        search([PROMPT], lambda r: [[] for _ in r], game.evaluate, game.reward)
    with pytest.raises(ValueError, match="non-finite"):
        search([PROMPT], game.expand, lambda r: [float("nan")] * len(r), game.reward)
    with pytest.raises(UsageError, match="select must be one of"):
        SearchSettings(select="ucb")
    with pytest.raises(UsageError, match="simulations must be >= 1"):
        SearchSettings(simulations=0)


def test_search_imports_neither_torch_nor_transformers():
    code = ("import sys, treedistill.search; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- cost per simulation (a benchmark helper, printed, not a timing assertion) ------------------

def bench_cost_per_simulation(simulations, parallel=16, k=4, select="puct"):
    """Search bookkeeping (wall time minus time in the callbacks) on one tree with trivial callbacks:
    an endless game (no terminal step), K distinct steps per node, pseudo-random values. Returns
    (seconds per simulation, seconds per edge walked by selection, result): a simulation walks one
    path, so its cost grows with the path's depth only, never with the number of nodes."""

    def expand(reqs):
        return [[Candidate((len(r.prefix) % 7, a, STEP_END), -0.5 * (a + 1)) for a in range(k)]
                for r in reqs]

    def evaluate(reqs):
        return [((hash(r.prefix) % 2001) - 1000) / 1000 for r in reqs]

    cfg = SearchSettings(simulations=simulations, parallel=parallel, max_depth=64, select=select)
    res = search([PROMPT], expand, evaluate, evaluate, cfg)
    book = res.stats.bookkeeping_s
    return book / simulations, book / max(res.trees[0].stats.selections, 1), res


def test_cost_per_simulation_benchmark(capsys):
    lines = []
    for select in ("puct", "gumbel"):
        for sims in (16, 1600):
            per_sim, per_edge, res = bench_cost_per_simulation(sims, select=select)
            tree = res.trees[0]
            assert tree.stats.simulations == sims
            lines.append(f"{select:6s} {sims:5d} sims: {per_sim * 1e6:6.1f} us/simulation, "
                         f"{per_edge * 1e6:5.1f} us/edge walked, {tree.stats.selections / sims:4.1f} edges/simulation, "
                         f"{len(tree)} nodes, depth {tree.stats.max_depth}")
    with capsys.disabled():
        print("\nsearch bookkeeping (trivial callbacks, W=16, K=4):\n" + "\n".join(lines))


# --- progressive widening -----------------------------------------------------------------------

class Batches:
    """One step from the root: each `expand` call at a node returns the next batch of arms from
    `batches` (cycling), every arm a terminal step (a, EOS) with log-prob log(probs[a]) and reward
    rewards[a]: a sampled policy whose later samples reveal arms the first batch missed."""

    def __init__(self, batches, rewards, probs):
        self.batches, self.rewards, self.probs = batches, rewards, probs
        self.calls = 0

    def expand(self, reqs):
        out = []
        for _ in reqs:
            batch = self.batches[self.calls % len(self.batches)]
            self.calls += 1
            out.append([Candidate((a, EOS), math.log(self.probs[a]), terminal=True, finish="eos") for a in batch])
        return out

    def evaluate(self, reqs):
        return [0.0] * len(reqs)

    def reward(self, reqs):
        return [self.rewards[r.completion[0]] for r in reqs]


def test_widening_is_off_by_default_each_node_expanded_once():
    game = DigitGame(informative=True)
    tree = game.run(simulations=60, parallel=4, max_depth=3).trees[0]
    assert SearchSettings().widen_c == 0
    assert set(tree.expansions) <= {0, 1} and tree.stats.widenings == 0
    assert all(tree.sampled[v] == 3 * tree.expansions[v] for v in range(len(tree)))


def test_widening_priors_are_the_mean_of_the_batches_and_merge_repeats():
    # Root batches: (0, 1) at probs .1 .1, then (1, 2) at .1 .4 (softmax .2, .8). widen_c = 2: N(root)
    # = 2 after one simulation, 2 samples < 2 * sqrt(2): widened once; then 4 >= 2 * sqrt(N) until N = 4.
    game = Batches([(0, 1), (1, 2)], rewards=(0.0, 0.0, 0.0), probs=(0.1, 0.1, 0.4))
    cfg = SearchSettings(simulations=2, parallel=1, widen_c=2.0)
    res = search([PROMPT], game.expand, game.evaluate, game.reward, cfg)
    tree = res.trees[0]
    kids = tree.children[ROOT]
    assert [tree.tokens[c][0] for c in kids] == [0, 1, 2]
    # batch 1: (.5, .5); batch 2: softmax(log .1, log .4) = (.2, .8); mean: 0: .25, 1: .25 + .1, 2: .4
    assert [tree.prior[c] for c in kids] == pytest.approx([0.25, 0.35, 0.4])
    assert [tree.count[c] for c in kids] == [1, 2, 1]
    assert tree.expansions[ROOT] == 2 and tree.sampled[ROOT] == 4 and tree.stats.widenings == 1
    assert res.stats.expand_calls == 2 and res.stats.value_calls == 1  # the widening round evaluates nothing
    assert tree.stats.simulations == 2 and tree.visits[ROOT] == 3


@pytest.mark.parametrize("parallel", [1, 4])
def test_widening_finds_an_arm_the_first_sample_missed(parallel):
    # The best arm (3, reward .9, prior .05) first appears in the third batch of samples. The arms
    # seen first score below the first-play value 0, so pUCT tries a new arm once it exists.
    batches = [(0, 0, 1, 2), (0, 1, 0, 2), (3, 0, 1, 0), (1, 2, 0, 0)]
    rewards, probs = (-0.1, -0.2, -0.3, 0.9), (0.5, 0.25, 0.2, 0.05)

    def best(widen_c):
        game = Batches(batches, rewards, probs)
        cfg = SearchSettings(simulations=64, parallel=parallel, widen_c=widen_c)
        tree = search([PROMPT], game.expand, game.evaluate, game.reward, cfg).trees[0]
        return tree, tree.tokens[extract(tree, cfg).nodes[1]][0]

    tree, arm = best(0.0)
    assert arm == 0 and len(tree.children[ROOT]) == 3
    tree, arm = best(2.0)
    assert arm == 3 and len(tree.children[ROOT]) == 4
    assert tree.visits[tree.children[ROOT][-1]] > max(tree.visits[c] for c in tree.children[ROOT][:-1])


@pytest.mark.parametrize("rule", ["puct", "uct", "gumbel"])
@pytest.mark.parametrize("parallel", [1, 3, 16])
def test_widening_keeps_the_counts_and_follows_its_schedule(rule, parallel):
    # Each expand samples 3 of 5 digits in a pattern that shifts with the call, so widening adds steps.
    calls = []

    def expand(reqs):
        out = []
        for r in reqs:
            calls.append(r.node)
            last = len(r.completion) == 4
            ds = [(len(calls) + j) % 5 for j in (0, 1, 3)]
            out.append([Candidate((d, EOS if last else STEP_END), -0.3 * (d + 1), terminal=last,
                                  finish="eos" if last else "stop") for d in ds])
        return out

    def value(reqs):
        return [((sum(r.completion) * 7) % 11 - 5) / 5 for r in reqs]

    cfg = SearchSettings(simulations=120, parallel=parallel, select=rule, max_depth=3, widen_c=2.0, widen_alpha=0.5)
    tree = search([PROMPT], expand, value, value, cfg).trees[0]
    check_invariants(tree, cfg)
    assert tree.stats.widenings == sum(max(e - 1, 0) for e in tree.expansions) > 0
    assert all(tree.sampled[v] == 3 * tree.expansions[v] for v in range(len(tree)))
    for v in range(len(tree)):
        if tree.expansions[v] > 1:  # widened only while its samples were under 2 * sqrt(N)
            assert tree.sampled[v] - 3 < 2.0 * tree.visits[v] ** 0.5
    if rule == "gumbel":
        assert tree.expansions[ROOT] == 1  # Sequential Halving's action set stays fixed
    else:  # every descent passes the root: it is widened up to the schedule, within one round's descents
        assert tree.expansions[ROOT] > 1
        assert tree.sampled[ROOT] >= 2.0 * (tree.visits[ROOT] - parallel) ** 0.5


def test_widening_settings_are_checked():
    with pytest.raises(UsageError, match="widen_c must be >= 0"):
        SearchSettings(widen_c=-1.0)
    with pytest.raises(UsageError, match="widen_alpha must be >= 0"):
        SearchSettings(widen_alpha=-0.5)


# --- known leaves under parallel descents -------------------------------------------------------

def test_a_known_leaf_is_reached_by_one_descent_per_round():
    # Four terminal arms and W = 8: each round backs up each arm at most once; the rest collide.
    bandit = Bandit()
    cfg = SearchSettings(simulations=40, parallel=8)
    tree = search([PROMPT], bandit.expand, bandit.evaluate, bandit.reward, cfg).trees[0]
    check_invariants(tree, cfg)
    assert all(tree.visits[c] <= tree.stats.rounds for c in tree.children[ROOT])
    assert tree.stats.collisions > 0 and tree.stats.rounds >= 40 // 4
    # every collision here is on a known leaf, which ends the round: one collision per round at most
    assert tree.stats.collisions <= tree.stats.rounds
    assert tree.tokens[extract(tree, cfg).nodes[1]][0] == 3  # the best arm, reward .8


class BadTerminal:
    """Root: a terminal step (reward -0.3, prior .4) beside three steps that lead, one more step on,
    to terminal answers worth 0.2 (value head 0.2 there too). With W = 8 parallel descents the
    in-flight visits push descents off the pending steps; the bad terminal must not collect them."""

    def expand(self, reqs):
        out = []
        for r in reqs:
            if r.depth == 0:
                out.append([Candidate((9, EOS), math.log(0.4), terminal=True, finish="eos")]
                           + [Candidate((a, STEP_END), math.log(0.2)) for a in range(3)])
            else:
                out.append([Candidate((a, EOS), math.log(0.25), terminal=True, finish="eos") for a in range(4)])
        return out

    def evaluate(self, reqs):
        return [0.2 if r.depth else 0.0 for r in reqs]

    def reward(self, reqs):
        return [-0.3 if r.completion[0] == 9 else 0.2 for r in reqs]


@pytest.mark.parametrize("parallel", [1, 8])
def test_parallel_descents_do_not_pile_onto_a_known_bad_terminal(parallel):
    # 16 simulations at W = 8: backing the terminal up at once, it collected 5 of them and was extracted.
    game = BadTerminal()
    cfg = SearchSettings(simulations=16, parallel=parallel)
    tree = search([PROMPT], game.expand, game.evaluate, game.reward, cfg).trees[0]
    check_invariants(tree, cfg)
    bad = tree.children[ROOT][0]
    assert tree.visits[bad] <= tree.stats.rounds
    assert tree.visits[bad] < min(tree.visits[c] for c in tree.children[ROOT][1:])
    ex = extract(tree, cfg)
    assert ex.nodes[1] != bad and ex.complete and ex.reward == pytest.approx(0.2)
