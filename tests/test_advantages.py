"""Advantages and value targets: numbers worked out by hand, and known identities."""

from types import SimpleNamespace

import pytest
import torch

from treedistill.algorithms import ADVANTAGES, gae, group_normalized, reward_minus_value


def test_group_normalized_hand_values_and_zero_variance():
    # group 1: [1, 0, 0, 0]: mean 0.25, unbiased std = sqrt((0.75^2 + 3 * 0.25^2) / 3) = sqrt(0.25) = 0.5
    #   -> [0.75 / 0.5, -0.25 / 0.5, ...] = [1.5, -0.5, -0.5, -0.5]
    # group 2: all 0.3: zero variance -> exactly 0 (no signal), not (R - mean) / eps
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.3, 0.3])
    advantages = group_normalized(rewards, group_size=4)
    assert advantages.tolist()[:4] == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-6)
    assert advantages.tolist()[4:] == [0.0, 0.0, 0.0, 0.0]
    # [1, -1]: mean 0, unbiased std sqrt(2) -> [1/sqrt(2), -1/sqrt(2)]
    assert group_normalized(torch.tensor([1.0, -1.0]), 2).tolist() == pytest.approx([0.70710678, -0.70710678])


def test_group_normalized_rejects_ragged_groups():
    with pytest.raises(AssertionError, match="divisible"):
        group_normalized(torch.zeros(6), group_size=4)
    with pytest.raises(AssertionError, match="group_size >= 2"):
        group_normalized(torch.zeros(4), group_size=1)


def test_reward_minus_value_hand_values():
    # row 0: R = 1, V = [., 0.5, 0.2] on generated columns 1, 2 -> [0, 0.5, 0.8]
    # row 1: R = -1, one generated token at column 1 with V = -0.25 -> -0.75; column 2 is padding
    rewards = torch.tensor([1.0, -1.0])
    values = torch.tensor([[9.0, 0.5, 0.2], [9.0, -0.25, 9.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    advantages = reward_minus_value(rewards, values, mask)
    assert advantages.flatten().tolist() == pytest.approx([0.0, 0.5, 0.8, 0.0, -0.75, 0.0], abs=1e-7)


def test_gae_hand_values():
    # mask [0, 1, 1, 1], V = [., 0.5, 0.2, -0.1], R = 1 on the last token, gamma = 0.9, lam = 0.8
    # t=3: delta = 1 + 0.9 * 0 - (-0.1) = 1.1                      A3 = 1.1
    # t=2: delta = 0 + 0.9 * (-0.1) - 0.2 = -0.29                   A2 = -0.29 + 0.72 * 1.1 = 0.502
    # t=1: delta = 0 + 0.9 * 0.2 - 0.5 = -0.32                      A1 = -0.32 + 0.72 * 0.502 = 0.04144
    # returns = A + V = [0.54144, 0.702, 1.0]
    values = torch.tensor([[7.0, 0.5, 0.2, -0.1]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    advantages, returns = gae(torch.tensor([1.0]), values, mask, gamma=0.9, lam=0.8)
    assert advantages[0].tolist() == pytest.approx([0.0, 0.04144, 0.502, 1.1], abs=1e-6)
    assert returns[0].tolist() == pytest.approx([0.0, 0.54144, 0.702, 1.0], abs=1e-6)


def test_gae_with_gamma_lambda_one_is_reward_minus_value():
    g = torch.Generator().manual_seed(0)
    values = torch.rand(4, 9, generator=g) * 2 - 1
    rewards = torch.tensor([1.0, -1.0, 0.3, -0.9])
    # ragged right padding, and one row whose generated span has a masked hole (column 4)
    mask = torch.tensor([
        [0, 1, 1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 1],
    ], dtype=torch.float32)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, reward_minus_value(rewards, values, mask))
    torch.testing.assert_close(returns, rewards[:, None] * mask)


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_every_estimator_shares_one_signature_and_is_zero_off_the_mask(name):
    cfg = SimpleNamespace(group_size=2, gamma=0.99, lam=0.95)
    rewards = torch.tensor([1.0, -1.0, 0.5, 0.5])
    values = torch.full((4, 5), 0.25)
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 0, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.float32)
    advantages, returns = ADVANTAGES[name](rewards, values, mask, cfg)
    assert advantages.shape == returns.shape == (4, 5)
    assert bool((advantages[mask == 0] == 0).all()) and bool((returns[mask == 0] == 0).all())
    if name == "group":
        # group 1: [1, -1] -> +-0.7071 on every generated token; group 2 equal -> 0
        assert advantages[0, 1].item() == pytest.approx(0.70710678)
        assert advantages[2:].abs().sum().item() == 0.0
