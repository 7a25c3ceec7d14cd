"""Advantages and value targets: rewards (and value estimates) in, per-token tensors out.

Estimators (all outcome-reward: one scalar reward per completion, credited at its last token):
- `group_normalized`: GRPO / CISPO (MiniMax-M1), A_i = (R_i - mean_group) / std_group.
- `reward_minus_value`: the reference method, A_t = R - V(s_t) on every generated token.
- `gae`: generalised advantage estimation (Schulman et al. 2016) as an option for the same methods.

Where we depart from the papers / the reference:
- group std is the unbiased (Bessel-corrected) estimate, as TRL and veRL compute it; a group whose
  rewards are all equal (std <= eps) gets advantage exactly 0 instead of (R - mean) / (std + eps),
  so float noise in R - mean cannot turn into a large spurious advantage.
- `gae` treats the end of every completion as terminal (V after the last token = 0): the reward of a
  truncated completion is the environment's defined reward for it, not a bootstrap.
- no advantage whitening across the batch (the reference has none).

`ADVANTAGES` maps a config name to an estimator with ONE signature:
`(rewards [B], values [B, T] | None, loss_mask [B, T], cfg) -> (advantages [B, T], returns [B, T])`,
`cfg` being any object with `group_size`, `gamma`, `lam` (TrainConfig has them).
"""

from __future__ import annotations

import torch

__all__ = [
    "ADVANTAGES",
    "gae",
    "group_advantages",
    "group_normalized",
    "reward_minus_value",
    "reward_minus_value_advantages",
    "gae_advantages",
]


def group_normalized(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """[B] -> [B]: (R_i - mean) / std within consecutive groups of `group_size` rows.

    Zero-variance groups (std <= eps, e.g. all samples wrong) get 0: they carry no learning signal.
    """
    B = rewards.shape[0]
    assert group_size >= 2 and B % group_size == 0, (
        f"group normalisation needs B divisible by group_size >= 2, got B={B}, group_size={group_size}"
    )
    grouped = rewards.float().reshape(B // group_size, group_size)  # [B/G, G]
    mean = grouped.mean(dim=1, keepdim=True)  # [B/G, 1]
    std = grouped.std(dim=1, keepdim=True, unbiased=True)  # [B/G, 1]
    centred = grouped - mean  # [B/G, G]
    advantages = torch.where(std > eps, centred / std.clamp_min(eps), torch.zeros_like(centred))
    return advantages.reshape(B)  # [B]


def reward_minus_value(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference advantage: A_t = R - V(s_t) on every generated token (no discount, no GAE).

    rewards [B], values [B, T] (detached estimates V(s_t), Batch alignment), mask [B, T] -> [B, T].
    """
    advantages = rewards.float()[:, None] - values.detach().float()  # [B, T]
    return torch.where(mask.bool(), advantages, torch.zeros_like(advantages))  # [B, T]


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over the generated tokens of each row; the reward sits on the LAST generated token.

    rewards [B], values [B, T], mask [B, T] -> (advantages [B, T], returns [B, T]), 0 off the mask.
    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t);  A_t = delta_t + gamma * lam * A_{t+1}
    (torchtune rlhf/rewards.py, veRL core_algos.compute_gae_advantage_return), with s_{t+1} the next
    GENERATED position (masked columns are skipped) and V = 0 after the last one. Returns
    A_t + V(s_t), the usual value target. gamma = lam = 1 gives exactly `reward_minus_value`.
    """
    values = values.detach().float()
    mask = mask.float()
    B, T = values.shape
    positions = torch.arange(T, device=values.device)[None, :].expand(B, T)  # [B, T]
    last = torch.where(mask > 0, positions, torch.full_like(positions, -1)).max(dim=1).values  # [B]
    token_rewards = (positions == last[:, None]).float() * rewards.float()[:, None] * mask  # [B, T]
    next_value = torch.zeros(B, device=values.device)  # [B]
    running = torch.zeros(B, device=values.device)  # [B]
    reversed_advantages = []
    for t in reversed(range(T)):
        m = mask[:, t]  # [B]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]  # [B]
        advantage_t = delta + gamma * lam * running  # [B]
        # masked columns (prompt, padding, tool output) pass the running values through untouched
        running = m * advantage_t + (1 - m) * running
        next_value = m * values[:, t] + (1 - m) * next_value
        reversed_advantages.append(m * advantage_t)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)  # [B, T]
    returns = (advantages + values) * mask  # [B, T]
    return advantages, returns


def group_advantages(rewards, values, mask, cfg):
    """GRPO / CISPO: the group-normalised advantage on every generated token; no value target."""
    per_row = group_normalized(rewards, cfg.group_size)  # [B]
    mask = mask.float()
    return per_row[:, None] * mask, rewards.float()[:, None] * mask  # [B, T], [B, T]


def reward_minus_value_advantages(rewards, values, mask, cfg):
    """The reference: A_t = R - V(s_t), value target R on every generated token."""
    assert values is not None, "advantage 'reward_minus_value' needs value estimates (a value head)"
    mask = mask.float()
    return reward_minus_value(rewards, values, mask), rewards.float()[:, None] * mask


def gae_advantages(rewards, values, mask, cfg):
    """GAE(gamma, lambda) with returns A_t + V(s_t) as value targets."""
    assert values is not None, "advantage 'gae' needs value estimates (a value head)"
    return gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)


ADVANTAGES = {
    "group": group_advantages,
    "reward_minus_value": reward_minus_value_advantages,
    "gae": gae_advantages,
}
