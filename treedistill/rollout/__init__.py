"""Rollouts: how completions to learn from (or to answer with) are produced through an Engine.

`search_problems` runs the step-level tree search over a batch of problems and returns, per problem,
the extracted trajectory (completed by the policy when the search stopped short) with its search
statistics and compute; `Trajectory` is the contract with the learner.
"""

from treedistill.rollout.trajectory import Trajectory
from treedistill.rollout.tree_search import (
    BatchCompute,
    SearchBridge,
    SearchOutcome,
    completion_budget,
    search_problems,
)

__all__ = ["BatchCompute", "SearchBridge", "SearchOutcome", "Trajectory", "completion_budget", "search_problems"]
