"""Trajectories -> the learner's `Batch`: right-padded rows, loss on generated tokens only.

The batch leaves here with zero advantages and returns: they need the value head's estimates on
these very rows, which the loop computes next (`dataclasses.replace` fills them in). Rows whose
rollout computed their advantage (`Trajectory.advantage`, mcts-tree) leave with it on their loss
mask instead, for the method's advantage slot to pass on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from treedistill.algorithms.batch import Batch, pad_rows
from treedistill.rollout.trajectory import Trajectory

__all__ = ["to_batch"]


def to_batch(trajectories: Sequence[Trajectory], *, pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """B trajectories -> Batch of B rows in the given order.

    loss_mask is 1 exactly on completion tokens (prompt and padding carry no loss); rewards [B] are
    the dense rewards; group_ids [B] the trajectories' `group` (rows of a group must be contiguous,
    as `Batch.minibatches` keeps groups whole). Completions are not truncated: the rollout already
    bounded them, and cutting here would train on a sequence the reward was not given for.
    """
    assert trajectories, "to_batch: no trajectories"
    groups = [t.group for t in trajectories]
    assert all(a <= b for a, b in zip(groups, groups[1:])), (
        f"to_batch: trajectories of one group must be contiguous and in group order, got groups {groups}"
    )
    tensors = pad_rows([t.prompt_ids for t in trajectories], [t.completion_ids for t in trajectories],
                      [t.behaviour_logprobs for t in trajectories], pad_id=pad_id)
    B, T = tensors["input_ids"].shape
    zeros = torch.zeros((B, T), dtype=torch.float32)  # [B, T]
    given = [t.advantage is not None for t in trajectories]
    assert all(given) or not any(given), "to_batch: either every trajectory carries its advantage or none does"
    advantages = zeros
    if all(given):
        advantages = torch.tensor([t.advantage for t in trajectories], dtype=torch.float32)[:, None] * tensors["loss_mask"]
    return Batch(
        **{name: value.to(device) for name, value in tensors.items()},
        rewards=torch.tensor([t.reward for t in trajectories], dtype=torch.float32, device=device),  # [B]
        advantages=advantages.to(device),  # [B, T]
        returns=zeros.to(device),
        group_ids=torch.tensor(groups, dtype=torch.long, device=device),  # [B]
    )
