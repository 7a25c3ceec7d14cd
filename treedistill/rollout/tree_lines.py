"""A searched tree's finished lines as the learner's rows (method mcts-tree; the credit: `search.credit`).

Every step on a root-to-terminal line becomes one row per time it was sampled (`Tree.count`: the search
merges a step sampled again at the same node into one node), however many lines share it, so a
repeated sample is learned as GRPO learns two equal samples of a group, and packed rows compute it once:
prompt_ids = the prompt + the steps from the root to the step's parent, completion_ids = the step's
tokens (the only tokens carrying loss), behaviour_logprobs = the raw-policy log-probs the search
recorded when it sampled the step (`Tree.token_logprobs`, from the engine at expansion), reward =
V^ of the step's node (its value target), advantage = the step's credit from the tree.

Every finished line the rollout generated is learned, not only those the search's steps reached
(`with_lines`, which hangs each under its node as one terminal step with prior 0, since the search
never chose it as a step):
- with rollout leaves (`search.rollout_lambda` > 0), each rollout's continuation from the leaf it valued,
  with the behaviour log-probs recorded when it was sampled: it is a line below that leaf, so V^ of the
  leaf and of its ancestors includes its outcome;
- where the search stopped short of a terminal node on its extracted path and no rollout finished it,
  the policy's completion of that path (`rollout.tree_search`: generated, and counted, for mcts as well).
Every tree then holds at least one line.

Each terminal node is re-scored here with the environment the caller gives (the learner's reward), so
the credit never depends on what the search scored terminals with (`search_reward`). The prefix tokens
of a row are recomputed by the learner's forward: they count as trained tokens (`learn_train_tokens`)
like every attended position of every row, which is what this method's learning costs.
"""

from __future__ import annotations

from dataclasses import dataclass

from treedistill.rollout.sample import completion_text
from treedistill.rollout.trajectory import Trajectory
from treedistill.rollout.tree_search import SearchOutcome
from treedistill.search.credit import step_credits
from treedistill.search.tree import Tree

__all__ = ["TreeRows", "tree_rows", "with_lines"]


@dataclass(frozen=True)
class TreeRows:
    """One tree's rows [R] (node-id order: parents first) and the training reward of each of its
    terminal nodes [L] (its lines)."""

    rows: list[Trajectory]
    line_rewards: list[float]


def with_lines(outcome: SearchOutcome) -> Tree:
    """The outcome's tree with its other finished lines added IN PLACE (see the module docstring): each
    rollout as a terminal child of the leaf it started from, and the policy's completion of an extracted
    path that stopped short (when no rollout finished it) as a terminal child of the path's last node."""
    tree, path = outcome.tree, outcome.trajectory
    for node in range(len(tree)):  # the nodes of the search; the children added below are terminal
        roll = tree.rollout[node]
        if roll is not None and roll.tokens:
            tree.add_node(node, tuple(roll.tokens), float(sum(roll.token_logprobs)), 0.0, terminal=True,
                          finish=roll.finish, token_logprobs=tuple(roll.token_logprobs))
    rest = path.completion_ids[path.search_tokens:]
    if outcome.completed_by_policy and rest and not path.stats.get("finished_by_rollout"):
        logprobs = path.behaviour_logprobs[path.search_tokens:]
        tree.add_node(outcome.extraction.nodes[-1], tuple(rest), float(sum(logprobs)), 0.0, terminal=True,
                      finish=outcome.completion_finish, token_logprobs=tuple(logprobs))
    return tree


def tree_rows(tree: Tree, problem: dict, env, policy, *, group: int, mode: str = "local") -> TreeRows:
    """The rows of `tree` (see the module docstring); env.score(...).reward is the learner's reward."""
    scores = {node: env.score(problem, completion_text(policy, tree.completion(node)))
              for node in range(len(tree)) if tree.terminal[node]}
    credits = step_credits(tree, {n: s.reward for n, s in scores.items()}, mode)
    sparse = step_credits(tree, {n: s.sparse for n, s in scores.items()}, mode)
    rows = []
    for credit, credit_sparse in zip(credits, sparse):
        node = credit.node
        tokens, logprobs = tree.tokens[node], tree.token_logprobs[node]
        if not tokens:
            continue  # an empty terminal step (cut at the token budget): nothing to learn
        assert len(logprobs) == len(tokens), (
            f"tree {tree.index} node {node}: {len(logprobs)} behaviour log-probs for {len(tokens)} step "
            "tokens (the search's expand must record them)")
        row = Trajectory(
            prompt_ids=tree.prompt + tree.completion(credit.parent), completion_ids=tokens,
            behaviour_logprobs=logprobs, reward=credit.value, sparse=credit_sparse.value, group=group,
            search_tokens=len(tokens), advantage=credit.advantage,
            stats={"node": node, "depth": tree.depth[node], "leaves": credit.leaves},
        )
        rows += [row] * tree.count[node]
    return TreeRows(rows, [s.reward for s in scores.values()])
