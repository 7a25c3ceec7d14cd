"""The data contract between rollouts (search or sampling) and the learner."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Trajectory:
    """One completion to train on, with what the learner needs to weigh it.

    prompt_ids: [P] chat-templated prompt tokens (never carry loss).
    completion_ids: [T] generated tokens (carry loss).
    behaviour_logprobs: [T] raw-policy (temperature 1) log-probs of `completion_ids`, recorded at
        GENERATION time by the policy that produced them (importance ratios divide by these).
    reward: dense (training) reward of the completion.
    sparse: sparse (evaluation) reward of the completion, for logging.
    group: index of the problem in the step's batch (GRPO/CISPO groups share it).
    search_tokens: how many leading completion tokens came from the search's extracted path; the rest
        were sampled by the policy to finish an incomplete path (0 for sampling methods).
    weight_version: version of the weights that generated it (for bounded staleness).
    advantage: the advantage of every completion token, computed by the rollout itself (mcts-tree: a
        step's credit from its searched tree, `search.credit`); None (every other method): the
        learner's advantage estimator computes it from the reward and the value head.
    stats: scalar statistics of the rollout (e.g. search tree size), for logging.
    """

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    behaviour_logprobs: tuple[float, ...]
    reward: float
    sparse: float
    group: int
    search_tokens: int = 0
    weight_version: int = 0
    advantage: float | None = None
    stats: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        assert len(self.completion_ids) == len(self.behaviour_logprobs), (
            f"expected one behaviour log-prob per completion token, got "
            f"{len(self.behaviour_logprobs)} for {len(self.completion_ids)} tokens"
        )
