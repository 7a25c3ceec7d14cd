"""The learner's step, shared by every loop: rewards -> advantages -> loss -> optimizer update(s).

`learn` is steps 2 to 4 of the training loop (`train.py`), whichever collector fed it: `Learner`
runs it in the loop's process, every FSDP rank (`distributed/fsdp.py`, with a `Shard`) on its share,
so all of them share every line of the maths. Here too: the policy to train (`load_train_policy`)
and the frozen reference for the KL term (`reference_policy`).

Departures from the reference run (docs/method.md):
- importance ratios divide by the behaviour log-probs recorded at generation, never by log-probs
  recomputed before the update;
- dropout stays off (the model is kept in eval mode) so that the trained function is the one that
  sampled;
- a non-finite loss or gradient norm skips its update instead of corrupting the weights, and an update
  that leaves a weight non-finite is rolled back (weights and optimizer state); three such updates in
  a row stop the run;
- the frozen reference policy is run only when the loss has a KL term (kl_coef > 0), so a method
  without one is neither slowed nor charged compute for a number it does not use.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
from collections.abc import Callable, Sequence

import torch

from treedistill import checkpoint
from treedistill.algorithms.batch import shift_right
from treedistill.algorithms.losses import combine_metrics, token_entropy, token_logprobs, total_loss
from treedistill.algorithms.packing import Packing, pack_rows
from treedistill.config import TrainConfig
from treedistill.errors import UsageError
from treedistill.metrics import ComputeCounters
from treedistill.models.load import load_policy
from treedistill.models.value_head import ValueHead
from treedistill.rollout.to_batch import to_batch

__all__ = ["CHECKED", "MAX_NONFINITE_IN_A_ROW", "PACK_TOKENS", "DivergedError", "LearnStep", "Learner", "Shard",
           "apply_update", "derive_seed", "forward", "learn", "load_train_policy", "pack", "reference_policy",
           "trainable_params", "trainable_state"]

# Quantities whose non-finite value skips an update, in the order they are named.
CHECKED = ("policy_loss", "value_loss", "kl", "loss", "grad_norm")
MAX_NONFINITE_IN_A_ROW = 3
# Trie nodes per packed sequence (cfg.pack_rows): attention costs N^2 per sequence, masked or not (SDPA);
# a tiny-preset tree (~1,000 nodes) fits one, a larger one splits at a subtree boundary (docs/log.md).
PACK_TOKENS = 1024


class DivergedError(UsageError):
    """The run stopped: MAX_NONFINITE_IN_A_ROW updates in a row had a non-finite loss or gradient."""


def derive_seed(seed: int, what: str, step: int) -> int:
    """A 31-bit seed for one random choice of one step, independent across (what, step). (Here rather
    than in runs.py, beside the problem stream: the learner seeds its minibatch order with it, and
    runs.py imports export.py, which imports this module.)"""
    return int.from_bytes(hashlib.sha256(f"{seed}/{what}/{step}".encode()).digest()[:4], "little") >> 1


def load_train_policy(cfg: TrainConfig):
    """The policy to train, as the config says (model, dtype, device, value head, LoRA), in eval mode:
    no dropout, so the trained function is the one that sampled. Generators of a distributed run load
    theirs with this same function."""
    lora = None if cfg.lora.r == 0 else {"r": cfg.lora.r, "alpha": cfg.lora.alpha,
                                         **({"target_modules": list(cfg.lora.target_modules)}
                                            if cfg.lora.target_modules else {})}
    policy = load_policy(cfg.model, dtype=None if cfg.dtype == "auto" else cfg.dtype,
                         device=None if cfg.device == "auto" else cfg.device,
                         value_head=cfg.uses_value_head, lora=lora)
    if cfg.fresh_value_head and policy.value_head is not None:
        # a saved head predicts the reward it was fitted to (the tiny model's: the dense reward); a run on
        # another reward starts from a new head, as the reference run's did (seeded: every process of a
        # distributed run builds the same one)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            policy.value_head = ValueHead(policy.hidden_size).to(policy.device)
    policy.model.eval()
    return policy


def trainable_params(policy) -> list:
    """The parameters the optimizer steps: the model's trainable ones (LoRA: the adapter's), then the
    value head's."""
    params = [p for p in policy.model.parameters() if p.requires_grad]
    if policy.value_head is not None:
        params += list(policy.value_head.parameters())
    return params


def reference_policy(policy, stack: contextlib.ExitStack):
    """ref(input_ids, attention_mask, packing=None) -> log-probs [B, T] (Batch alignment) under the FROZEN
    initial policy (given a `Packing` of these rows, computed packed): the disabled LoRA adapter when
    there is one, else a frozen copy made now."""
    lora_ref = stack.enter_context(policy.reference())
    if lora_ref is not None:
        return lora_ref
    frozen = dataclasses.replace(policy, model=copy.deepcopy(policy.model).requires_grad_(False), value_head=None)

    def ref(ids, mask, packing=None):
        if packing is not None:
            return packing.logprobs(frozen.forward_packed(packing)[0], ids)  # [B, T]
        return token_logprobs(frozen.forward(ids, mask)[0], ids)  # [B, T]
    return ref


def forward(policy, batch, packing: Packing | None = None, *, entropy: bool = False
            ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(token entropy [B, T] (when asked; no gradient), log-probs of batch.input_ids [B, T], values
    V(s_t) [B, T] or None), all in the Batch alignment (column t: the state that generated token t).
    Given a `Packing` of the batch's rows, the model and the value head run once per trie node and the
    outputs are gathered back to the rows: the same tensors (`algorithms/packing.py`)."""
    head = policy.value_head
    if packing is None:
        logits, hidden = policy.forward(batch.input_ids, batch.attention_mask)  # [B, T, V], [B, T, H]
        values = shift_right(head(hidden)) if head is not None else None  # [B, T]
        return (token_entropy(logits) if entropy else None), token_logprobs(logits, batch.input_ids), values
    logits, hidden = policy.forward_packed(packing)  # [S, N, V], [S, N, H]
    values = shift_right(packing.rows(head(hidden))) if head is not None else None  # [B, T]
    return (packing.entropy(logits) if entropy else None), packing.logprobs(logits, batch.input_ids), values


def pack(batch, cfg: TrainConfig) -> Packing | None:
    """The batch's rows packed into trie sequences of at most PACK_TOKENS nodes when cfg.pack_rows,
    else None (the per-row forward)."""
    if not cfg.pack_rows:
        return None
    return pack_rows(batch.input_ids, batch.attention_mask, max_tokens=max(PACK_TOKENS, batch.input_ids.shape[1]))


def _positions(batch, packing: Packing | None) -> int:
    """Positions the model computes for these rows: their trie nodes when packed, else their real tokens."""
    return packing.tokens if packing is not None else int(batch.attention_mask.sum())


def apply_update(optimizer, params: list, metrics: dict, cfg: TrainConfig) -> dict:
    """Clip the accumulated gradients and step, or skip the step when a loss or the gradient norm is
    not finite (the gradients are dropped either way). A step that leaves a weight non-finite (finite
    gradients can still overflow in the update) is rolled back: the weights and the optimizer state
    return to what they were before it, and "weights" is named as non-finite. Returns metrics +
    grad_norm + nonfinite (the names of the non-finite quantities; empty when the step was taken).

    The roll-back costs one copy of the trainable weights and of the optimizer state per update."""
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    values = {**metrics, "grad_norm": grad_norm}
    bad = [name for name in CHECKED if name in values and not math.isfinite(values[name])]
    if not bad:
        weights = [_local(p).detach().clone() for p in params]
        state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                 for p, s in optimizer.state.items()}
        optimizer.step()
        if not _all_finite(params):
            with torch.no_grad():
                for p, saved in zip(params, weights):
                    _local(p).copy_(saved)
            optimizer.state.clear()
            optimizer.state.update(state)
            bad = ["weights"]
    optimizer.zero_grad(set_to_none=True)
    return {**values, "nonfinite": bad}


def _local(param: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter: its shard under FSDP (a DTensor), else itself."""
    return param.to_local() if hasattr(param, "to_local") else param


def _all_finite(params: list) -> bool:
    """Whether every weight is finite, in every process when several share the parameters (FSDP: each
    checks its shards, and all agree on the answer, so all roll back together)."""
    local = [_local(p) for p in params]
    flag = torch.stack([torch.isfinite(t).all() for t in local]).all().to(torch.int32)  # scalar
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag)


def _mean_metrics(updates: list[dict]) -> dict:
    """Metrics of a step's updates: means, maxima for `*_max` keys."""
    keys = [k for k in updates[0] if isinstance(updates[0][k], (int, float))]
    return {k: (max(u[k] for u in updates) if k.endswith("_max") else sum(u[k] for u in updates) / len(updates))
            for k in keys}


def _pad_cat(parts: list[torch.Tensor], width: int) -> torch.Tensor:
    """Micro-batch results [b_i, T_i] (T_i <= width after `select` trimmed padding) -> [B, width]."""
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts], dim=0)


@dataclasses.dataclass(frozen=True)
class Shard:
    """Which micro-batches of each minibatch this process trains on when several learner processes
    share every update (data-parallel / FSDP): micro-batch i belongs to rank i % world, and `gather`
    returns the metric dicts of all ranks' micro-batches (this process's own when world == 1).
    Micro-batches are normalised by their minibatch's token count, so the ranks' gradients SUM to the
    minibatch's gradient."""

    rank: int = 0
    world: int = 1
    gather: Callable[[list[dict]], list[dict]] = list


@dataclasses.dataclass(frozen=True)
class LearnStep:
    """What one step's learning did: the learning part of the step's metrics line (its updates' means,
    the learning rate, rewards and completion lengths of the batch it built), each update's metrics,
    updates skipped as non-finite in this step, the non-finite streak after it, and why the run must
    stop (None: it goes on)."""

    metrics: dict
    updates: list
    skipped: int
    nonfinite_streak: int
    diverged: str | None


def _step_metrics(batch, updates: list[dict], lr: float, trajectories: Sequence) -> dict:
    rewards = batch.rewards
    return {"kind": "train", **_mean_metrics(updates), "lr": lr, "updates": len(updates),
            "nonfinite": ",".join(sorted({n for u in updates for n in u["nonfinite"]})),
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False)),
            "sparse_mean": sum(t.sparse for t in trajectories) / len(trajectories),
            "completion_tokens_mean": float(batch.loss_mask.sum(dim=1).mean()),
            "learned_tokens": int(batch.loss_mask.sum())}


def learn(trajectories: Sequence, *, policy, reference, advantages: Callable, optimizer, params: list,
          counters: ComputeCounters, cfg: TrainConfig, step: int, nonfinite_streak: int, shard: Shard = Shard(),
          progress: float | None = None) -> LearnStep:
    """Steps 2 to 4 of the loop on one step's trajectories: rewards -> advantages (with V(s_t) and the
    reference log-probs of these very rows) -> cfg.epochs x minibatches optimizer updates, each
    accumulated over micro-batches. Counts the learner's compute into `counters`. progress: the
    share of the run's budget this step stands at (`runs.budget_progress`; None: a step-limited run),
    which sets the learning rate."""
    # 2. rewards -> 3. advantages, with V(s_t) and the reference log-probs of these very rows
    batch = to_batch(trajectories, pad_id=policy.pad_token_id, device=policy.device)
    # (the reference pass only where the loss has a KL term: a method without one is not charged for it)
    old_values, ref_logprobs = [], []
    micros = batch.split(cfg.micro_batch_rows)
    packings = [pack(micro, cfg) for micro in micros]
    with torch.no_grad():
        for micro, packing in zip(micros, packings):
            if policy.value_head is not None:
                old_values.append(forward(policy, micro, packing)[2])
            if cfg.kl_coef > 0:
                ref_logprobs.append(reference(micro.input_ids, micro.attention_mask, packing))
    passes = (policy.value_head is not None) + (cfg.kl_coef > 0)
    tokens = sum(_positions(micro, packing) for micro, packing in zip(micros, packings))
    counters.add_learning(inference_tokens=passes * tokens, forward_calls=passes * len(micros),
                          head_inference_tokens=tokens if policy.value_head is not None else 0)
    width = batch.input_ids.shape[1]
    old_values = _pad_cat(old_values, width) if old_values else None  # [B, T]
    step_advantages, returns = advantages(batch, old_values, cfg)  # [B, T] x2
    batch = dataclasses.replace(batch, advantages=step_advantages, returns=returns, old_values=old_values,
                                ref_logprobs=_pad_cat(ref_logprobs, width) if ref_logprobs else None)

    # 4. loss and optimizer update(s): epochs x minibatches, each accumulated over micro-batches
    lr = cfg.lr * cfg.lr_multiplier(step - 1, progress)
    for group in optimizer.param_groups:
        group["lr"] = lr
    shuffle = torch.Generator().manual_seed(derive_seed(cfg.seed, "minibatches", step))
    updates, skipped = [], 0
    for _ in range(cfg.epochs):
        for minibatch in batch.group_minibatches(cfg.minibatch_problems, shuffle):
            parts, trained_tokens = [], 0
            for i, micro in enumerate(minibatch.split(cfg.micro_batch_rows)):
                if i % shard.world != shard.rank:
                    continue
                packing = pack(micro, cfg)
                entropy, logprobs, values = forward(policy, micro, packing, entropy=True)
                loss, metrics = total_loss(micro, logprobs, values, cfg, entropy=entropy)
                loss.backward()
                parts.append(metrics)
                trained_tokens += _positions(micro, packing)
            counters.add_learning(train_tokens=trained_tokens, forward_calls=len(parts),
                                  head_train_tokens=trained_tokens if policy.value_head is not None else 0)
            update = apply_update(optimizer, params, combine_metrics(shard.gather(parts)), cfg)
            updates.append(update)
            skipped += bool(update["nonfinite"])
            nonfinite_streak = nonfinite_streak + 1 if update["nonfinite"] else 0
            if nonfinite_streak >= MAX_NONFINITE_IN_A_ROW:
                return LearnStep(_step_metrics(batch, updates, lr, trajectories), updates, skipped, nonfinite_streak,
                                 f"step {step}: non-finite {', '.join(update['nonfinite'])} in {nonfinite_streak} "
                                 "updates in a row; run stopped (its last checkpoint holds the weights before)")
    return LearnStep(_step_metrics(batch, updates, lr, trajectories), updates, skipped, nonfinite_streak, None)


class Learner:
    """The policy being trained, in this process: its optimizer, the frozen reference policy for the KL
    term (built only when kl_coef > 0), checkpoint restore and save, and the weights it publishes to
    generators. `distributed/fsdp.py`'s FSDPLearner has the same methods over L processes.

    saved: a checkpoint's state to continue from (None: a new run). The reference is taken BEFORE the
    checkpoint's weights are loaded: it is the initial policy.
    """

    def __init__(self, cfg: TrainConfig, saved: dict | None, stack: contextlib.ExitStack):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.policy = policy = load_train_policy(cfg)
        self.reference = reference_policy(policy, stack) if cfg.kl_coef > 0 else None
        self.params = trainable_params(policy)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.num_params = policy.num_parameters
        self.head_params = sum(p.numel() for p in policy.value_head.parameters()) if policy.value_head else 0
        if saved is not None:
            policy.model.load_state_dict(saved["model"])
            if policy.value_head is not None:
                policy.value_head.load_state_dict(saved["value_head"])
            self.optimizer.load_state_dict(saved["optimizer"])

    def learn(self, trajectories: Sequence, *, advantages: Callable, step: int, nonfinite_streak: int,
              counters: ComputeCounters, progress: float | None = None) -> LearnStep:
        """`learn` on this process's policy and optimizer."""
        return learn(trajectories, policy=self.policy, reference=self.reference, advantages=advantages,
                     optimizer=self.optimizer, params=self.params, counters=counters, cfg=self.cfg, step=step,
                     nonfinite_streak=nonfinite_streak, progress=progress)

    def publish(self) -> dict:
        """What generators need of the weights (`trainable_state`)."""
        return trainable_state(self.policy)

    def save(self, run_dir, step: int, entries: dict, keep: int) -> None:
        """An atomic checkpoint: model, value head, optimizer and the loop's `entries`."""
        head = self.policy.value_head
        checkpoint.save_checkpoint(run_dir, step, {
            "model": self.policy.model.state_dict(),
            **({"value_head": head.state_dict()} if head is not None else {}),
            "optimizer": self.optimizer.state_dict(), **entries,
        }, keep=keep)

    def close(self) -> None:
        """Nothing to release: this process's own objects go with it."""


def trainable_state(policy, model_state: dict | None = None) -> dict:
    """What generators need of the learner's weights: the trainable parameters (all of them, or
    the LoRA adapters) and the value head, as CPU tensors. model_state: a full state dict to take them
    from (FSDP gathers one), else the policy's own parameters."""
    names = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    source = model_state if model_state is not None else dict(policy.model.named_parameters())
    head = policy.value_head
    return {"model": {n: source[n].detach().to("cpu", copy=True) for n in names},
            "value_head": ({k: v.detach().to("cpu", copy=True) for k, v in head.state_dict().items()}
                           if head is not None else None)}
