"""The learner's batch: padded token rows plus everything the losses weigh them with.

Alignment convention (every [B, T] tensor here and in `losses.py`): column t holds the quantity of
the token AT position t of `input_ids`, i.e. of the action that produced `input_ids[:, t]` from the
state `input_ids[:, :t]`. Column 0 can never be a generated token. `shift_right` turns model outputs,
which are indexed by the position that PRODUCED them, into this convention.

Rows are right-padded: prompt first (column 0 on), then the completion, then padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

__all__ = ["Batch", "pad_rows", "shift_right"]


@dataclass(frozen=True)
class Batch:
    """One optimizer batch (or a slice of one) of B right-padded rows of length T.

    input_ids: [B, T] long, prompt + completion + padding.
    attention_mask: [B, T] 1 on prompt and completion tokens, 0 on padding.
    loss_mask: [B, T] 1 on generated (completion) tokens only; prompt and padding are 0.
    behaviour_logprobs: [B, T] raw-policy (temperature 1) log-probs of each generated token, recorded
        at GENERATION time by the weights that sampled it (0 off the loss mask). Importance ratios
        divide by these, so stale generator weights are corrected instead of hidden (ratio == 1).
    rewards: [B] dense reward of each completion.
    advantages: [B, T] advantage of each generated token (0 off the loss mask).
    returns: [B, T] value-head target of each generated token (0 off the loss mask).
    ref_logprobs: [B, T] log-probs under the frozen initial policy (for the KL term), or None.
    old_values: [B, T] value estimates V(s_t) when the advantages were computed, or None.
    group_ids: [B] long, index of the problem each row answers (rows of one group share it), or None.
    token_count: the number of generated tokens the loss is normalised by. None means this batch's
        own `loss_mask.sum()`; `split` sets it to the parent batch's count so that micro-batches
        accumulated with `backward()` add up to exactly the parent's loss and gradient.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    behaviour_logprobs: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    token_count: float | None = None

    def __post_init__(self):
        B, T = self.input_ids.shape
        for name in ("attention_mask", "loss_mask", "behaviour_logprobs", "advantages", "returns",
                     "ref_logprobs", "old_values"):
            value = getattr(self, name)
            assert value is None or tuple(value.shape) == (B, T), (
                f"Batch.{name}: expected shape {(B, T)} like input_ids, got {tuple(value.shape)}"
            )
        for name in ("rewards", "group_ids"):
            value = getattr(self, name)
            assert value is None or tuple(value.shape) == (B,), (
                f"Batch.{name}: expected shape {(B,)}, got {tuple(value.shape)}"
            )
        assert T < 2 or bool((self.attention_mask[:, 1:] <= self.attention_mask[:, :-1]).all()), (
            "Batch rows must be right-padded: attention_mask 1s first, then 0s"
        )
        assert not bool((self.loss_mask.bool() & ~self.attention_mask.bool()).any()), (
            "Batch.loss_mask marks a padding position; only attended (generated) tokens carry loss"
        )
        assert B == 0 or not bool(self.loss_mask[:, 0].any()), (
            "Batch.loss_mask[:, 0] must be 0: the first position has no state to be generated from"
        )

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> float:
        """The loss normaliser: `token_count`, or this batch's own generated-token count."""
        if self.token_count is not None:
            return float(self.token_count)
        return float(self.loss_mask.sum().item())

    def select(self, rows: torch.Tensor | Sequence[int]) -> Batch:
        """The given rows as a batch of its own (normalised by its own token count), trailing
        all-padding columns dropped."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        width = int(self.attention_mask[index].sum(dim=1).max().item()) if len(index) else 0
        fields = {}
        for name in ("input_ids", "attention_mask", "loss_mask", "behaviour_logprobs", "advantages",
                     "returns", "ref_logprobs", "old_values"):
            value = getattr(self, name)
            fields[name] = None if value is None else value[index, :width]
        for name in ("rewards", "group_ids"):
            value = getattr(self, name)
            fields[name] = None if value is None else value[index]
        return Batch(**fields, token_count=None)

    def split(self, size: int) -> list[Batch]:
        """Consecutive micro-batches of at most `size` rows, each normalised by THIS batch's token
        count: the sum of their losses (and gradients) equals this batch's loss (and gradient)."""
        assert size > 0, f"micro-batch size must be positive, got {size}"
        total = self.num_tokens
        return [replace(self.select(range(i, min(i + size, self.size))), token_count=total)
                for i in range(0, self.size, size)]

    def minibatches(self, size: int, generator: torch.Generator | None = None) -> list[Batch]:
        """A shuffled partition into minibatches of `size` rows (one optimizer step each; the last one
        smaller where `size` does not divide the batch, as in a step cut short by the budget), whole
        groups kept together when `group_ids` is set (rows of a group must be contiguous, all groups
        of one size). `group_minibatches(size // G)` is the same partition."""
        assert size > 0, f"minibatch size must be > 0, got {size}"
        group = 1
        if self.group_ids is not None:
            group = int(torch.unique_consecutive(self.group_ids, return_counts=True)[1][0].item())
            assert size % group == 0, f"minibatch size {size} must hold whole groups of {group}"
            assert self.size % group == 0, f"{self.size} rows do not make whole groups of {group}"
        return self.group_minibatches(size // group, generator)

    def group_minibatches(self, groups: int, generator: torch.Generator | None = None) -> list[Batch]:
        """A shuffled partition into minibatches of `groups` whole groups each (the last one smaller
        where `groups` does not divide their number). Groups are the runs of equal `group_ids` (each
        row its own group when None) and may differ in size (mcts-tree: a tree's rows). The groups'
        order is one `randperm` over them, so groups of equal size G give exactly the partition of
        `minibatches(groups * G)`."""
        assert groups > 0, f"groups per minibatch must be > 0, got {groups}"
        if self.group_ids is None:
            counts = torch.ones(self.size, dtype=torch.long)  # [B]
        else:
            counts = torch.unique_consecutive(self.group_ids, return_counts=True)[1].cpu()  # [n]
        starts = torch.cumsum(counts, 0) - counts  # [n]
        order = torch.randperm(len(counts), generator=generator)  # [n]
        rows = [torch.arange(int(starts[g]), int(starts[g] + counts[g])) for g in order.tolist()]
        return [self.select(torch.cat(rows[i:i + groups])) for i in range(0, len(rows), groups)]


def shift_right(x: torch.Tensor) -> torch.Tensor:
    """[B, T, ...] -> [B, T, ...] with out[:, t] = x[:, t - 1] and out[:, 0] = 0.

    A causal LM's logits and hidden state at position t-1 describe the state `input_ids[:, :t]`
    that generated token t; this moves them to column t (the Batch convention)."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)


def pad_rows(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    behaviour_logprobs: Sequence[Sequence[float]],
    *,
    pad_id: int,
    max_len: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-padded token tensors for `Batch(**pad_rows(...), rewards=..., advantages=..., ...)`.

    Returns input_ids, attention_mask, loss_mask (1 on completion tokens) and behaviour_logprobs,
    all [B, T] with T the longest prompt + completion. `max_len` truncates each row's completion so
    that prompt + completion fits (the prompt itself is never cut).
    """
    assert len(prompt_ids) == len(completion_ids) == len(behaviour_logprobs), (
        "pad_rows: expected one prompt, completion and behaviour log-prob row per trajectory, got "
        f"{len(prompt_ids)}, {len(completion_ids)}, {len(behaviour_logprobs)}"
    )
    rows = []
    for prompt, completion, logprobs in zip(prompt_ids, completion_ids, behaviour_logprobs):
        assert len(prompt) > 0, "pad_rows: every row needs at least one prompt token"
        assert len(completion) == len(logprobs), (
            f"pad_rows: {len(completion)} completion tokens but {len(logprobs)} behaviour log-probs"
        )
        keep = len(completion) if max_len is None else max(0, min(len(completion), max_len - len(prompt)))
        rows.append((list(prompt), list(completion[:keep]), list(logprobs[:keep])))
    B = len(rows)
    T = max((len(p) + len(c) for p, c, _ in rows), default=0)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((B, T), dtype=torch.long)  # [B, T]
    loss_mask = torch.zeros((B, T), dtype=torch.float32)  # [B, T]
    behaviour = torch.zeros((B, T), dtype=torch.float32)  # [B, T]
    for b, (prompt, completion, logprobs) in enumerate(rows):
        P, C = len(prompt), len(completion)
        input_ids[b, :P + C] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[b, :P + C] = 1
        loss_mask[b, P:P + C] = 1.0
        behaviour[b, P:P + C] = torch.tensor(logprobs, dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
            "behaviour_logprobs": behaviour}
