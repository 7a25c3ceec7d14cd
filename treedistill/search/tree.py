"""The search tree over reasoning steps (the data that crosses the search's edge: contracts.py).

The root is the prompt; every other node is one step: a tuple of token ids that ends at the step
delimiter (`</step>`), at end-of-sequence (a terminal node) or after the caller's maximum number of
step tokens. The tree is a structure of flat lists indexed by node id (root = 0), so selection and
backup walk one root-to-leaf path and never scan the tree.

The search never sees a model: it hands `NodeRequest`s to three batched callables supplied by the
caller and gets `Candidate` steps and floats back (see `treedistill/search/mcts.py`).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

from treedistill.search.contracts import Candidate, LeafRollout, NodeRequest

__all__ = ["ROOT", "Candidate", "NodeRequest", "Tree"]

ROOT = 0


class Tree:
    """One search tree, stored as parallel lists indexed by node id (root = `ROOT` = 0).

    Per node: `parent` (-1 for the root), `children` (ids, in the order the steps were first
    sampled), `depth` (steps from the root), `tokens` (the step), `logprob` (its summed raw policy
    log-prob), `token_logprobs` (its per-token raw policy log-probs, () if not given), `prior` P
    (softmax over the parent's candidates, duplicates summed; under widening the mean over the
    parent's batches), `count` (how many sampled candidates were merged into this node), `terminal`,
    `finish`, `expanded` (children created), `expansions` (how many times `expand` was asked for this
    node's steps: 1, or more under progressive widening), `sampled` (candidates those calls returned,
    duplicates included), `value` (the leaf value backed up when a simulation ends here: the value
    head for a non-terminal node once evaluated, the environment reward for a terminal node, set at creation;
    None before; with rollout_lambda > 0 a non-terminal node's is the mixed value), `rollout` (the
    policy rollout that finished the line from this non-terminal node when it was evaluated, None
    without one), `repeat` (the node's finished line, a terminal node or its rollout, holds an answer
    the tree already held when it was valued: with `repeat_penalty` its backed-up value is lowered),
    `visits` N, `value_sum` W, `virtual` (in-flight visits of the current round) and `gumbel` (the root
    children's Gumbel noise; 0 elsewhere).

    `index` is the prompt's position in the searched batch (what `NodeRequest.tree` carries) and
    `subtree` the tree's position among that prompt's independent subtrees (0 with one tree per
    prompt). `answers` holds the answer keys of the finished lines of the prompt's trees, one set shared
    by its subtrees (with `repeat_penalty`).

    `q_min` / `q_max` are the extreme node values Q = W / N seen so far (MuZero's min-max
    normalisation). `stats` holds the per-tree compute accounting (set by the search).
    """

    def __init__(self, prompt: Sequence[int], index: int = 0, subtree: int = 0):
        self.index, self.subtree = index, subtree
        self.prompt: tuple[int, ...] = tuple(int(t) for t in prompt)
        self.parent: list[int] = []
        self.children: list[list[int]] = []
        self.depth: list[int] = []
        self.tokens: list[tuple[int, ...]] = []
        self.logprob: list[float] = []
        self.token_logprobs: list[tuple[float, ...]] = []
        self.prior: list[float] = []
        self.count: list[int] = []
        self.terminal: list[bool] = []
        self.finish: list[str] = []
        self.expanded: list[bool] = []
        self.expansions: list[int] = []
        self.sampled: list[int] = []
        self.value: list[float | None] = []
        self.rollout: list[LeafRollout | None] = []
        self.repeat: list[bool] = []
        self.answers: set[Hashable] = set()
        self.visits: list[int] = []
        self.value_sum: list[float] = []
        self.virtual: list[int] = []
        self.gumbel: list[float] = []
        self.q_min = math.inf
        self.q_max = -math.inf
        self.stats = None
        self.add_node(-1, (), 0.0, 1.0, terminal=False, finish="")

    def __len__(self) -> int:
        return len(self.parent)

    def add_node(
        self,
        parent: int,
        tokens: tuple[int, ...],
        logprob: float,
        prior: float,
        *,
        terminal: bool,
        finish: str,
        token_logprobs: tuple[float, ...] = (),
    ) -> int:
        """Append a node (unvisited, unexpanded) under `parent`; returns its id."""
        node = len(self.parent)
        self.parent.append(parent)
        self.children.append([])
        self.depth.append(0 if parent < 0 else self.depth[parent] + 1)
        self.tokens.append(tokens)
        self.logprob.append(logprob)
        self.token_logprobs.append(token_logprobs)
        self.prior.append(prior)
        self.count.append(1)
        self.terminal.append(terminal)
        self.finish.append(finish)
        self.expanded.append(False)
        self.expansions.append(0)
        self.sampled.append(0)
        self.value.append(None)
        self.rollout.append(None)
        self.repeat.append(False)
        self.visits.append(0)
        self.value_sum.append(0.0)
        self.virtual.append(0)
        self.gumbel.append(0.0)
        if parent >= 0:
            self.children[parent].append(node)
        return node

    def q(self, node: int) -> float | None:
        """Mean backed-up value W / N, None while unvisited."""
        n = self.visits[node]
        return self.value_sum[node] / n if n else None

    def reward(self, node: int) -> float | None:
        """The environment reward of a terminal node, None for a non-terminal one."""
        return self.value[node] if self.terminal[node] else None

    def path(self, node: int) -> list[int]:
        """Node ids from the root to `node`, both included (walks `depth` parents)."""
        out = [node]
        while self.parent[out[-1]] >= 0:
            out.append(self.parent[out[-1]])
        out.reverse()
        return out

    def completion(self, node: int) -> tuple[int, ...]:
        """The steps on the root-to-node path, concatenated [C] (prompt excluded)."""
        out: list[int] = []
        for i in self.path(node):
            out.extend(self.tokens[i])
        return tuple(out)

    def request(self, node: int) -> NodeRequest:
        """What a callable is told about `node`: the full token prefix and where the prompt ends."""
        return NodeRequest(self.index, node, self.prompt + self.completion(node), len(self.prompt),
                           self.depth[node])

    def normalize(self, q: float) -> float:
        """Q mapped to [0, 1] by the min and max node value seen in this tree (identity until two
        different values were seen), as MuZero's MinMaxStats (Schrittwieser et al. 2020, App. B)."""
        span = self.q_max - self.q_min
        return (q - self.q_min) / span if span > 0 else q

    def backup(self, path: Sequence[int], value: float) -> None:
        """Add one visit of `value` to every node of `path` (root included) and retire the
        path's in-flight visit: the leaf's value counts exactly once per node."""
        for node in path:
            self.visits[node] += 1
            self.value_sum[node] += value
            self.virtual[node] -= 1
            q = self.value_sum[node] / self.visits[node]
            self.q_min = min(self.q_min, q)
            self.q_max = max(self.q_max, q)

    def add_virtual(self, path: Sequence[int], amount: int = 1) -> None:
        """Add (or with amount=-1 remove) one in-flight visit on every node of `path`."""
        for node in path:
            self.virtual[node] += amount
