"""A format warm-up: a short supervised fine-tune on training solutions written in the environment's
text format, so that a pretrained instruct model writes steps and an answer that the reward reads.

The examples are the environment's own: `env.solution(problem)` (GSM8K: the worked solution, one step
per line of it, the final number as the answer; Countdown: a solver trace). The loss is next-token
cross-entropy on the completion tokens only (the prompt is the environment's chat prompt, as rollouts
and evaluation pose it), the completion followed by the model's end-of-turn token, so the model also
learns to stop. Full fine-tuning, or a LoRA adapter (peft) merged into the weights when saved.

Why not TRL's SFTTrainer: TRL is not in the dependency set, and the loss here is a few lines over the
batch layout `pretrain.pad_examples` already builds; a Trainer would add a dependency, a dataset
conversion and its own checkpointing for one pass over a few hundred examples.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from treedistill.pretrain import Example, pad_examples

__all__ = ["SFTConfig", "completion_loss", "encode_solution", "sft", "solution_examples"]


@dataclass(frozen=True)
class SFTConfig:
    """The warm-up's settings; defaults: a budget a laptop CPU affords on SmolLM2-135M (docs/results.md)."""

    examples: int = 320        # training problems whose solutions are learned (each once per epoch)
    epochs: int = 2            # passes over the examples
    batch: int = 8             # examples per optimizer step
    lr: float = 5e-4           # AdamW peak learning rate (linear warm-up over 10% of the steps, then linear decay to 0)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    grad_clip: float = 1.0     # max global grad norm
    max_tokens: int = 512      # prompt + completion tokens at most; longer examples are skipped
    seed: int = 0              # which problems, their order

    def errors(self) -> list[str]:
        out = [f"{name} must be >= 1 (got {getattr(self, name)})"
               for name in ("examples", "epochs", "batch", "max_tokens") if getattr(self, name) < 1]
        if not (0 < self.lr <= 1 and math.isfinite(self.lr)):
            out.append(f"lr must be in (0, 1] (got {self.lr})")
        if not (0 <= self.weight_decay <= 1):
            out.append(f"weight_decay must be in [0, 1] (got {self.weight_decay})")
        if not (self.grad_clip > 0 and math.isfinite(self.grad_clip)):
            out.append(f"grad_clip must be > 0 (got {self.grad_clip})")
        return out

    @property
    def steps(self) -> int:
        """Optimizer steps: epochs x ceil(examples / batch) (fewer when examples are skipped)."""
        return self.epochs * -(-self.examples // self.batch)


def encode_solution(policy, env, problem: dict, completion: str) -> Example:
    """Prompt = the chat prompt the environment poses (Policy.prompt_ids); completion = the solution's
    tokens + the model's first end token (its end of turn), so generation learns to stop there."""
    prompt = policy.prompt_ids(env.messages(problem, compact=policy.compact_prompt))
    ids = policy.tokenizer.encode(completion, add_special_tokens=False) + [policy.eos_token_ids[0]]
    return Example(tuple(prompt), tuple(ids), 0.0)


def solution_examples(policy, env, problems: Sequence[dict], cfg: SFTConfig) -> tuple[list[Example], dict]:
    """cfg.examples encoded solutions of `problems` drawn in a seeded order; problems without a solution
    (a Countdown target the solver cannot reach) or longer than cfg.max_tokens are passed over.
    Returns (examples, counts: drawn, no_solution, too_long)."""
    rng = random.Random(cfg.seed)
    order = list(range(len(problems)))
    rng.shuffle(order)
    out: list[Example] = []
    counts = {"drawn": 0, "no_solution": 0, "too_long": 0}
    for i in order:
        if len(out) == cfg.examples:
            break
        counts["drawn"] += 1
        solution = env.solution(problems[i], rng)
        if solution is None:
            counts["no_solution"] += 1
            continue
        example = encode_solution(policy, env, problems[i], solution)
        if len(example.prompt) + len(example.completion) > cfg.max_tokens:
            counts["too_long"] += 1
            continue
        out.append(example)
    return out, counts


def completion_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the completion tokens of a `pad_examples` batch, as
    `pretrain.lm_loss`, with the output layer applied only from the first position that predicts a
    completion token (`logits_to_keep`): a chat prompt is most of an example's tokens, and a real
    model's vocabulary makes the output layer the largest single matrix (SmolLM2: 49,152 x 576).
    Rows are right-padded, so no attention mask is needed under the causal mask."""
    ids, target = batch["input_ids"], batch["target_mask"]                          # [B, T]
    start = int(target.float().argmax(dim=1).min()) - 1  # the first position predicting a completion token
    logits = model(input_ids=ids, logits_to_keep=ids.shape[1] - start).logits       # [B, T - start, V]
    mask = target[:, start + 1:]                                                    # [B, T - start - 1]
    return torch.nn.functional.cross_entropy(logits[:, :-1][mask], ids[:, start + 1:][mask])


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over the first 10% of the steps, then linear decay to 0 at `steps`."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def sft(policy, examples: Sequence[Example], cfg: SFTConfig,
        progress: Callable[[int, int, dict], None] | None = None) -> dict:
    """Fine-tune `policy.model` in place on `examples` (their completion tokens), cfg.epochs passes in a
    seeded order, cfg.batch per step. progress(step, steps, metrics) after each step. Returns the
    summary: steps, examples, tokens learned (completion tokens), tokens seen, first/last loss, wall_s."""
    assert examples, "sft needs at least one example"
    torch.manual_seed(cfg.seed)
    model = policy.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed + 1)
    batches = []
    for _ in range(cfg.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        batches += [[examples[j] for j in order[i:i + cfg.batch]] for i in range(0, len(order), cfg.batch)]
    steps = len(batches)
    losses: list[float] = []
    learned = seen = 0
    start = time.perf_counter()
    for step, rows in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, steps)
        batch = {k: v.to(policy.device) for k, v in pad_examples(rows, policy.pad_token_id).items()}
        loss = completion_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        learned += sum(len(e.completion) for e in rows)
        seen += sum(len(e.prompt) + len(e.completion) for e in rows)
        if progress is not None:
            progress(step + 1, steps, {"loss": losses[-1], "grad_norm": float(grad_norm),
                                       "lr": optimizer.param_groups[0]["lr"]})
    model.eval()
    wall = time.perf_counter() - start
    return {"config": asdict(cfg), "steps": steps, "examples": len(examples), "completion_tokens": learned,
            "tokens": seen, "loss_first": losses[0], "loss_last": losses[-1],
            "loss_last_10_mean": sum(losses[-10:]) / len(losses[-10:]), "wall_s": wall,
            "learner_tokens_per_s": seen / wall if wall > 0 else None}
