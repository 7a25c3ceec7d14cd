"""Choosing the next token from logits: temperature and top-p as Hugging Face's warpers, then a draw.

Used by the native engine's decode loops (engine/native.py, engine/static_decode.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["SAMPLERS", "draw_inverse_cdf", "draw_multinomial", "sample_next"]


def draw_multinomial(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs [B, V] -> tokens [B] with `torch.multinomial`, the draw HF generate makes (same stream for a
    seed). Its CPU kernel draws one exponential per vocabulary entry: ~55 ms for 8 rows of Qwen's 151,936
    entries on one thread, more than the whole forward pass of a small model."""
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


def draw_inverse_cdf(probs: torch.Tensor, generator: torch.Generator | None, block: int = 1024) -> torch.Tensor:
    """probs [B, V] -> tokens [B] by inverting the cumulative distribution with one uniform per row.

    The same distribution as multinomial, with another random stream. Two levels, because a cumulative
    sum over 151,936 entries is sequential (7 ms for 8 rows on one CPU thread): sum blocks of `block`
    entries, find the block the uniform falls in, then the entry inside that block.
    """
    b, v = probs.shape
    blocks = F.pad(probs, (0, (-v) % block)).view(b, -1, block)  # [B, NB, C]
    block_mass = blocks.sum(dim=-1)  # [B, NB]
    block_cum = block_mass.cumsum(dim=-1)  # [B, NB]
    u = torch.rand(b, 1, generator=generator, device=probs.device, dtype=probs.dtype) * block_cum[:, -1:]  # [B, 1]
    blk = torch.searchsorted(block_cum, u, right=True).clamp_(max=block_cum.shape[1] - 1)  # [B, 1]
    inner = blocks[torch.arange(b, device=probs.device), blk[:, 0]]  # [B, C]
    inner_cum = inner.cumsum(dim=-1) + (block_cum.gather(1, blk) - block_mass.gather(1, blk))  # [B, C]
    idx = torch.searchsorted(inner_cum, u, right=True)[:, 0]  # [B]
    # Float rounding can put u past the block's last entry: take the last entry with mass instead.
    last = (torch.arange(block, device=probs.device) * (inner > 0)).amax(dim=-1)  # [B]
    return blk[:, 0] * block + torch.minimum(idx, last)


# name -> draw(probs [B, V], generator) -> tokens [B]; one signature, chosen by NativeEngine(sampler=...).
SAMPLERS = {"inverse_cdf": draw_inverse_cdf, "multinomial": draw_multinomial}


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None, draw=draw_inverse_cdf
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B, V] (float32) -> (tokens [B], log-prob under the sampling distribution [B],
    log-prob under the raw policy [B]).

    Temperature then top-p, as HF's TemperatureLogitsWarper and TopPLogitsWarper (sort ascending, drop
    tokens whose cumulative probability is <= 1 - top_p, keep at least one), then `draw`.
    Temperature 0 is greedy, whose sampling log-prob is 0 (probability 1).
    """
    policy_logp = torch.log_softmax(logits, dim=-1)  # [B, V]
    if temperature == 0:
        tokens = logits.argmax(dim=-1)  # [B]
        return tokens, torch.zeros_like(tokens, dtype=logits.dtype), policy_logp.gather(1, tokens[:, None])[:, 0]
    scores = logits
    if temperature == 1.0 and top_p == 1.0:
        sample_logp = policy_logp  # the sampling distribution is the policy: one log-softmax serves both
    else:
        scores = logits / temperature  # [B, V]
        if top_p < 1.0:
            sorted_logits, sorted_idx = torch.sort(scores, descending=False)
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
            remove = cum <= (1 - top_p)
            remove[..., -1:] = False
            scores = scores.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))
        sample_logp = torch.log_softmax(scores, dim=-1)  # [B, V]
    tokens = draw(scores.softmax(dim=-1), generator)  # [B]: softmax of the scores, as HF, so draws agree
    return (tokens, sample_logp.gather(1, tokens[:, None])[:, 0], policy_logp.gather(1, tokens[:, None])[:, 0])
