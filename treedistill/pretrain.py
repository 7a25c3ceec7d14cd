"""Pretraining of the embedded tiny model from scratch on Countdown traces (supervised).

The model must know the format and the rules but mostly not how to reach the target, like the
reference's instruct model before RL (3.1% mean@16), so that RL has real headroom. So the data is:

- RANDOM LEGAL PLAY (share 1 - solver_share - miss_share): four numbers uniform in 1..13, a
  uniformly random legal reduction to one number (`countdown.random_play`), and the problem's target
  set to the value that play reached. Every such trace is correct for its own prompt, but the target
  is a by-product of play, so the model learns the rules and only a weak link from target to moves.
- MISSED TARGETS (share miss_share, 25% by default): random legal play on a generator problem
  (numbers and target of `countdown.generate_problems` on `problem_seed`), which almost always ends
  elsewhere. Without them the last step of every trace equals the target, and the model writes a
  false last step when its play misses.
- SOLVER traces (share solver_share, 5% by default): generator problems solved by `countdown.solve`.
  These show what reaching a hard target looks like; their share sets where the model lands.

Steps are written in `step_format` (`countdown.format_completion`), by default "substitute": after
the steps, the last step's expression with earlier results expanded one at a time, latest first, the
answer being the last expansion (`...<step>20+7=27 (27)</step>27=4*5+7<answer>(13-9)*5+7</answer>`),
so that each expression is one look-up away from the one before. The defaults (2,000 steps of 48
traces, AdamW, warm-up then cosine decay to zero, the weights' moving average `ema` = 0.995 as the
result) made the shipped checkpoint: `treedistill pretrain --seed 0` rebuilds it, byte for byte on
the host that made it (another CPU's kernels change the last bits from the first step on).

Never trained on test problems: generator problems whose key is in `exclude` (the test split) are
dropped before solver and missed-target traces are drawn, and a random-play trace whose (sorted
numbers, reached value) equals a test problem's key is redrawn (it would be a test solution).

Prompt: the environment's compact messages through the chat template with the generation prompt;
completion: trace + <|im_end|>. Loss: next-token cross-entropy on completion tokens only, the plain
mean over the batch.

Value head (`value_fit`, on by default; False: an untrained, seeded head, as the reference): with the
language model frozen, fitted on its final hidden state (no extra norm) to the dense reward each trace
reaches, at every position from the last prompt token on: the RL value loss's target V(s_t) -> R.
Its traces are random play (and a solver share) on generator problems, so the rewards spread over
[-1, 1] as the pre-RL model's own do.

Measurements (the recipes tried, seeds, timings, what did not help, and the options that were
measured and then removed: length bucketing, micro-batches, several processes, weighted answer
tokens, "expressions" steps): docs/log.md; the shipped checkpoint's numbers: docs/results.md.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from treedistill.envs import countdown
from treedistill.models.tiny import build_model, build_tokenizer
from treedistill.models.value_head import ValueHead

__all__ = ["Example", "PretrainConfig", "PretrainResult", "TraceSource", "pad_examples", "pretrain",
           "save_model_folder"]

# The step formats of countdown.format_completion that pretraining writes: "substitute" (the shipped
# checkpoint's) and "numbers" (the first checkpoint's, bench/pretrain_sweep.py's recipes).


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of one pretraining run (every field has a default; the CLI overrides a few)."""

    seed: int = 0                    # model init, data order, trace draws
    steps: int = 2000                # optimizer steps of the language model
    batch: int = 48                  # traces per step
    lr: float = 4e-3                 # peak AdamW learning rate
    warmup: int = 50                 # linear warm-up steps, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.0        # 0: cosine decay to zero
    ema: float = 0.995               # decay of a moving average of the weights, kept as the result (0: off)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    solver_share: float = 0.05       # share of solver traces that reach a generator target
    miss_share: float = 0.25         # share of random play aimed at a generator target (usually missed)
    step_format: str = "substitute"  # countdown.format_completion, one of countdown.STEP_FORMATS
    problem_seed: int = 1_000_003    # generator seed of the solver problems (not the test split's)
    solver_problems: int = 20_000    # size of that pool before test keys are removed
    value_fit: bool = True           # fit the value head on trace outcomes (False: untrained head)
    value_steps: int = 300
    value_batch: int = 64
    value_lr: float = 1e-3
    max_minutes: float | None = None  # stop the language-model phase early at this wall time
    model: dict = field(default_factory=dict)  # overrides of tiny.build_config (e.g. hidden_size)
    device: str = "cpu"              # where both phases run (the shipped checkpoint: CPU)


@dataclass(frozen=True)
class Example:
    """One training sequence: prompt ids [P], completion ids [C] (eos included), value target."""

    prompt: tuple[int, ...]
    completion: tuple[int, ...]
    reward: float


@dataclass
class PretrainResult:
    """What a run produced: model and tokenizer (HF objects), value head, losses per step, timings."""

    model: object
    tokenizer: object
    value_head: ValueHead
    losses: list[float]
    value_losses: list[float]
    value_variances: list[float]  # per value step: variance of the targets (MSE of the best constant)
    steps_done: int
    seconds: float
    value_seconds: float
    cpu_seconds: float  # process CPU time of both phases: the wall time on an otherwise idle core
    config: PretrainConfig

    def summary(self) -> dict:
        tail = self.losses[-50:] or [float("nan")]
        vtail = self.value_losses[-50:] or [float("nan")]
        return {
            "config": asdict(self.config),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "value_head_parameters": sum(p.numel() for p in self.value_head.parameters()),
            "steps_done": self.steps_done,
            "first_loss": self.losses[0] if self.losses else None,
            "final_loss": sum(tail) / len(tail),
            "final_value_loss": sum(vtail) / len(vtail) if self.value_losses else None,
            "value_target_variance": (sum(self.value_variances[-50:]) / len(self.value_variances[-50:])
                                      if self.value_variances else None),
            "lm_seconds": round(self.seconds, 1),
            "value_seconds": round(self.value_seconds, 1),
            "cpu_seconds": round(self.cpu_seconds, 1),
        }


class TraceSource:
    """Draws (problem, completion text) pairs: random legal play or solver traces, seeded.

    `exclude`: problems never to train on (their keys are kept out, see the module docstring).
    """

    def __init__(self, *, seed: int, solver_share: float, problem_seed: int, solver_problems: int,
                 exclude: Sequence[dict], miss_share: float = 0.0, step_format: str = "numbers"):
        if not 0.0 <= solver_share <= 1.0:
            raise ValueError(f"solver_share must be in [0, 1], got {solver_share}")
        if not 0.0 <= miss_share <= 1.0 - solver_share:
            raise ValueError(f"miss_share must be in [0, 1 - solver_share], got {miss_share}")
        if step_format not in countdown.STEP_FORMATS:
            raise ValueError(f"step_format must be one of {countdown.STEP_FORMATS}, got {step_format!r}")
        self.rng = random.Random(seed)
        self.step_format = step_format
        self.solver_share = solver_share
        self.miss_share = miss_share
        self.excluded = {countdown.key(p) for p in exclude}
        pool, _ = countdown.generate_problems(solver_problems, 0, problem_seed)
        self.pool = [p for p in pool if countdown.key(p) not in self.excluded]
        if not self.pool:
            raise ValueError(f"no generator problem left for solver and value traces "
                             f"({solver_problems} drawn, all excluded)")

    def random_play(self, target_from: dict | None = None) -> tuple[dict, str]:
        """A random-play trace; its problem's target is the reached value unless `target_from` gives one."""
        low, high = countdown.NUMBER_RANGE
        while True:
            if target_from is None:
                numbers = [self.rng.randint(low, high) for _ in range(4)]
            else:
                numbers = list(target_from["numbers"])
            steps = countdown.random_play(numbers, self.rng)
            target = steps[-1].result if target_from is None else target_from["target"]
            problem = {"numbers": numbers, "target": target}
            if target_from is not None or countdown.key(problem) not in self.excluded:
                return problem, countdown.format_completion(steps, self.step_format)

    def solver(self) -> tuple[dict, str]:
        """A solver trace for a generator problem (every generator target is reachable)."""
        while True:
            problem = self.pool[self.rng.randrange(len(self.pool))]
            steps = countdown.solve(problem["numbers"], problem["target"], self.rng)
            if steps is not None:
                return problem, countdown.format_completion(steps, self.step_format)

    def lm_trace(self) -> tuple[dict, str]:
        """A language-model training trace: solver (solver_share), random play aimed at a generator
        target that it usually misses (miss_share), else random play whose target is its result."""
        draw = self.rng.random()
        if draw < self.solver_share:
            return self.solver()
        if draw < self.solver_share + self.miss_share:
            return self.random_play(target_from=self.pool[self.rng.randrange(len(self.pool))])
        return self.random_play()

    def value_trace(self) -> tuple[dict, str]:
        """A value-fit trace: a generator problem with a random-play (or solver) completion."""
        problem = self.pool[self.rng.randrange(len(self.pool))]
        if self.rng.random() < self.solver_share:
            return self.solver()
        return self.random_play(target_from=problem)


def encode(tokenizer, env, problem: dict, completion: str, reward: float = 0.0) -> Example:
    """Prompt = chat template of the compact messages + generation prompt; completion + eos."""
    text = tokenizer.apply_chat_template(env.messages(problem, compact=True), tokenize=False,
                                         add_generation_prompt=True)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    completion_ids = tokenizer.encode(completion, add_special_tokens=False) + [tokenizer.eos_token_id]
    return Example(tuple(prompt), tuple(completion_ids), reward)


def pad_examples(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch.

    input_ids [B, T]; attention_mask [B, T]; target_mask [B, T] (1 where token t is a completion
    token, i.e. predicted from position t-1); value_mask [B, T] (1 from the last prompt token to the
    last completion token); rewards [B].
    """
    width = max(len(e.prompt) + len(e.completion) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # [B, T]
    attention = torch.zeros((len(examples), width), dtype=torch.long)  # [B, T]
    target = torch.zeros((len(examples), width), dtype=torch.bool)  # [B, T]
    value = torch.zeros((len(examples), width), dtype=torch.bool)  # [B, T]
    for i, e in enumerate(examples):
        p, n = len(e.prompt), len(e.prompt) + len(e.completion)
        ids[i, :n] = torch.tensor(e.prompt + e.completion)
        attention[i, :n] = 1
        target[i, p:n] = True
        value[i, p - 1:n] = True
    rewards = torch.tensor([e.reward for e in examples], dtype=torch.float32)  # [B]
    return {"input_ids": ids, "attention_mask": attention, "target_mask": target,
            "value_mask": value, "rewards": rewards}


def lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the completion tokens of the batch.

    No attention mask is passed: rows are RIGHT-padded, so under the causal mask no real token ever
    attends to padding, and the plain causal path of scaled-dot-product attention is the fastest.
    """
    logits = model(input_ids=batch["input_ids"]).logits  # [B, T, V]
    targets = batch["input_ids"][:, 1:]  # [B, T-1]
    mask = batch["target_mask"][:, 1:]  # [B, T-1]
    return F.cross_entropy(logits[:, :-1][mask], targets[mask])


def _lr_factor(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay from 1 to min_lr_ratio over the remaining steps."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def pretrain(cfg: PretrainConfig, *, exclude: Sequence[dict] = (),
             progress: Callable[[str, int, dict], None] | None = None) -> PretrainResult:
    """Train the tiny model from scratch, then (optionally) fit its value head.

    exclude: problems never to train on (the evaluation split). progress(phase, step, metrics) is
    called after every step ("lm" or "value").
    """
    if not 0.0 <= cfg.ema < 1.0:
        raise ValueError(f"ema must be in [0, 1), got {cfg.ema}")
    cpu_start = time.process_time()
    env = countdown.CountdownEnv()
    tokenizer = build_tokenizer()
    device = torch.device(cfg.device)
    model = build_model(cfg.seed, **cfg.model).to(device)
    source = TraceSource(seed=cfg.seed, solver_share=cfg.solver_share, problem_seed=cfg.problem_seed,
                         solver_problems=cfg.solver_problems, exclude=exclude, miss_share=cfg.miss_share,
                         step_format=cfg.step_format)
    # No weight decay on norms and biases (common practice, e.g. nanoGPT's configure_optimizers).
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.95))
    # torch's AveragedModel keeps the average in a copy; the model takes its weights at the end.
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema)) if cfg.ema > 0 else None
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        if cfg.max_minutes is not None and time.perf_counter() - start > 60 * cfg.max_minutes:
            break
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg)
        # The batch as drawn, padded to its longest row.
        examples = [encode(tokenizer, env, *source.lm_trace()) for _ in range(cfg.batch)]
        batch = pad_examples(examples, tokenizer.pad_token_id)
        optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(model, {k: v.to(device) for k, v in batch.items()})
        loss.backward()
        losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if averaged is not None:
            averaged.update_parameters(model)
        if progress is not None:
            progress("lm", step, {"loss": losses[-1]})
    if averaged is not None and losses:
        model.load_state_dict(averaged.module.state_dict())
    lm_seconds = time.perf_counter() - start
    model.eval()

    torch.manual_seed(cfg.seed)
    head = ValueHead(model.config.hidden_size).to(device)
    value_losses: list[float] = []
    value_variances: list[float] = []
    start = time.perf_counter()
    if cfg.value_fit:
        value_losses, value_variances = fit_value_head(model, head, tokenizer, env, source, cfg, progress)
    return PretrainResult(model, tokenizer, head, losses, value_losses, value_variances, len(losses),
                          lm_seconds, time.perf_counter() - start, time.process_time() - cpu_start, cfg)


def fit_value_head(model, head: ValueHead, tokenizer, env, source: TraceSource, cfg: PretrainConfig,
                   progress=None) -> tuple[list[float], list[float]]:
    """Fit `head` (model frozen) to the dense reward of value traces at every value position.

    Returns per-step (MSE of the head, variance of the targets); the variance is the MSE of the best
    constant, so the gap between the two says how much the head reads from the hidden state.
    """
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.value_lr, weight_decay=0.0)
    losses, variances = [], []
    for step in range(cfg.value_steps):
        for group in optimizer.param_groups:
            # Linear decay to 0: a short fit, no warm-up needed for an MLP on frozen features.
            group["lr"] = cfg.value_lr * (1 - step / cfg.value_steps)
        examples = []
        for _ in range(cfg.value_batch):
            problem, completion = source.value_trace()
            examples.append(encode(tokenizer, env, problem, completion, env.score(problem, completion).dense))
        batch = {k: v.to(model.device) for k, v in pad_examples(examples, tokenizer.pad_token_id).items()}
        with torch.no_grad():
            # Right padding, so the causal mask alone suffices (see lm_loss).
            hidden = model.model(input_ids=batch["input_ids"]).last_hidden_state  # [B, T, H]
        values = head(hidden)  # [B, T]
        mask = batch["value_mask"]  # [B, T]
        targets = batch["rewards"][:, None].expand_as(values)  # [B, T]
        loss = F.mse_loss(values[mask], targets[mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        variances.append(targets[mask].var(unbiased=False).item())
        if progress is not None:
            progress("value", step, {"value_loss": losses[-1]})
    return losses, variances


def save_model_folder(result: PretrainResult, folder, info: dict | None = None) -> None:
    """Model (safetensors) + tokenizer files + value_head/value_head.safetensors + pretrain.json in `folder`,
    written whole or not at all (`checkpoint.atomic_folder`)."""
    from treedistill.checkpoint import atomic_folder
    from treedistill.models.load import write_model_files

    with atomic_folder(folder) as tmp:
        # The tiny model is prompted with the environment's compact messages.
        write_model_files(tmp, result.model, result.tokenizer, result.value_head, name="tiny", compact_prompt=True)
        record = {**result.summary(), **(info or {})}
        (tmp / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

