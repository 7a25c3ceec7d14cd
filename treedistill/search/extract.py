"""What training and evaluation take from a searched tree: one path and its search statistics.

The path follows the most-visited child from the root (the reference's training target; ties go to
the higher Q, then to the first-sampled child). With Gumbel selection the root step is instead the
Sequential Halving winner, the action Gumbel MuZero acts with (mctx `gumbel_muzero_policy`), and the
path continues by most visits below it.

With `pick="best"` (test time) the path instead ends at the terminal node of highest value among
those the search valued (the environment's reward or the value head, by the caller's terminal rule;
ties to more visits, then to the earlier node): best-of-N's rule applied to the tree's finished lines.
It falls back to most visits when no terminal node was valued. With rollouts (`rollout_lambda` > 0)
every rollout's finished line is a candidate too, valued by its z (the same terminal rule as the
terminal nodes): the pick is the highest value among valued terminal nodes and rollouts (ties: more
visits of the node, then the earlier node), and a path chosen for its rollout ends at the rollout's
leaf, finished by that rollout.

A path that ends on a non-terminal node with a rollout (either pick rule: every evaluated leaf has
one) carries it as `Extraction.rollout`: the caller finishes the path with those tokens, already
generated and counted, instead of sampling a completion.

A path can stop before a terminal node (the search ran out of simulations or reached `max_depth`).
It is then returned marked incomplete: the caller completes it by sampling the policy from its end
and records `search_end`, so a truncated path is never trained on as if it were complete (the
reference scored such paths as if final, about -0.9).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from treedistill.search.contracts import LeafRollout, SearchSettings
from treedistill.search.select import gumbel_action
from treedistill.search.tree import ROOT, Tree


@dataclass(frozen=True)
class ChildStats:
    """The children of one node, in child order (C children): the search's targets at that node.

    children: node ids [C]; visits: N [C]; q: W / N, None where unvisited [C]; prior: P [C];
    visit_probs: N / sum N [C] (all zero when no child was visited).
    """

    node: int
    children: tuple[int, ...]
    visits: tuple[int, ...]
    q: tuple[float | None, ...]
    prior: tuple[float, ...]

    @property
    def visit_probs(self) -> tuple[float, ...]:
        total = sum(self.visits)
        return tuple(n / total if total else 0.0 for n in self.visits)


@dataclass(frozen=True)
class Extraction:
    """One path out of a tree.

    tree: the tree's index in the searched batch.
    nodes: node ids from the root (nodes[0] = 0) to the last node [L + 1].
    steps: each step's token ids, nodes[1:] [L].
    tokens: the steps concatenated: the completion the search produced [T].
    complete: the last node is terminal; `reward` is then its environment reward (else None).
    targets: ChildStats of every node of `nodes` [L + 1] (a leaf's has no children).
    rollout: the policy rollout that finished the line from the last node when it is not terminal
        and was evaluated with one (rollout_lambda > 0); None otherwise.
    """

    tree: int
    nodes: tuple[int, ...]
    steps: tuple[tuple[int, ...], ...]
    tokens: tuple[int, ...]
    complete: bool
    reward: float | None
    targets: tuple[ChildStats, ...]
    rollout: LeafRollout | None = None

    @property
    def search_end(self) -> int:
        """Index in the completion where the search's part ends (the caller appends after it)."""
        return len(self.tokens)


def most_visited(tree: Tree, node: int) -> int | None:
    """The child with the most visits (ties: higher Q, then lower id); None if none was visited."""
    best, best_key = None, None
    for child in tree.children[node]:
        n = tree.visits[child]
        if n == 0:
            continue
        key = (n, tree.value_sum[child] / n)
        if best_key is None or key > best_key:
            best, best_key = child, key
    return best


def _most_visited_root(tree: Tree, cfg: SearchSettings) -> int | None:
    return most_visited(tree, ROOT)


# How the root step is chosen, by selection rule.
ROOT_CHOICE: dict[str, Callable[[Tree, SearchSettings], int | None]] = {
    "puct": _most_visited_root,
    "uct": _most_visited_root,
    "gumbel": gumbel_action,
}


def finished_value(tree: Tree, node: int) -> float | None:
    """The value of the finished line a node stands for: a valued terminal node's own value, a
    non-terminal node's rollout's z; None when the node has neither."""
    if tree.terminal[node]:
        return tree.value[node]
    roll = tree.rollout[node]
    return None if roll is None else roll.value


def best_terminal(tree: Tree) -> int | None:
    """The node of the finished line of highest value: valued terminal nodes and, with rollouts,
    the nodes whose rollout finished a line (`finished_value`); ties: more visits, then lower id;
    None if none."""
    best, best_key = None, None
    for node in range(len(tree)):
        value = finished_value(tree, node)
        if value is not None:
            key = (value, tree.visits[node])
            if best_key is None or key > best_key:
                best, best_key = node, key
    return best


def pick_tree(trees: list[Tree], cfg: SearchSettings | None = None) -> Tree:
    """The tree a prompt's independent subtrees (`subtrees`) answer from: with `pick="best"`, the one
    holding the best finished line (its value, then its node's visits; ties: the first tree), the
    best-of-N rule over all the subtrees' lines; with "visits", or when no tree holds a finished
    line, the one whose root has the highest mean backed-up value Q (ties: the first tree)."""
    if not trees:
        raise ValueError("pick_tree: no trees")
    cfg = cfg or SearchSettings()
    if cfg.pick == "best":
        best, best_key = None, None
        for tree in trees:
            node = best_terminal(tree)
            if node is not None:
                key = (finished_value(tree, node), tree.visits[node])
                if best_key is None or key > best_key:
                    best, best_key = tree, key
        if best is not None:
            return best
    return max(trees, key=lambda t: -math.inf if t.q(ROOT) is None else t.q(ROOT))


def principal_variation(tree: Tree, cfg: SearchSettings | None = None) -> list[int]:
    """Node ids of the extracted path, root first."""
    cfg = cfg or SearchSettings()
    if cfg.pick == "best":
        node = best_terminal(tree)
        if node is not None:
            return tree.path(node)
    path = [ROOT]
    child = ROOT_CHOICE[cfg.select](tree, cfg)
    while child is not None:
        path.append(child)
        child = most_visited(tree, child)
    return path


def child_stats(tree: Tree, node: int) -> ChildStats:
    """Visits, Q and priors of `node`'s children."""
    children = tuple(tree.children[node])
    return ChildStats(
        node=node,
        children=children,
        visits=tuple(tree.visits[c] for c in children),
        q=tuple(tree.q(c) for c in children),
        prior=tuple(tree.prior[c] for c in children),
    )


def extract(tree: Tree, cfg: SearchSettings | None = None) -> Extraction:
    """The path a searched tree proposes, with the search's statistics at every node of it."""
    nodes = principal_variation(tree, cfg)
    last = nodes[-1]
    steps = tuple(tree.tokens[n] for n in nodes[1:])
    return Extraction(
        tree=tree.index,
        nodes=tuple(nodes),
        steps=steps,
        tokens=tuple(t for step in steps for t in step),
        complete=tree.terminal[last],
        reward=tree.reward(last),
        targets=tuple(child_stats(tree, n) for n in nodes),
        rollout=None if tree.terminal[last] else tree.rollout[last],
    )
