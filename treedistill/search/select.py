"""Selection rules: which child a descent follows. One signature for all: `(tree, node, cfg) -> child`.

pUCT (AlphaZero, Silver et al. 2018):  Q(s,a) + c * P(s,a) * sqrt(N(s)) / (1 + N(s,a))
UCT  (Kocsis & Szepesvari 2006):       Q(s,a) + c * sqrt(ln N(s) / N(s,a)), unvisited children first
Gumbel (Danihelka et al. 2022, "Policy improvement by planning with Gumbel", as in DeepMind's mctx
`gumbel_muzero_policy`): Sequential Halving over Gumbel-perturbed children at the root, the
deterministic improved-policy rule below it.

Where this departs from the papers, and why:
- Counts. N(s) counts the node's own value-head evaluation plus its children's visits, plus the
  in-flight (virtual) visits of the current round; N(s,a) counts real + virtual visits. Counting the
  parent's own evaluation (as mctx does for the root) makes the prior matter from the first descent;
  with N(s) = sum of child visits every first pUCT score is the first-play value and the tie goes to
  the first sampled child.
- pUCT: constant c (the reference's 0.5; no AlphaZero c_base growth), first-play value `fpu` for
  children with no real visit (0 in the reference), no Dirichlet noise at the root (the K children are
  already a sample from the policy at temperature 0.8).
- Virtual loss. An in-flight visit counts as a visit whose value is the current estimate minus
  `virtual_loss`: Q_eff = Q - virtual_loss * Nv / (N + Nv) (Q = fpu while N = 0). The textbook
  (W - virtual_loss * Nv) / (N + Nv) would, at virtual_loss = 0, still pull every in-flight Q toward
  0, an arbitrary point of a [-1, 1] value scale; ours at 0 only raises the visit counts.
- Gumbel over sampled steps. The paper draws m actions without replacement from the full action set
  by Gumbel-top-k on the prior logits. Text steps cannot be enumerated: the root's actions are the K
  steps sampled by `expand` (identical samples merged, prior = softmax over their log-probs, summed
  over duplicates). We perturb those children's log-priors with Gumbel noise and run Sequential
  Halving over the top min(gumbel_k, children) of them, exactly as mctx does over its considered
  actions. The policy-improvement guarantee then holds relative to the prior restricted to the
  sampled support, which is the prior every rule here uses. The children are already policy samples,
  so a likely step tends to appear (and, merged, to carry a larger prior): the log-prior is kept in
  the score anyway so that the rule reduces to Gumbel MuZero when the samples cover the support.
- Completed Q values use mctx's `qtransform_completed_by_mix_value` (unvisited children get the
  mixed value of Appendix D: the node's value-head estimate mixed with the prior-weighted Q of the
  visited children; rescaled to [0, 1]; times (maxvisit_init + max N) * value_scale). There are no
  rewards on edges and no discount: a child's Q is the mean of the values backed up through it.
  `q_normalize` does not apply to Gumbel (its transform already rescales).
- Parallel search. The Sequential Halving schedule is indexed by the number of root-child visits,
  real + in-flight; a colliding descent is rolled back at the end of its round, so the schedule
  follows the simulations that finished. If no child sits at the scheduled visit count (possible only
  after such a rollback), the least-visited considered children compete instead.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from treedistill.search.tree import ROOT, Tree

if TYPE_CHECKING:
    from treedistill.search.contracts import SearchSettings

SelectFn = Callable[[Tree, int, "SearchSettings"], int]
ScoreFn = Callable[[float, float, int, int, float], float]


def puct_score(q: float, prior: float, n_parent: int, n_child: int, c: float) -> float:
    """pUCT: Q + c * P * sqrt(N_parent) / (1 + N_child)."""
    return q + c * prior * math.sqrt(n_parent) / (1 + n_child)


def uct_score(q: float, prior: float, n_parent: int, n_child: int, c: float) -> float:
    """UCT: Q + c * sqrt(ln N_parent / N_child); an unvisited child (N_child = 0) scores +inf.
    `prior` is ignored: UCT is the prior-free baseline of the pUCT-vs-UCT ablation."""
    if n_child == 0:
        return math.inf
    return q + c * math.sqrt(math.log(max(n_parent, 1)) / n_child)


def child_q(tree: Tree, child: int, virtual_loss: float) -> float | None:
    """The child's Q = W / N lowered by its in-flight visits (see virtual loss above); None if N = 0."""
    n = tree.visits[child]
    if n == 0:
        return None
    q = tree.value_sum[child] / n
    nv = tree.virtual[child]
    return q - virtual_loss * nv / (n + nv) if nv else q


def select_by_score(tree: Tree, node: int, cfg: SearchSettings, *, score: ScoreFn) -> int:
    """The child of `node` with the highest `score`; ties go to the first child (lowest id).
    Q is `child_q`'s (fpu, lowered by the in-flight visits, while unvisited), computed inline: this
    loop is most of a simulation's bookkeeping."""
    visits, virtual, value_sum, prior = tree.visits, tree.virtual, tree.value_sum, tree.prior
    vl, fpu, c, normalize = cfg.virtual_loss, cfg.fpu, cfg.c_puct, cfg.q_normalize
    n_parent = visits[node] + virtual[node]
    best, best_score = -1, -math.inf
    for child in tree.children[node]:
        n, nv = visits[child], virtual[child]
        if n:
            q = value_sum[child] / n
            if nv:
                q = q - vl * nv / (n + nv)
        else:
            q = fpu - (vl if nv else 0.0)
        if normalize:
            q = tree.normalize(q)
        s = score(q, prior[child], n_parent, n + nv, c)
        if s > best_score:
            best, best_score = child, s
    return best


def completed_q(tree: Tree, node: int, cfg: SearchSettings) -> list[float]:
    """mctx `qtransform_completed_by_mix_value` over the children of `node` [C]."""
    children = tree.children[node]
    qs = [child_q(tree, c, cfg.virtual_loss) for c in children]
    visits = [tree.visits[c] for c in children]
    total = sum(visits)
    raw = tree.value[node] if tree.value[node] is not None else 0.0
    # Mixed value (Danihelka et al. 2022, App. D): (v + sum_b N(b) * sum_visited P q / sum_visited P)
    # / (1 + sum_b N(b)).
    seen_p = sum(tree.prior[c] for c, q in zip(children, qs) if q is not None)
    if seen_p > 0:
        weighted = sum(tree.prior[c] * q for c, q in zip(children, qs) if q is not None) / seen_p
        mixed = (raw + total * weighted) / (total + 1)
    else:
        mixed = raw
    done = [mixed if q is None else q for q in qs]
    lo, hi = min(done), max(done)
    scale = (cfg.maxvisit_init + max(visits)) * cfg.value_scale
    return [scale * (q - lo) / max(hi - lo, 1e-8) for q in done]


@functools.lru_cache(maxsize=64)
def considered_visits(num_considered: int, num_simulations: int) -> tuple[int, ...]:
    """Sequential Halving schedule (Karnin et al. 2013) as a sequence of visit counts, one per
    simulation: simulation i visits a child that has exactly `seq[i]` visits (mctx
    `get_sequence_of_considered_visits`)."""
    if num_considered <= 1:
        return tuple(range(num_simulations))
    log2max = math.ceil(math.log2(num_considered))
    seq: list[int] = []
    visits = [0] * num_considered
    m = num_considered
    while len(seq) < num_simulations:
        extra = max(1, int(num_simulations / (log2max * m)))
        for _ in range(extra):
            seq.extend(visits[:m])
            for i in range(m):
                visits[i] += 1
        m = max(2, m // 2)
    return tuple(seq[:num_simulations])


def _gumbel_scores(tree: Tree, node: int, cfg: SearchSettings) -> list[float]:
    """g(a) + log P(a) + completed_q(a) for the children of `node` [C]."""
    cq = completed_q(tree, node, cfg)
    return [tree.gumbel[c] + math.log(tree.prior[c]) + q for c, q in zip(tree.children[node], cq)]


def _argmax_at(scores: list[float], counts: list[int], target: int) -> int:
    """Position of the best score among the entries whose count equals `target` (first on ties)."""
    best, best_score = -1, -math.inf
    for i, (s, n) in enumerate(zip(scores, counts)):
        if n == target and s > best_score:
            best, best_score = i, s
    return best


def gumbel_root(tree: Tree, node: int, cfg: SearchSettings) -> int:
    """Sequential Halving with Gumbel at the root (mctx `gumbel_muzero_root_action_selection`)."""
    children = tree.children[node]
    counts = [tree.visits[c] + tree.virtual[c] for c in children]
    seq = considered_visits(min(cfg.gumbel_k, len(children)), cfg.simulations)
    target = seq[min(sum(counts), len(seq) - 1)]
    scores = _gumbel_scores(tree, node, cfg)
    i = _argmax_at(scores, counts, target)
    if i < 0:
        i = _argmax_at(scores, counts, min(counts))
    return children[i]


def gumbel_interior(tree: Tree, node: int, cfg: SearchSettings) -> int:
    """Deterministic improved-policy selection (mctx `gumbel_muzero_interior_action_selection`):
    argmax_a pi'(a) - N(a) / (1 + sum_b N(b)), pi' = softmax(log P + completed_q), so the visit
    frequencies track pi'."""
    children = tree.children[node]
    logits = [math.log(tree.prior[c]) + q for c, q in zip(children, completed_q(tree, node, cfg))]
    top = max(logits)
    exp = [math.exp(x - top) for x in logits]
    z = sum(exp)
    counts = [tree.visits[c] + tree.virtual[c] for c in children]
    total = 1 + sum(counts)
    best, best_score = -1, -math.inf
    for child, e, n in zip(children, exp, counts):
        s = e / z - n / total
        if s > best_score:
            best, best_score = child, s
    return best


def root_or_interior(tree: Tree, node: int, cfg: SearchSettings, *, root: SelectFn,
                     interior: SelectFn) -> int:
    """`root` at the root, `interior` below it."""
    return (root if node == ROOT else interior)(tree, node, cfg)


def gumbel_action(tree: Tree, cfg: SearchSettings) -> int | None:
    """The root step Gumbel MuZero acts with: among the most-visited root children (the Sequential
    Halving survivors), the highest g + log P + completed_q (mctx `gumbel_muzero_policy`). None when
    no root child was visited."""
    children = tree.children[ROOT]
    counts = [tree.visits[c] for c in children]
    if not children or max(counts) == 0:
        return None
    return children[_argmax_at(_gumbel_scores(tree, ROOT, cfg), counts, max(counts))]


SELECT_RULES: dict[str, SelectFn] = {
    "puct": functools.partial(select_by_score, score=puct_score),
    "uct": functools.partial(select_by_score, score=uct_score),
    "gumbel": functools.partial(root_or_interior, root=gumbel_root, interior=gumbel_interior),
}
