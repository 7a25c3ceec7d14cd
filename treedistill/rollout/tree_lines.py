"""A searched tree's finished lines as the learner's rows (method mcts-tree; the credit: `search.credit`).

Every step on a root-to-terminal line becomes ONE row, however many lines share it:
prompt_ids = the prompt + the steps from the root to the step's parent, completion_ids = the step's
tokens (the only tokens carrying loss), behaviour_logprobs = the raw-policy log-probs the search
recorded when it sampled the step (`Tree.token_logprobs`, from the engine at expansion), reward =
V^ of the step's node (its value target), advantage = the step's credit from the tree.

Where the search stopped short of a terminal node on its extracted path, the caller completed that
path by sampling the policy (`rollout.tree_search`: generated, and counted, for mcts as well); that completion
is a finished line too, so `with_completion` hangs it under the path's last node as one terminal step
(prior 0: the search never chose it). Every tree then holds at least one line.

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

__all__ = ["TreeRows", "tree_rows", "with_completion"]


@dataclass(frozen=True)
class TreeRows:
    """One tree's rows [R] (node-id order: parents first) and the training reward of each of its
    terminal nodes [L] (its lines)."""

    rows: list[Trajectory]
    line_rewards: list[float]


def with_completion(outcome: SearchOutcome) -> Tree:
    """The outcome's tree, with the policy's completion of its extracted path (if the search stopped
    short) added IN PLACE as a terminal child of the path's last node."""
    tree, path = outcome.tree, outcome.trajectory
    rest = path.completion_ids[path.search_tokens:]
    if outcome.completed_by_policy and rest:
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
        rows.append(Trajectory(
            prompt_ids=tree.prompt + tree.completion(credit.parent), completion_ids=tokens,
            behaviour_logprobs=logprobs, reward=credit.value, sparse=credit_sparse.value, group=group,
            search_tokens=len(tokens), advantage=credit.advantage,
            stats={"node": node, "depth": tree.depth[node], "leaves": credit.leaves},
        ))
    return TreeRows(rows, [s.reward for s in scores.values()])
