"""Credit from a whole searched tree: every step on a finished line, its Monte Carlo value and its advantage.

An MCTS distillation step (method mcts) generates the whole tree (~3,000 tokens on the tiny preset) and
learns from ONE path of it (~70 tokens), with one value target per tree. Method mcts-tree learns from
the tree's LINES instead: every root-to-terminal path. This module is the pure part (no torch): from a
searched `Tree` and the training reward of each terminal node, which steps to learn, with which value
target and which advantage.

Definitions (r(l): the training reward of terminal node l, re-scored by the caller with the learner's
reward, whatever the search scored terminals with):
- L(n): the terminal nodes in n's subtree (n itself if terminal), each counted ONCE (identical sampled
  steps are already merged into one node by the search, so a line sampled twice counts once).
- V^(n) = mean of r(l) over l in L(n), defined where L(n) is non-empty: the node's Monte Carlo mean of
  the terminal rewards below it (TreeRL's V(s_n), unweighted over leaves).
- The learned steps: every non-root node n with L(n) non-empty (the union of the lines), each ONCE,
  however many lines share it. Its row is [prompt + steps to the parent + n's step], loss on n's step.
- Advantage of the step parent(n) -> n:
    local:         A(n) = V^(n) - V^(parent(n))                       (TreeRL's local term; SPO's segment
                                                                        advantage with tree-sibling MC values)
    local+global:  A(n) = [V^(n) - V^(parent(n))] + [V^(n) - V^(root)]  (TreeRL: local + global)
- Value target of every token of n's step: V^(n), the mean outcome of the lines that take this step
  (as the reference's R on every token of its one line). A node's state s thus gets one target per
  child row, and their mean approaches V^(s): one tree yields a value target per learned step (tens)
  instead of one.

Sources and where we depart:
- TreeRL (Hou et al., ACL 2025): process reward of a node = global (V(s_n) - V(root)) + local
  (V(s_n) - V(parent)), divided by sqrt(|L(s_n)|), each token trained once per leaf sequence that
  holds it; leaf rewards leave-one-out normalised. We learn every node once per sample (one row per
  node and sample, not one per line); neither the 1/sqrt(|L|) weighting nor a leave-one-out baseline
  over the tree's lines measured better on training problems (docs/log.md, 2026-12-06), so neither is kept.
- TreePO (2025): segment-level advantages from sub-groups of the tree; our local term is the
  one-level sub-group (siblings under one parent, through the parent's leaf mean).
- Tree-GRPO (ICLR 2026): intra-tree advantages (a node against its siblings, = step-level
  preference) and inter-tree (across trees of a prompt); ours is intra-tree only (one tree per problem).
- SPO (2025): segment advantages V(s') - V(s) from Monte Carlo estimates; ours are the tree's own.
- Scale (`tree_advantage_norm`). Under a 0/1 reward most steps of a tree have A = 0 (no success
  below them, or the same rate as their parent's) and the rest are small (|A| ~0.005 on average on the
  tiny preset), while the loss is a mean over every learned token: ~50 rows per tree dilute the few
  informative steps that mcts's single path would carry at full weight. `std` divides every advantage
  of a rollout batch (all its trees) by their standard deviation over the batch's rows (GRPO's scale,
  without its centring: the tree's baseline V^(parent) is already subtracted; TreeRL normalises the
  leaf rewards instead); `none` keeps them as computed.
- Lines that stop short (a node at max_depth, a leaf the search never expanded) carry no terminal
  reward and are not learned: no bootstrap from the value head, so the advantage never depends on it.
  (The rollout adds the policy's completion of an unfinished extracted path as one terminal step,
  `rollout/tree_lines.py`, so every tree has at least one line.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from treedistill.search.tree import ROOT, Tree

__all__ = ["TREE_ADVANTAGES", "TREE_ADVANTAGE_NORMS", "StepCredit", "scaled_advantages", "step_credits",
           "subtree_values"]

TREE_ADVANTAGES = ("local", "local+global")
TREE_ADVANTAGE_NORMS = ("none", "std")


@dataclass(frozen=True)
class StepCredit:
    """One learned step of a tree: node n (its step = tree.tokens[n]), parent, V^(n), A(n), and the
    terminal nodes below it (|L(n)|)."""

    node: int
    parent: int
    value: float
    advantage: float
    leaves: int


def subtree_values(tree: Tree, rewards: Mapping[int, float]) -> tuple[list[float | None], list[int]]:
    """(V^ [N], |L| [N]) for every node: the mean of `rewards` (terminal node -> training reward) over
    the terminal nodes of its subtree, None where there is none; |L| their number."""
    missing = [n for n in range(len(tree)) if tree.terminal[n] and n not in rewards]
    assert not missing, f"subtree_values: no reward for terminal nodes {missing[:5]}"
    total = [0.0] * len(tree)
    count = [0] * len(tree)
    # children always have larger ids than their parent: one backward pass adds each subtree to its parent
    for node in range(len(tree) - 1, -1, -1):
        if tree.terminal[node]:
            total[node] += float(rewards[node])
            count[node] += 1
        parent = tree.parent[node]
        if parent >= 0:
            total[parent] += total[node]
            count[parent] += count[node]
    return [t / c if c else None for t, c in zip(total, count)], count


def step_credits(tree: Tree, rewards: Mapping[int, float], mode: str = "local") -> list[StepCredit]:
    """The learned steps of `tree` in node-id order (parents before children), each once; see the
    module docstring for V^ and the advantage `mode` ("local" | "local+global")."""
    assert mode in TREE_ADVANTAGES, f"tree advantage must be one of {TREE_ADVANTAGES}, got {mode!r}"
    values, leaves = subtree_values(tree, rewards)
    root = values[ROOT]
    out = []
    for node in range(1, len(tree)):
        value = values[node]
        if value is None:
            continue
        parent = tree.parent[node]
        advantage = value - values[parent]  # local: V^(n) - V^(parent)
        if mode == "local+global":
            advantage += value - root       # global: V^(n) - V^(root)
        out.append(StepCredit(node=node, parent=parent, value=value, advantage=advantage, leaves=leaves[node]))
    return out


def scaled_advantages(advantages: Sequence[float], norm: str) -> list[float]:
    """A rollout batch's step advantages under `norm` (see the module docstring): "none" as given, "std"
    divided by their population standard deviation (unchanged when it is 0: every step's A is 0)."""
    assert norm in TREE_ADVANTAGE_NORMS, f"tree advantage norm must be one of {TREE_ADVANTAGE_NORMS}, got {norm!r}"
    values = [float(a) for a in advantages]
    if norm == "none" or not values:
        return values
    mean = sum(values) / len(values)
    std = (sum((a - mean) ** 2 for a in values) / len(values)) ** 0.5
    return values if std <= 1e-12 else [a / std for a in values]
