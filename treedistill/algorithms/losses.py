"""Policy, value and KL losses: tensors in, (scalar loss, metrics) out.

Every loss has ONE signature, `(batch, logprobs [B, T], values [B, T] | None, cfg) -> (loss, metrics)`:
`logprobs` are the current policy's log-probs of `batch.input_ids` and `values` the value head's
V(s_t), both in the Batch alignment (`batch.py`: column t = the token at position t), and `cfg` is
any object with the loss fields of `config.TrainConfig` (policy_loss, eps_low, eps_high, ppo_clip,
value_coef, kl_coef).

Token aggregation ("token-mean"): every loss is  sum over generated tokens / batch.num_tokens, where
num_tokens is the generated-token count of the whole optimizer batch (CISPO's 1 / sum_i |o_i|, also
DAPO's). Each token weighs the same whatever the length of its completion. Because the normaliser is
a number fixed per optimizer batch (`Batch.split` hands it to every micro-batch), losses and
gradients of micro-batches accumulated with `backward()` add up EXACTLY to those of the whole batch.
Metrics follow the same rule (sums over tokens / num_tokens), so `combine_metrics` adds them up
across micro-batches (and takes the max of `*_max` keys).

Policy losses (r_t = pi(o_t) / pi_behaviour(o_t), the behaviour log-probs recorded at generation):
- `ppo_clip_policy_loss` (Schulman et al. 2017, eq. 7; used by GRPO):
  per token  -min(r_t A_t, clip(r_t, 1 - ppo_clip, 1 + ppo_clip) A_t).
- `cispo_policy_loss` (MiniMax-M1, arXiv:2506.13585, eq. 4-5): per token
  -sg(clip(r_t, 1 - eps_low, 1 + eps_high)) * A_t * log pi(o_t); the gradient flows ONLY through
  log pi, so a token whose weight is clipped still learns (PPO would drop it).
  Our settings use the paper's parametrisation; eps_low = None means no lower bound (the paper: "we
  did not impose a lower bound ... we only tuned eps_high"). How they map:
    * TRL (GRPOTrainer, loss_type="cispo") computes `torch.clamp(ratio, max=epsilon_high).detach()`:
      its epsilon_high is the ABSOLUTE cap and there is no lower bound. Ours (eps_low=None,
      eps_high=E) == TRL epsilon_high = 1 + E. The reference's cap `min(r, 5.0)` is our eps_high=4.0
      (TRL epsilon_high=5.0).
    * veRL (loss_mode="cispo") computes `clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)`,
      both defaulting to clip_ratio = 0.2, so by default the weight lies in [0.8, 1.2]. Ours
      (eps_low=a, eps_high=E) == veRL clip_ratio_low=a, clip_ratio_high=E; our eps_low=None ==
      veRL clip_ratio_low=1.0 (a lower bound of 0, which a ratio never crosses).
- value loss: (V(s_t) - target_t)^2 with coefficient c_v (the reference: no 1/2, no value clipping).
- KL to the frozen initial policy: the k3 estimator r - log r - 1 with r = pi_ref / pi
  (Schulman, "Approximating KL divergence", 2020), gradient through pi.

Where we depart from the papers / the reference:
- the importance ratio divides by the behaviour log-probs recorded at GENERATION time (the reference
  recomputed them right before the update, so its ratio was always 1);
- log-ratios are clamped to [-20, 20] before exp (as veRL does) so a far off-policy token cannot
  overflow; such a token is clipped anyway;
- positions off the loss mask are zeroed with `torch.where` BEFORE any exp or product, so a -inf
  log-prob on a padding token can neither produce NaN nor leak a gradient.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from treedistill.algorithms.batch import Batch

__all__ = [
    "LOSSES",
    "cispo_policy_loss",
    "combine_metrics",
    "k3_kl",
    "kl_penalty",
    "ppo_clip_policy_loss",
    "token_entropy",
    "token_logprobs",
    "total_loss",
    "value_loss",
]

LOG_RATIO_LIMIT = 20.0


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors in float32; float32 / float64 kept as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _token_mean(x: torch.Tensor, batch: Batch) -> torch.Tensor:
    """sum over generated tokens of x [B, T] / batch.num_tokens -> scalar."""
    mask = batch.loss_mask.bool()
    return torch.where(mask, x, torch.zeros_like(x)).sum() / max(batch.num_tokens, 1.0)


def _on_mask(x: torch.Tensor, batch: Batch) -> torch.Tensor:
    """x [B, T] with every position off the loss mask replaced by 0 (value AND gradient)."""
    return torch.where(batch.loss_mask.bool(), x, torch.zeros_like(x))


def _log_ratio(batch: Batch, logprobs: torch.Tensor) -> torch.Tensor:
    """log pi - log pi_behaviour [B, T], 0 off the mask, clamped against overflow."""
    diff = _on_mask(_wide(logprobs), batch) - _on_mask(_wide(batch.behaviour_logprobs), batch)
    return diff.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)  # [B, T]


def _ratio_metrics(ratio: torch.Tensor, clipped: torch.Tensor, batch: Batch) -> dict[str, float]:
    mask = batch.loss_mask.bool()
    detached = ratio.detach()
    return {
        "clip_frac": float(_token_mean(clipped.float(), batch)),
        "ratio_mean": float(_token_mean(detached, batch)),
        "ratio_max": float(detached[mask].max()) if bool(mask.any()) else 1.0,
    }


def ppo_clip_policy_loss(batch: Batch, logprobs: torch.Tensor, values, cfg) -> tuple[torch.Tensor, dict]:
    """-min(r A, clip(r, 1 - eps, 1 + eps) A) per token, token-mean. `values` is unused."""
    eps = cfg.ppo_clip
    ratio = torch.exp(_log_ratio(batch, logprobs))  # [B, T]
    advantages = _on_mask(_wide(batch.advantages), batch)  # [B, T]
    unclipped = ratio * advantages  # [B, T]
    clipped = ratio.clamp(1.0 - eps, 1.0 + eps) * advantages  # [B, T]
    per_token = -torch.minimum(unclipped, clipped)  # [B, T]
    # the clipped branch is taken (and the token's gradient is 0) where it is strictly smaller
    clip_active = clipped < unclipped  # [B, T]
    loss = _token_mean(per_token, batch)
    return loss, {"policy_loss": float(loss.detach()), **_ratio_metrics(ratio, clip_active, batch)}


def cispo_policy_loss(batch: Batch, logprobs: torch.Tensor, values, cfg) -> tuple[torch.Tensor, dict]:
    """-sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * log pi per token, token-mean. `values` unused."""
    ratio = torch.exp(_log_ratio(batch, logprobs)).detach()  # [B, T]
    low = 0.0 if cfg.eps_low is None else 1.0 - cfg.eps_low
    weight = ratio.clamp(low, 1.0 + cfg.eps_high)  # [B, T], stop-gradient: ratio is detached
    advantages = _on_mask(_wide(batch.advantages), batch)  # [B, T]
    per_token = -weight * advantages * _on_mask(_wide(logprobs), batch)  # [B, T]
    loss = _token_mean(per_token, batch)
    return loss, {"policy_loss": float(loss.detach()), **_ratio_metrics(ratio, weight != ratio, batch)}


def value_loss(batch: Batch, logprobs, values: torch.Tensor, cfg) -> tuple[torch.Tensor, dict]:
    """(V(s_t) - target_t)^2 per generated token, token-mean; target = batch.returns."""
    assert values is not None and values.shape == batch.returns.shape, (
        f"value loss: expected values of shape {tuple(batch.returns.shape)}, got "
        f"{None if values is None else tuple(values.shape)}"
    )
    error = _on_mask(_wide(values), batch) - _on_mask(_wide(batch.returns), batch)  # [B, T]
    loss = _token_mean(error * error, batch)
    return loss, {"value_loss": float(loss.detach())}


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(pi || pi_ref) per token: r - log r - 1 with r = pi_ref / pi; >= 0, 0 at r=1."""
    log_r = (_wide(ref_logprobs) - _wide(logprobs)).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return torch.exp(log_r) - log_r - 1.0


def kl_penalty(batch: Batch, logprobs: torch.Tensor, values, cfg) -> tuple[torch.Tensor, dict]:
    """k3 KL to the frozen initial policy, token-mean. `values` is unused."""
    assert batch.ref_logprobs is not None, "the KL term needs batch.ref_logprobs (kl_coef > 0)"
    per_token = k3_kl(_on_mask(logprobs, batch), _on_mask(batch.ref_logprobs, batch))  # [B, T]
    loss = _token_mean(per_token, batch)
    return loss, {"kl": float(loss.detach())}


LOSSES = {"cispo": cispo_policy_loss, "ppo": ppo_clip_policy_loss}


def total_loss(
    batch: Batch,
    logprobs: torch.Tensor,
    values: torch.Tensor | None,
    cfg,
    *,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """LOSSES[cfg.policy_loss] + value_coef * value MSE + kl_coef * k3 KL.

    `entropy` [B, T] (from `token_entropy`) is only reported. The value term needs `values` when
    value_coef > 0; the KL term needs batch.ref_logprobs when kl_coef > 0 (it is still reported,
    without gradient, when ref_logprobs are there and kl_coef == 0).
    """
    if cfg.policy_loss not in LOSSES:
        raise ValueError(f"policy_loss must be one of {sorted(LOSSES)}, got {cfg.policy_loss!r}")
    loss, metrics = LOSSES[cfg.policy_loss](batch, logprobs, values, cfg)
    if cfg.value_coef > 0:
        v_loss, v_metrics = value_loss(batch, logprobs, values, cfg)
        loss = loss + cfg.value_coef * v_loss
        metrics.update(v_metrics)
    if cfg.kl_coef > 0:
        kl, kl_metrics = kl_penalty(batch, logprobs, values, cfg)
        loss = loss + cfg.kl_coef * kl
        metrics.update(kl_metrics)
    elif batch.ref_logprobs is not None:
        with torch.no_grad():
            metrics.update(kl_penalty(batch, logprobs, values, cfg)[1])
    if entropy is not None:
        metrics["entropy"] = float(_token_mean(_wide(entropy.detach()), batch))
    metrics["loss"] = float(loss.detach())
    metrics["tokens"] = float(batch.loss_mask.sum())
    return loss, metrics


def combine_metrics(parts: Iterable[dict]) -> dict:
    """Metrics of micro-batches of one optimizer batch -> the batch's metrics.

    Token-mean metrics are already divided by the whole batch's token count, so they add up; keys
    ending in `_max` take the maximum."""
    combined: dict = {}
    for part in parts:
        for key, value in part.items():
            if key not in combined:
                combined[key] = value
            elif key.endswith("_max"):
                combined[key] = max(combined[key], value)
            else:
                combined[key] += value
    return combined


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-prob of each token of `input_ids` under the model whose logits are given.

    logits [B, T, V] (position t predicts token t+1), input_ids [B, T] -> [B, T] in the Batch
    alignment: out[:, t] = log p(input_ids[:, t] | input_ids[:, :t]), out[:, 0] = 0.
    Computed in at least float32 as gathered logit - logsumexp (no [B, T, V] log-softmax copy).
    The one definition: the learner, the frozen reference (`Policy.reference`) and the HF engine's
    scoring all use it."""
    head = logits[:, :-1]  # [B, T-1, V]
    targets = input_ids[:, 1:]  # [B, T-1]
    chosen = _wide(head.gather(-1, targets.unsqueeze(-1)).squeeze(-1))  # [B, T-1]
    logprobs = chosen - torch.logsumexp(_wide(head), dim=-1)  # [B, T-1]
    return torch.cat([torch.zeros_like(logprobs[:, :1]), logprobs], dim=1)  # [B, T]


@torch.no_grad()
def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the distribution each token was drawn from, [B, T, V] -> [B, T] (Batch alignment,
    column 0 = 0); a metric only, never differentiated."""
    head = _wide(logits[:, :-1])  # [B, T-1, V]
    log_p = torch.log_softmax(head, dim=-1)  # [B, T-1, V]
    entropy = -(log_p.exp() * log_p).sum(dim=-1)  # [B, T-1]
    return torch.cat([torch.zeros_like(entropy[:, :1]), entropy], dim=1)  # [B, T]
