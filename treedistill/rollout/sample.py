"""Sampling rollouts (no search): n full completions per problem, scored by the environment.

- `sample_problems`: the GRPO / CISPO / PPO rollout, n samples per problem kept as a group.
- `best_of_n`: best-of-N distillation's choice, the sample with the highest DENSE reward of each group
  (the first one on ties, so the choice is deterministic).

Every trajectory carries the behaviour log-probs recorded at generation time (`Sample.policy_logprobs`,
the raw policy at temperature 1 under the weights that sampled), so the learner's importance ratio
compares the updated policy with the policy that actually generated the tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from treedistill.rollout.trajectory import Trajectory

__all__ = ["best_of_n", "completion_text", "sample_problems"]


def completion_text(policy, tokens: Sequence[int]) -> str:
    """The text the environment scores: the completion without its closing end-of-sequence token
    (as `evaluate` strips it), so training and evaluation rewards are the same function."""
    tokens = list(tokens)
    if tokens and tokens[-1] in set(policy.eos_token_ids):
        tokens = tokens[:-1]
    return policy.decode(tokens)


def sample_problems(engine, policy, env, problems: Sequence[dict], *, n: int, temperature: float,
                    max_new_tokens: int, seed: int) -> list[list[Trajectory]]:
    """n scored samples for each problem: result[i] is the group of problems[i] (Trajectory.group = i).

    One engine call for all problems; the end-of-sequence token, when generated, is part of the
    completion and carries loss (the policy must learn to stop)."""
    assert n >= 1, f"need n >= 1 samples per problem, got {n}"
    prompts = [policy.prompt_ids(env.messages(p, compact=policy.compact_prompt)) for p in problems]
    outputs = engine.sample(prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    assert len(outputs) == len(problems) and all(len(o) == n for o in outputs), (
        f"engine returned {[len(o) for o in outputs]} samples for {len(problems)} prompts x {n}"
    )
    groups = []
    for i, (problem, prompt, samples) in enumerate(zip(problems, prompts, outputs)):
        group = []
        for s in samples:
            score = env.score(problem, completion_text(policy, s.tokens))
            group.append(Trajectory(
                prompt_ids=tuple(prompt), completion_ids=tuple(s.tokens),
                behaviour_logprobs=tuple(s.policy_logprobs), reward=float(score.reward),
                sparse=float(score.sparse), group=i,
                stats={"finish": s.finish},
            ))
        groups.append(group)
    return groups


def best_of_n(groups: Sequence[Sequence[Trajectory]]) -> list[Trajectory]:
    """The trajectory of highest reward (the training reward, `Score.reward`) of each group (the first on ties)."""
    best = []
    for group in groups:
        assert group, "best_of_n: empty group"
        best.append(max(group, key=lambda t: t.reward))  # max keeps the first maximal element
    return best
