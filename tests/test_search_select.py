"""Selection rules on hand-built trees: every expected number is worked out in the comments."""

import math

import pytest

from treedistill.search import ROOT, SELECT_RULES, SearchSettings, Tree, puct_score, uct_score
from treedistill.search.select import completed_q, considered_visits, gumbel_interior, gumbel_root


def hand_tree():
    """Root (value-head value 0, N = 4 = its own evaluation + 3 child visits) with children
    A: P .5, N 2, W .6 (Q .3);  B: P .3, N 1, W -.2 (Q -.2);  C: P .2, unvisited."""
    t = Tree((1, 2, 3))
    stats = [((10,), 0.5, 2, 0.6), ((11,), 0.3, 1, -0.2), ((12,), 0.2, 0, 0.0)]
    for tokens, prior, n, w in stats:
        c = t.add_node(ROOT, tokens, math.log(prior), prior, terminal=False, finish="stop")
        t.visits[c], t.value_sum[c] = n, w
    t.expanded[ROOT], t.value[ROOT], t.visits[ROOT], t.value_sum[ROOT] = True, 0.0, 4, 0.4
    t.q_min, t.q_max = -0.2, 0.3
    return t


A, B, C = 1, 2, 3


def test_puct_score_by_hand():
    # 0.2 + 0.5 * 0.5 * sqrt(9) / (1 + 2) = 0.2 + 0.25 = 0.45
    assert puct_score(0.2, 0.5, 9, 2, 0.5) == pytest.approx(0.45)
    # unvisited child, Q = fpu = 0: 0 + 0.5 * 0.1 * sqrt(16) / 1 = 0.2
    assert puct_score(0.0, 0.1, 16, 0, 0.5) == pytest.approx(0.2)


def test_uct_score_by_hand():
    # 0.1 + 0.5 * sqrt(ln 8 / 2) = 0.1 + 0.5 * sqrt(2.07944 / 2) = 0.1 + 0.5 * 1.01966 = 0.60983
    assert uct_score(0.1, 0.9, 8, 2, 0.5) == pytest.approx(0.60983, abs=1e-5)
    assert uct_score(-1.0, 0.0, 8, 0, 0.5) == math.inf  # unvisited first


def test_puct_select_by_hand():
    t = hand_tree()
    # N_parent = 4, sqrt = 2, c = .5:
    #   A: .3 + .5 * .5 * 2 / 3 = .3 + .16667 = .46667
    #   B: -.2 + .5 * .3 * 2 / 2 = -.2 + .15 = -.05
    #   C: 0 (fpu) + .5 * .2 * 2 / 1 = .2
    assert SELECT_RULES["puct"](t, ROOT, SearchSettings()) == A
    # fpu = .3 lifts C to .3 + .2 = .5 > .46667
    assert SELECT_RULES["puct"](t, ROOT, SearchSettings(fpu=0.3)) == C
    # fpu = .26 gives C .46 < .46667: A again
    assert SELECT_RULES["puct"](t, ROOT, SearchSettings(fpu=0.26)) == A


def test_puct_with_virtual_visits_and_virtual_loss_by_hand():
    t = hand_tree()
    t.virtual[ROOT], t.virtual[A] = 2, 2  # two descents in flight through A
    # N_parent = 4 + 2 = 6, sqrt(6) = 2.44949; A counts N = 2 + 2 = 4.
    # virtual_loss 0: A: .3 + .5 * .5 * 2.44949 / 5 = .3 + .12247 = .42247
    #                 C: 0 + .5 * .2 * 2.44949 / 1 = .24495  -> A
    assert SELECT_RULES["puct"](t, ROOT, SearchSettings(virtual_loss=0.0)) == A
    # virtual_loss .5: A's Q = .3 - .5 * 2 / (2 + 2) = .05 -> .05 + .12247 = .17247 < .24495 -> C
    assert SELECT_RULES["puct"](t, ROOT, SearchSettings(virtual_loss=0.5)) == C


def test_puct_with_q_normalisation_by_hand():
    t = hand_tree()
    # Q mapped by the tree's min -.2 and max .3 (span .5): A 1.0, B 0.0, C fpu 0 -> (0 + .2) / .5 = .4
    #   A: 1 + .16667 = 1.16667;  B: 0 + .15 = .15;  C: .4 + .2 = .6  -> A
    assert SELECT_RULES["puct"](t, ROOT, SearchSettings(q_normalize=True)) == A
    # with c = 6 the prior terms are 12x: A 1 + 2 = 3, B 1.8, C .4 + 2.4 = 2.8 -> A; c = 8: A 1 + 2.6667 =
    # 3.6667, C .4 + 3.2 = 3.6 -> A; c = 10: A 1 + 3.3333 = 4.3333, C .4 + 4 = 4.4 -> C
    assert SELECT_RULES["puct"](t, ROOT, SearchSettings(q_normalize=True, c_puct=8.0)) == A
    assert SELECT_RULES["puct"](t, ROOT, SearchSettings(q_normalize=True, c_puct=10.0)) == C


def test_uct_select_by_hand():
    t = hand_tree()
    assert SELECT_RULES["uct"](t, ROOT, SearchSettings()) == C  # the unvisited child first
    t.visits[C], t.value_sum[C], t.visits[ROOT] = 1, -0.5, 5
    # ln 5 = 1.60944, c = .5:
    #   A: .3 + .5 * sqrt(1.60944 / 2) = .3 + .5 * .89707 = .74853
    #   B: -.2 + .5 * sqrt(1.60944) = -.2 + .63431 = .43431
    #   C: -.5 + .63431 = .13431  -> A
    assert SELECT_RULES["uct"](t, ROOT, SearchSettings()) == A
    # c = 2: A .3 + 2 * .89707 = 2.09414; B -.2 + 2 * 1.26864 = 2.33728 -> B (UCT ignores the prior)
    assert SELECT_RULES["uct"](t, ROOT, SearchSettings(c_puct=2.0)) == B


def test_ties_go_to_the_first_child():
    t = Tree((1,))
    for tok in (5, 6):
        t.add_node(ROOT, (tok,), math.log(0.5), 0.5, terminal=False, finish="stop")
    t.expanded[ROOT], t.visits[ROOT], t.value[ROOT] = True, 1, 0.0
    assert SELECT_RULES["puct"](t, ROOT, SearchSettings()) == 1
    assert SELECT_RULES["uct"](t, ROOT, SearchSettings()) == 1


def test_completed_q_by_hand():
    t = hand_tree()
    # Mixed value: raw v(root) = 0, sum N = 3, visited prior mass .5 + .3 = .8,
    #   prior-weighted Q = (.5 * .3 + .3 * -.2) / .8 = .09 / .8 = .1125,
    #   mixed = (0 + 3 * .1125) / (3 + 1) = .084375 completes C.
    # Completed [.3, -.2, .084375] -> rescaled by min -.2, max .3: [1, 0, .56875];
    # times (maxvisit_init 50 + max N 2) * value_scale .1 = 5.2: [5.2, 0, 2.9575].
    assert completed_q(t, ROOT, SearchSettings()) == pytest.approx([5.2, 0.0, 2.9575])


def test_gumbel_interior_by_hand():
    t = hand_tree()
    # pi' = softmax(log P + completed Q) = softmax(log .5 + 5.2, log .3 + 0, log .2 + 2.9575)
    #     = softmax(4.50685, -1.20397, 1.34806) = (.95637, .00317, .04046)
    # score = pi' - N / (1 + sum N) = (.95637 - 2/4, .00317 - 1/4, .04046 - 0) -> A
    assert gumbel_interior(t, ROOT, SearchSettings()) == A
    t.value_sum[A] = -1.0  # A's Q drops to -.5
    # prior-weighted Q = (.5 * -.5 + .3 * -.2) / .8 = -.3875; mixed = 3 * -.3875 / 4 = -.290625;
    # completed [-.5, -.2, -.290625] -> rescaled (span .3) [0, 1, .69792] -> x 5.2 [0, 5.2, 3.62917];
    # pi' = softmax(-.69315, 3.99603, 2.01973) = (.00801, .87118, .12081);
    # score = (.00801 - 2/4, .87118 - 1/4, .12081 - 0) = (-.49199, .62118, .12081) -> B
    assert gumbel_interior(t, ROOT, SearchSettings()) == B


def test_sequential_halving_schedule_by_hand():
    # 4 considered actions, 16 simulations (mctx get_sequence_of_considered_visits):
    # log2(4) = 2 phases; phase 1: max(1, int(16 / (2 * 4))) = 2 visits to each of 4 actions
    # (the sequence lists the visit count a chosen action must have): 0 0 0 0 1 1 1 1;
    # phase 2: 2 actions, int(16 / (2 * 2)) = 4 visits each: 2 2 3 3 4 4 5 5.
    assert considered_visits(4, 16) == (0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5)
    assert considered_visits(1, 5) == (0, 1, 2, 3, 4)


def test_gumbel_root_follows_the_schedule():
    t = hand_tree()
    for c in (A, B, C):
        t.visits[c], t.value_sum[c] = 0, 0.0
    t.gumbel[A], t.gumbel[B], t.gumbel[C] = 0.0, 2.0, 0.0
    cfg = SearchSettings(simulations=16)
    # no visits: completed Q are all the root value 0 -> rescaled 0; score = g + log P:
    # A log .5 = -.693, B 2 + log .3 = .796, C log .2 = -1.609 -> B first
    assert gumbel_root(t, ROOT, cfg) == B
    t.visits[B], t.value_sum[B] = 1, -0.2
    # schedule for 3 actions, 16 sims: phase 1 gives int(16 / (2 * 3)) = 2 visits each: 0 0 0 1 1 1,
    # so simulation 2 must visit a child with 0 visits: B is out. Completed Q: B -.2, mixed
    # (0 + 1 * -.2) / 2 = -.1 for A and C -> rescaled A 1, B 0, C 1, x (50 + 1) * .1 = 5.1:
    # A -.693 + 5.1 = 4.407 > C -1.609 + 5.1 = 3.491 -> A
    assert gumbel_root(t, ROOT, cfg) == A
    t.gumbel[C] = 1.0  # C 4.491 > A 4.407
    assert gumbel_root(t, ROOT, cfg) == C
