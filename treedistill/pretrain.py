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
completion: trace + <|im_end|>. Loss: next-token cross-entropy on completion tokens only
(`answer_weight` reweights the answer tokens; 1: plain mean).

Value head (`value_fit`, on by default; False: an untrained, seeded head, as the reference): with the
language model frozen, fitted on its final hidden state (no extra norm) to the dense reward each trace
reaches, at every position from the last prompt token on: the RL value loss's target V(s_t) -> R.
Its traces are random play (and a solver share) on generator problems, so the rewards spread over
[-1, 1] as the pre-RL model's own do.

Options off by default, since each changes the data stream or the floats (not the shipped
checkpoint): `bucket` > 1 draws that many batches at once and groups them by length; `micro` > 1 cuts
a step's length-sorted rows into that many micro-batches, each padded to its own longest row (see
`shard`); `processes` > 1 runs the language-model phase in that many CPU ranks (torch.distributed,
gloo; the others run `python -m treedistill.pretrain`) that draw the same batches, train on their
rows and sum gradients and loss; the value head is then fitted in this process.

Measurements (the recipes tried, seeds, timings, what did not help): docs/log.md; the shipped
checkpoint's numbers: docs/results.md.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from treedistill.envs import countdown
from treedistill.models.tiny import build_model, build_tokenizer
from treedistill.models.value_head import ValueHead

__all__ = ["Example", "PretrainConfig", "PretrainResult", "TraceSource", "collate", "pretrain", "shard"]


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of one pretraining run (every field has a default; the CLI overrides a few)."""

    seed: int = 0                    # model init, data order, trace draws
    steps: int = 2000                # optimizer steps of the language model
    batch: int = 48                  # traces per step
    bucket: int = 1                  # steps whose traces are drawn together and grouped by length
    lr: float = 4e-3                 # peak AdamW learning rate
    warmup: int = 50                 # linear warm-up steps, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.0        # 0: cosine decay to zero
    ema: float = 0.995               # decay of a moving average of the weights, kept as the result (0: off)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    solver_share: float = 0.05       # share of solver traces that reach a generator target
    miss_share: float = 0.25         # share of random play aimed at a generator target (usually missed)
    answer_weight: float = 1.0       # loss weight of the answer tokens (<answer> to eos); 1: plain mean
    step_format: str = "substitute"  # countdown.format_completion (STEP_FORMATS)
    problem_seed: int = 1_000_003    # generator seed of the solver problems (not the test split's)
    solver_problems: int = 20_000    # size of that pool before test keys are removed
    value_fit: bool = True           # fit the value head on trace outcomes (False: untrained head)
    value_steps: int = 300
    value_batch: int = 64
    value_lr: float = 1e-3
    max_minutes: float | None = None  # stop the language-model phase early at this wall time
    model: dict = field(default_factory=dict)  # overrides of tiny.build_config (e.g. hidden_size)
    device: str = "cpu"              # where both phases run (the shipped checkpoint: CPU)
    processes: int = 1               # CPU processes of the language-model phase (1 on CUDA)
    micro: int = 1                   # micro-batches per process and step, of rows of similar lengths


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


def collate(examples: Sequence[Example], pad_id: int, answer_id: int | None = None,
            answer_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Right-padded batch.

    input_ids [B, T]; attention_mask [B, T]; target_mask [B, T] (1 where token t is a completion
    token, i.e. predicted from position t-1); value_mask [B, T] (1 from the last prompt token to the
    last completion token); rewards [B]. With `answer_id` (the <answer> token) also target_weight
    [B, T]: 1 on completion tokens, `answer_weight` from the completion's last <answer> token to its
    end, 0 elsewhere.
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
    out = {"input_ids": ids, "attention_mask": attention, "target_mask": target,
           "value_mask": value, "rewards": rewards}
    if answer_id is not None:
        weight = target.float()  # [B, T]
        for i, e in enumerate(examples):
            if answer_id in e.completion:
                first = len(e.prompt) + len(e.completion) - 1 - e.completion[::-1].index(answer_id)
                weight[i, first:len(e.prompt) + len(e.completion)] = answer_weight
        out["target_weight"] = weight
    return out


def lm_loss(model, batch: dict[str, torch.Tensor], total: float | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over completion tokens (weighted by `target_weight` when the
    batch has it: sum of weight * CE over the sum of the weights). With `total`, the weighted sum
    over `total` instead: this batch's share of the mean over a larger batch that sums to `total`.

    No attention mask is passed: rows are RIGHT-padded, so under the causal mask no real token ever
    attends to padding, and the plain causal path of scaled-dot-product attention is the fastest.
    """
    logits = model(input_ids=batch["input_ids"]).logits  # [B, T, V]
    targets = batch["input_ids"][:, 1:]  # [B, T-1]
    mask = batch["target_mask"][:, 1:]  # [B, T-1]
    if "target_weight" not in batch and total is None:
        return F.cross_entropy(logits[:, :-1][mask], targets[mask])
    per_token = F.cross_entropy(logits[:, :-1][mask], targets[mask], reduction="none")  # [N]
    weight = batch["target_weight"][:, 1:][mask] if "target_weight" in batch else torch.ones_like(per_token)  # [N]
    return (per_token * weight).sum() / (weight.sum() if total is None else total)


def length_buckets(source: TraceSource, tokenizer, env, batch: int, bucket: int) -> list[list[Example]]:
    """`bucket` batches of `batch` language-model traces, each batch of similar lengths, in random order.

    Rows are padded to the longest of their batch; drawing several batches at once and grouping them
    by length cuts that padding (about 15% of the tokens with batches drawn at random).
    """
    examples = [encode(tokenizer, env, *source.lm_trace()) for _ in range(batch * bucket)]
    if bucket == 1:
        return [examples]  # drawn order: the data stream of a run without grouping
    examples.sort(key=lambda e: len(e.prompt) + len(e.completion))
    batches = [examples[i * batch:(i + 1) * batch] for i in range(bucket)]
    source.rng.shuffle(batches)
    return batches


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
    called after every step ("lm" or "value"). On the CPU the language-model phase runs in
    `cfg.processes` processes (this one is rank 0), each with its share of the threads; the value
    head is then fitted here with all of them.
    """
    if not 0.0 <= cfg.ema < 1.0:
        raise ValueError(f"ema must be in [0, 1), got {cfg.ema}")
    if cfg.processes < 1 or cfg.micro < 1:
        raise ValueError(f"processes and micro must be >= 1, got {cfg.processes} and {cfg.micro}")
    cpu_start = time.process_time()
    world = cfg.processes if cfg.device == "cpu" else 1
    if world == 1:
        lm = _train_lm(cfg, exclude, progress)
        worker_cpu = 0.0
    else:
        lm, worker_cpu = _train_lm_parallel(cfg, exclude, world, progress)
    model, tokenizer, env, source = lm.model, lm.tokenizer, lm.env, lm.source
    device = torch.device(cfg.device)
    model.eval()

    torch.manual_seed(cfg.seed)
    head = ValueHead(model.config.hidden_size).to(device)
    value_losses: list[float] = []
    value_variances: list[float] = []
    start = time.perf_counter()
    if cfg.value_fit:
        value_losses, value_variances = fit_value_head(model, head, tokenizer, env, source, cfg, progress)
    return PretrainResult(model, tokenizer, head, lm.losses, value_losses, value_variances, len(lm.losses),
                          lm.seconds, time.perf_counter() - start,
                          time.process_time() - cpu_start + worker_cpu, cfg)


@dataclass
class _LMPhase:
    model: object
    tokenizer: object
    env: object
    source: TraceSource
    losses: list[float]
    seconds: float


def _train_lm(cfg: PretrainConfig, exclude: Sequence[dict], progress=None, *, rank: int = 0,
              world: int = 1) -> _LMPhase:
    """The language-model phase as rank `rank` of `world` processes (world > 1: a gloo process group
    is up). Every rank draws the same batches; each trains on its share and the gradients are summed."""
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
    # Weighted answer tokens only when asked: the default keeps the plain mean.
    answer_id = tokenizer.convert_tokens_to_ids(countdown.ANSWER_OPEN) if cfg.answer_weight != 1.0 else None
    # torch's AveragedModel keeps the average in a copy; the model takes its weights at the end. The
    # ranks' weights are the same after every step, so rank 0 alone keeps it.
    averaged = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema))
                if cfg.ema > 0 and rank == 0 else None)
    losses: list[float] = []
    pending: list[list[Example]] = []
    start = time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        if cfg.max_minutes is not None and _out_of_time(start, cfg.max_minutes, world):
            break
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg)
        if not pending:
            pending = length_buckets(source, tokenizer, env, cfg.batch, cfg.bucket)
        examples = pending.pop()
        # The loss is the mean over the whole batch's target tokens: each part adds its share (one
        # part: the batch as drawn and its plain mean, the computation of the shipped checkpoint).
        parts = shard(examples, rank, world, cfg.micro)
        total = _target_total(examples, answer_id, cfg.answer_weight) if world * cfg.micro > 1 else None
        optimizer.zero_grad(set_to_none=True)
        loss = 0.0
        for part in parts:
            batch = collate(part, tokenizer.pad_token_id, answer_id, cfg.answer_weight)
            part_loss = lm_loss(model, {k: v.to(device) for k, v in batch.items()}, total=total)
            part_loss.backward()
            loss += part_loss.item()
        if world > 1:
            loss = _sum_gradients(model, loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if averaged is not None:
            averaged.update_parameters(model)
        losses.append(loss)
        if progress is not None:
            progress("lm", step, {"loss": losses[-1]})
    if averaged is not None and losses:
        model.load_state_dict(averaged.module.state_dict())
    return _LMPhase(model, tokenizer, env, source, losses, time.perf_counter() - start)


def shard(examples: Sequence[Example], rank: int, world: int, micro: int) -> list[list[Example]]:
    """Rank `rank`'s rows of a batch, as up to `micro` micro-batches of similar lengths.

    The batch is sorted by length and dealt round-robin, so every rank gets the same mix of lengths
    (the ranks wait for the slowest); each rank cuts its rows into consecutive runs, each padded only
    to its own longest row. Which rows share a micro-batch does not change the loss (a sum over
    tokens), only the padding: it adds 19% to the real tokens of 48 rows drawn at random, 6% with 3
    micro-batches (one rank or two).
    """
    if world == 1 and micro == 1:
        return [list(examples)]  # as drawn
    ordered = sorted(examples, key=lambda e: len(e.prompt) + len(e.completion))[rank::world]
    size = -(-len(ordered) // micro)
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def _target_total(examples: Sequence[Example], answer_id: int | None, answer_weight: float) -> float:
    """Sum of the target weights of a batch (its completion tokens, when answers are not weighted)."""
    if answer_id is None:
        return float(sum(len(e.completion) for e in examples))
    return float(collate(examples, 0, answer_id, answer_weight)["target_weight"].sum())


def _sum_gradients(model, loss: float) -> float:
    """All-reduce (sum) the gradients and the loss over the process group, in one flat buffer."""
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor([loss], dtype=grads[0].dtype)])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g)
        offset += g.numel()
    return flat[-1].item()


def _out_of_time(start: float, minutes: float, world: int) -> bool:
    """Rank 0's clock decides, so that every rank stops at the same step."""
    late = torch.tensor([float(time.perf_counter() - start > 60 * minutes)])
    if world > 1:
        import torch.distributed as dist

        dist.broadcast(late, src=0)
    return bool(late.item())


# A rank that waits this long for the others gives up: a rank that crashes closes its connections,
# which ends the others' wait at once; this bounds one that hangs or never joins.
_GROUP_TIMEOUT = timedelta(minutes=2)


def _train_lm_parallel(cfg: PretrainConfig, exclude: Sequence[dict], world: int,
                       progress=None) -> tuple[_LMPhase, float]:
    """The language-model phase in `world` CPU processes (torch.distributed, gloo): this process is
    rank 0 and keeps the model; ranks 1.. run `python -m treedistill.pretrain` (a fresh interpreter,
    so neither a forked torch thread pool nor the caller's main module comes along), train their
    shares and exit. The threads of this process are shared out among the ranks. Returns the phase
    and the other ranks' CPU seconds."""
    import torch.distributed as dist

    threads = torch.get_num_threads()
    per_rank = max(1, threads // world)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        init = f"file://{folder / 'rendezvous'}"
        job = {"config": asdict(cfg), "exclude": list(exclude), "world": world, "init": init, "threads": per_rank}
        (folder / "job.json").write_text(json.dumps(job), encoding="utf-8")
        workers = []
        for rank in range(1, world):
            with open(folder / f"rank{rank}.log", "wb") as log:
                workers.append(subprocess.Popen(
                    [sys.executable, "-m", "treedistill.pretrain", str(folder / "job.json"), str(rank)],
                    stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(per_rank)}))
        torch.set_num_threads(per_rank)
        try:
            _wait_ready(folder, workers)
            dist.init_process_group("gloo", init_method=init, rank=0, world_size=world, timeout=_GROUP_TIMEOUT)
            try:
                phase = _train_lm(cfg, exclude, progress, rank=0, world=world)
            finally:
                dist.destroy_process_group()
        except BaseException as exc:
            for worker in workers:
                _stop(worker, wait=5.0)
            failed = [_failure(folder, rank, w) for rank, w in enumerate(workers, start=1) if w.returncode]
            if failed and type(exc) is RuntimeError:  # gloo's error here: this rank only lost its peer
                raise RuntimeError(f"pretraining failed in another process: {failed[0]}") from exc
            raise
        finally:
            torch.set_num_threads(threads)
        cpu = 0.0
        for rank, worker in enumerate(workers, start=1):
            _stop(worker, wait=120.0)
            if worker.returncode:
                raise RuntimeError(f"pretraining failed in another process: {_failure(folder, rank, worker)}")
            cpu += float((folder / f"rank{rank}.cpu").read_text())
    return phase, cpu


def _wait_ready(folder: Path, workers: list[subprocess.Popen]) -> None:
    """Wait until every spawned rank is about to join the group, so that one that dies on start-up
    is reported at once instead of after the group's time-out."""
    deadline = time.monotonic() + _GROUP_TIMEOUT.total_seconds()
    for rank, worker in enumerate(workers, start=1):
        while not (folder / f"rank{rank}.ready").exists():
            if worker.poll() is not None:
                raise RuntimeError(f"pretraining failed in another process: {_failure(folder, rank, worker)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"pretraining rank {rank} did not start in {_GROUP_TIMEOUT}")
            time.sleep(0.05)


def _stop(worker: subprocess.Popen, *, wait: float) -> None:
    try:
        worker.wait(wait)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def _failure(folder: Path, rank: int, worker: subprocess.Popen) -> str:
    log = (folder / f"rank{rank}.log").read_text(encoding="utf-8", errors="replace").strip()
    return f"rank {rank} exited with code {worker.returncode}: " + (log[-2000:] or "(no output)")


def _lm_worker(job_file: str, rank: int) -> None:
    """Rank `rank` (>= 1) of the language-model phase: `python -m treedistill.pretrain JOB RANK`."""
    import torch.distributed as dist

    job = json.loads(Path(job_file).read_text(encoding="utf-8"))
    torch.set_num_threads(job["threads"])
    (Path(job_file).parent / f"rank{rank}.ready").touch()
    dist.init_process_group("gloo", init_method=job["init"], rank=rank, world_size=job["world"],
                            timeout=_GROUP_TIMEOUT)
    try:
        _train_lm(PretrainConfig(**job["config"]), job["exclude"], rank=rank, world=job["world"])
    finally:
        dist.destroy_process_group()
    (Path(job_file).parent / f"rank{rank}.cpu").write_text(str(time.process_time()), encoding="utf-8")


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
        batch = {k: v.to(model.device) for k, v in collate(examples, tokenizer.pad_token_id).items()}
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


def save_checkpoint(result: PretrainResult, folder, info: dict | None = None) -> None:
    """Model (safetensors) + tokenizer files + value_head/value_head.safetensors + pretrain.json in `folder`,
    written whole or not at all (`checkpoint.atomic_folder`)."""
    from treedistill.checkpoint import atomic_folder
    from treedistill.models.load import write_model_files

    with atomic_folder(folder) as tmp:
        # The tiny model is prompted with the environment's compact messages.
        write_model_files(tmp, result.model, result.tokenizer, result.value_head, name="tiny", compact_prompt=True)
        record = {**result.summary(), **(info or {})}
        (tmp / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":  # a rank of the parallel language-model phase (see _train_lm_parallel)
    _lm_worker(sys.argv[1], int(sys.argv[2]))
