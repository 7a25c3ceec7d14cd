"""Losses: numbers worked out by hand, masks, the paper's CISPO formula, and micro-batch accumulation."""

import math
from dataclasses import replace

import pytest
import torch

from treedistill.algorithms import (
    ADVANTAGES,
    Batch,
    combine_metrics,
    k3_kl,
    pad_rows,
    shift_right,
    token_entropy,
    token_logprobs,
    total_loss,
)
from treedistill.algorithms.losses import cispo_policy_loss, kl_penalty, ppo_clip_policy_loss, value_loss
from treedistill.config import TrainConfig

ln = math.log


def loss_cfg(**fields):
    """The loss settings as the learner passes them: a TrainConfig (its defaults are the reference's)."""
    return TrainConfig(**fields)


def one_row(current, behaviour, advantages, *, returns=None, ref=None):
    """B=1: column 0 is a prompt token, columns 1..n are n generated tokens."""
    n = len(current)
    pad = [0.0]
    logprobs = torch.tensor([pad + list(current)], dtype=torch.float64, requires_grad=True)
    batch = Batch(
        input_ids=torch.zeros(1, n + 1, dtype=torch.long),
        attention_mask=torch.ones(1, n + 1, dtype=torch.long),
        loss_mask=torch.tensor([[0.0] + [1.0] * n]),
        behaviour_logprobs=torch.tensor([pad + list(behaviour)], dtype=torch.float64),
        rewards=torch.zeros(1),
        advantages=torch.tensor([pad + list(advantages)], dtype=torch.float64),
        returns=torch.tensor([pad + list(returns or [0.0] * n)], dtype=torch.float64),
        ref_logprobs=None if ref is None else torch.tensor([pad + list(ref)], dtype=torch.float64),
    )
    return batch, logprobs


def test_ppo_clip_both_clipped_regimes_and_unclipped():
    cfg = loss_cfg(policy_loss="ppo", ppo_clip=0.2)
    # token 1: A=+2, r=0.75/0.5=1.5 > 1.2 -> min(3.0, 1.2*2=2.4) = 2.4, clipped, grad 0
    # token 2: A=-1, r=0.25/0.5=0.5 < 0.8 -> min(-0.5, 0.8*-1=-0.8) = -0.8, clipped, grad 0
    # token 3: A=+1, r=1.1 inside [0.8,1.2] -> min(1.1, 1.1) = 1.1, d(-rA)/dlogp = -rA = -1.1
    # token 4: A=-1, r=1.5 > 1.2 but A<0 -> min(-1.5, -1.2) = -1.5 (no rescue), grad -rA = +1.5
    # loss = -(2.4 - 0.8 + 1.1 - 1.5) / 4 = -1.2 / 4 = -0.3
    batch, logprobs = one_row(
        current=[ln(0.75), ln(0.25), ln(0.55), ln(0.75)],
        behaviour=[ln(0.5), ln(0.5), ln(0.5), ln(0.5)],
        advantages=[2.0, -1.0, 1.0, -1.0],
    )
    loss, metrics = ppo_clip_policy_loss(batch, logprobs, None, cfg)
    loss.backward()
    assert loss.item() == pytest.approx(-0.3, abs=1e-9)
    expected_grad = [0.0, 0.0, 0.0, -1.1 / 4, 1.5 / 4]
    assert logprobs.grad[0].tolist() == pytest.approx(expected_grad, abs=1e-9)
    assert metrics["clip_frac"] == pytest.approx(0.5)  # tokens 1 and 2
    assert metrics["ratio_max"] == pytest.approx(1.5)
    assert metrics["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.1 + 1.5) / 4)


def test_cispo_capped_and_uncapped_gradient_only_through_logpi():
    # eps_high=4.0 -> weight cap 1+4 = 5.0 (the reference's min(r, 5.0)); eps_low=None: no floor.
    cfg = loss_cfg(policy_loss="cispo", eps_low=None, eps_high=4.0)
    # token 1: r = 0.8/0.1 = 8 -> w = 5 (capped); A=+1: -5*1*ln(0.8) = +1.115718; grad -w*A = -5
    # token 2: r = 0.2/0.4 = 0.5 -> w = 0.5 (no floor); A=-2: -0.5*-2*ln(0.2) = -1.609438; grad +1
    # token 3: r = 1 -> w = 1; A=0.5: -1*0.5*ln(0.5) = +0.346574; grad -0.5
    # loss = (1.115718 - 1.609438 + 0.346574) / 3 = -0.147146 / 3 = -0.049049
    batch, logprobs = one_row(
        current=[ln(0.8), ln(0.2), ln(0.5)],
        behaviour=[ln(0.1), ln(0.4), ln(0.5)],
        advantages=[1.0, -2.0, 0.5],
    )
    loss, metrics = cispo_policy_loss(batch, logprobs, None, cfg)
    loss.backward()
    assert loss.item() == pytest.approx(-0.147146 / 3, abs=1e-6)
    # d loss / d logpi = -sg(w) * A / N: the weight itself is a constant (stop-gradient)
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, -5 / 3, 1 / 3, -0.5 / 3], abs=1e-9)
    assert metrics["clip_frac"] == pytest.approx(1 / 3)
    assert metrics["ratio_max"] == pytest.approx(8.0)

    # veRL-style floor eps_low=0.2: token 2's weight becomes 0.8 -> grad -0.8 * -2 / 3
    batch, logprobs = one_row(
        current=[ln(0.8), ln(0.2), ln(0.5)], behaviour=[ln(0.1), ln(0.4), ln(0.5)], advantages=[1.0, -2.0, 0.5]
    )
    loss, metrics = cispo_policy_loss(batch, logprobs, None, loss_cfg(eps_low=0.2, eps_high=4.0))
    loss.backward()
    assert logprobs.grad[0, 2].item() == pytest.approx(1.6 / 3, abs=1e-9)
    assert metrics["clip_frac"] == pytest.approx(2 / 3)


def random_ragged_batch(seed, *, B=5, dtype=torch.float64):
    """Rows with prompts of 1..3 tokens, completions of 1..7 tokens, right padding."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 50, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
               for _ in range(B)]
    completions = [torch.randint(0, 50, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(B)]
    behaviour = [(-torch.rand(len(c), generator=g) * 3).tolist() for c in completions]
    tokens = pad_rows(prompts, completions, behaviour, pad_id=0)
    shape = tokens["input_ids"].shape
    mask = tokens["loss_mask"]
    advantages = torch.randn(B, generator=g, dtype=dtype)[:, None] * mask
    batch = Batch(**tokens, rewards=torch.randn(B, generator=g), advantages=advantages,
                  returns=torch.randn(shape, generator=g, dtype=dtype) * mask,
                  ref_logprobs=-torch.rand(shape, generator=g, dtype=dtype) * 3)
    # current log-probs near the behaviour ones, so ratios spread on both sides of the clip range
    current = tokens["behaviour_logprobs"].to(dtype) + torch.randn(shape, generator=g, dtype=dtype) * 0.8
    return batch, prompts, completions, current


def paper_cispo_objective(prompts, completions, logprobs, behaviour, advantages, eps_low, eps_high):
    """MiniMax-M1 eq. 4, written independently per sequence and per token:
    J = 1 / sum_i |o_i| * sum_i sum_t sg(clip(r_it, 1 - eps_low, 1 + eps_high)) * A_i * log pi(o_it)."""
    total, objective = 0, 0.0
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        for t in range(len(completion)):
            col = len(prompt) + t
            r = math.exp(logprobs[i, col].item() - behaviour[i, col].item())
            weight = min(max(r, 1 - eps_low), 1 + eps_high)
            objective = objective + weight * advantages[i, col].item() * logprobs[i, col]
            total += 1
    return objective / total


@pytest.mark.parametrize("eps_low,eps_high", [(None, 4.0), (0.2, 0.28), (0.5, 1.0)])
def test_cispo_equals_paper_formula(eps_low, eps_high):
    batch, prompts, completions, current = random_ragged_batch(seed=1)
    ours = current.clone().requires_grad_(True)
    loss, _ = cispo_policy_loss(batch, ours, None, loss_cfg(eps_low=eps_low, eps_high=eps_high))
    loss.backward()
    theirs = current.clone().requires_grad_(True)
    floor = 1e9 if eps_low is None else eps_low  # the paper: "a large value" = no lower bound
    objective = paper_cispo_objective(prompts, completions, theirs, batch.behaviour_logprobs,
                                      batch.advantages, floor, eps_high)
    (-objective).backward()
    assert loss.item() == pytest.approx((-objective).item(), abs=1e-10)
    torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-12, rtol=0)


def test_cispo_maps_to_trl_and_verl_clamps():
    batch, _, _, current = random_ragged_batch(seed=2)
    mask = batch.loss_mask.bool()
    ratio = torch.exp(current - batch.behaviour_logprobs.double())
    n = mask.sum()

    def reference_loss(weight):
        return -(torch.where(mask, weight * batch.advantages * current, 0.0)).sum() / n

    # TRL loss_type="cispo": clamp(ratio, max=epsilon_high) with epsilon_high the absolute cap 5.0
    trl = reference_loss(torch.clamp(ratio, max=5.0))
    ours, _ = cispo_policy_loss(batch, current, None, loss_cfg(eps_low=None, eps_high=4.0))
    assert ours.item() == pytest.approx(trl.item(), abs=1e-12)
    # veRL loss_mode="cispo": clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high), defaults 0.2
    verl = reference_loss(torch.clamp(ratio, 1 - 0.2, 1 + 0.2))
    ours, _ = cispo_policy_loss(batch, current, None, loss_cfg(eps_low=0.2, eps_high=0.2))
    assert ours.item() == pytest.approx(verl.item(), abs=1e-12)


def test_k3_kl_hand_values():
    # r = pi_ref/pi; k3 = r - ln r - 1.  r=1 -> 0;  r=2 -> 2 - 0.693147 - 1 = 0.306853;
    # r=0.5 -> 0.5 + 0.693147 - 1 = 0.193147.  Sum = 0.5 exactly, mean over 3 tokens = 1/6.
    # d k3 / d ln pi = -(r - 1) = 1 - r: r=2 -> -1, r=0.5 -> +0.5, r=1 -> 0.
    assert k3_kl(torch.tensor(-1.0), torch.tensor(-1.0)).item() == 0.0
    batch, logprobs = one_row(current=[ln(0.2), ln(0.4), ln(0.3)], behaviour=[0.0] * 3,
                              advantages=[0.0] * 3, ref=[ln(0.4), ln(0.2), ln(0.3)])
    loss, metrics = kl_penalty(batch, logprobs, None, loss_cfg())
    loss.backward()
    assert loss.item() == pytest.approx(0.5 / 3, abs=1e-12)
    assert metrics["kl"] == pytest.approx(0.5 / 3)
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, -1 / 3, 0.5 / 3, 0.0], abs=1e-12)


def test_value_loss_hand_values():
    # V = [0.5, -0.2], target R = 1: (0.5)^2 + (1.2)^2 = 0.25 + 1.44 = 1.69, / 2 tokens = 0.845.
    # d/dV = 2 (V - R) / 2 = [-0.5, -1.2]
    batch, _ = one_row(current=[0.0, 0.0], behaviour=[0.0, 0.0], advantages=[0.0, 0.0], returns=[1.0, 1.0])
    values = torch.tensor([[0.9, 0.5, -0.2]], dtype=torch.float64, requires_grad=True)  # col 0: prompt
    loss, metrics = value_loss(batch, None, values, loss_cfg())
    loss.backward()
    assert loss.item() == pytest.approx(0.845, abs=1e-12)
    assert values.grad[0].tolist() == pytest.approx([0.0, -0.5, -1.2], abs=1e-12)


def test_total_loss_adds_weighted_terms():
    # policy (CISPO, r = 1, A = 1, ln pi = ln 0.5): -1 * 1 * ln 0.5 = 0.693147 per token
    # value: (0 - 1)^2 = 1 per token; KL with pi_ref = pi: 0
    # total = 0.693147 + 0.5 * 1 + 0.1 * 0 = 1.193147
    batch, logprobs = one_row(current=[ln(0.5)] * 2, behaviour=[ln(0.5)] * 2, advantages=[1.0] * 2,
                              returns=[1.0] * 2, ref=[ln(0.5)] * 2)
    values = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    cfg = loss_cfg(policy_loss="cispo", value_coef=0.5, kl_coef=0.1)
    entropy = torch.tensor([[0.0, 2.0, 4.0]])
    loss, metrics = total_loss(batch, logprobs, values, cfg, entropy=entropy)
    assert loss.item() == pytest.approx(ln(2) + 0.5, abs=1e-12)
    assert metrics["policy_loss"] == pytest.approx(ln(2))
    assert metrics["value_loss"] == pytest.approx(1.0)
    assert metrics["kl"] == pytest.approx(0.0)
    assert metrics["entropy"] == pytest.approx(3.0)
    assert metrics["tokens"] == 2.0
    with pytest.raises(AssertionError, match="ref_logprobs"):
        total_loss(replace(batch, ref_logprobs=None), logprobs, values, cfg)
    with pytest.raises(ValueError, match="policy_loss must be one of"):
        total_loss(batch, logprobs, values, loss_cfg(policy_loss="reinforce"))


@pytest.mark.parametrize("policy_loss", ["cispo", "ppo"])
def test_prompt_and_padding_carry_no_gradient(policy_loss):
    batch, _, _, current = random_ragged_batch(seed=3)
    off = ~batch.loss_mask.bool()
    # poison every position off the mask: -inf log-probs, absurd behaviour log-probs and values
    poisoned = torch.where(off, torch.full_like(current, -math.inf), current).requires_grad_(True)
    behaviour = torch.where(off, torch.full_like(current, -1e9), batch.behaviour_logprobs.double())
    batch = replace(batch, behaviour_logprobs=behaviour)
    values = torch.where(off, torch.full_like(current, 1e6), torch.zeros_like(current)).requires_grad_(True)
    cfg = loss_cfg(policy_loss=policy_loss, value_coef=1.0, kl_coef=0.05)
    loss, metrics = total_loss(batch, poisoned, values, cfg)
    loss.backward()
    assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in metrics.values())
    assert bool((poisoned.grad[off] == 0).all()) and bool((values.grad[off] == 0).all())
    assert bool((poisoned.grad[~off] != 0).any()) and bool((values.grad[~off] != 0).any())


def test_token_logprobs_and_entropy_alignment():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    lp = token_logprobs(logits, ids)
    # column t holds log p(ids[t] | ids[:t]), read from the logits at position t - 1
    expected = torch.log_softmax(logits[0, 2], -1)[ids[0, 3]]
    assert lp[0, 3].item() == pytest.approx(expected.item(), abs=1e-6)
    assert lp[:, 0].tolist() == [0.0, 0.0]
    p = torch.softmax(logits[1, 3], -1)
    assert token_entropy(logits)[1, 4].item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-5)
    assert shift_right(torch.tensor([[1.0, 2.0, 3.0]])).tolist() == [[0.0, 1.0, 2.0]]


def tiny_lm():
    """A real 2-layer Qwen2 causal LM (vocab 64, width 32) with the project's value head, in float64
    so that 'batched == accumulated' can be checked to 1e-6 without float32 summation noise."""
    transformers = pytest.importorskip("transformers")
    from treedistill.models.value_head import ValueHead

    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.Qwen2ForCausalLM(config).double()
    head = ValueHead(32).double()
    return model, head


def forward(model, head, batch):
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    logprobs = token_logprobs(out.logits, batch.input_ids)  # [B, T]
    values = shift_right(head(out.hidden_states[-1]))  # [B, T]: V(s_t) read at position t - 1
    return logprobs, values


@pytest.mark.parametrize("policy_loss", ["cispo", "ppo"])
def test_one_batch_of_8_equals_8_accumulated_batches_of_1(policy_loss):
    # Holds because every micro-batch's loss is (sum over ITS tokens) / (token count of the WHOLE
    # batch): Batch.split passes the parent's count down, so the 8 losses add up to the batch loss.
    model, head = tiny_lm()
    batch, _, _, _ = random_ragged_batch(seed=4, B=8)
    with torch.no_grad():
        current, old_values = forward(model, head, batch)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(current.shape, generator=g, dtype=torch.float64) * 0.5
    batch = replace(batch, behaviour_logprobs=(current + noise) * batch.loss_mask,  # off-policy: ratios != 1
                    ref_logprobs=current + noise.flip(0))
    advantages, returns = ADVANTAGES["reward_minus_value"](batch.rewards, old_values, batch.loss_mask, None)
    batch = replace(batch, advantages=advantages, returns=returns)
    cfg = loss_cfg(policy_loss=policy_loss, eps_low=0.2, eps_high=0.3, value_coef=1.0, kl_coef=0.05)
    params = list(model.parameters()) + list(head.parameters())

    logprobs, values = forward(model, head, batch)
    loss, metrics = total_loss(batch, logprobs, values, cfg)
    full_grads = torch.autograd.grad(loss, params, allow_unused=True)

    accumulated = [torch.zeros_like(p) for p in params]
    parts, summed = [], 0.0
    micro = batch.split(1)
    assert len(micro) == 8 and all(m.num_tokens == batch.num_tokens for m in micro)
    for m in micro:
        logprobs, values = forward(model, head, m)
        part_loss, part_metrics = total_loss(m, logprobs, values, cfg)
        for acc, grad in zip(accumulated, torch.autograd.grad(part_loss, params, allow_unused=True)):
            if grad is not None:
                acc += grad
        summed += part_loss.item()
        parts.append(part_metrics)
    assert summed == pytest.approx(loss.item(), abs=1e-9)
    assert metrics["clip_frac"] > 0  # the check covers clipped tokens too
    for full, acc in zip(full_grads, accumulated):
        torch.testing.assert_close(acc, torch.zeros_like(acc) if full is None else full, atol=1e-6, rtol=0)
    combined = combine_metrics(parts)
    for key in ("policy_loss", "value_loss", "kl", "clip_frac", "ratio_mean", "ratio_max", "loss", "tokens"):
        assert combined[key] == pytest.approx(metrics[key], abs=1e-6), key


def test_batch_minibatches_keep_groups_and_cover_all_rows():
    batch, _, _, _ = random_ragged_batch(seed=6, B=8)
    batch = replace(batch, group_ids=torch.arange(8) // 4)
    parts = batch.minibatches(4, generator=torch.Generator().manual_seed(0))
    assert len(parts) == 2
    assert sorted(int(g) for p in parts for g in p.group_ids.unique()) == [0, 1]
    assert sum(p.num_tokens for p in parts) == batch.num_tokens
    with pytest.raises(AssertionError, match="whole groups"):
        batch.minibatches(2)
    # a batch that minibatches of 8 do not divide (a step cut short by the budget): the last is smaller
    twelve, _, _, _ = random_ragged_batch(seed=7, B=12)
    twelve = replace(twelve, group_ids=torch.arange(12) // 4)
    parts = twelve.minibatches(8, generator=torch.Generator().manual_seed(0))
    assert [p.size for p in parts] == [8, 4] and sum(p.num_tokens for p in parts) == twelve.num_tokens
    assert all(len(p.group_ids.unique()) * 4 == p.size for p in parts)  # whole groups in each


def test_batch_rejects_loss_on_padding():
    tokens = pad_rows([[1, 2]], [[3]], [[-0.5]], pad_id=0)
    bad_mask = torch.tensor([[0.0, 1.0, 1.0]])
    with pytest.raises(AssertionError, match="loss_mask"):
        Batch(**{**tokens, "loss_mask": torch.tensor([[1.0, 0.0, 1.0]])}, rewards=torch.zeros(1),
              advantages=torch.zeros(1, 3), returns=torch.zeros(1, 3))
    tokens = pad_rows([[1]], [[3]], [[-0.5]], pad_id=0, max_len=3)
    tokens = {k: torch.cat([v, torch.zeros_like(v[:, :1])], dim=1) for k, v in tokens.items()}
    with pytest.raises(AssertionError, match="padding"):
        Batch(**{**tokens, "loss_mask": bad_mask}, rewards=torch.zeros(1), advantages=torch.zeros(1, 3),
              returns=torch.zeros(1, 3))
