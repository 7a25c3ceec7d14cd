"""Run logging and compute accounting: metrics.jsonl (+ optional tensorboard / wandb), compute
counters, and a progress line.

`MetricsLogger` writes one JSON object per line to RUN_DIR/metrics.jsonl and flushes it at once, so a
killed run loses nothing it logged. On resume from a checkpoint taken after step s, the lines of
steps > s (logged after that checkpoint by the killed run) are dropped first, so the resumed run's
file ends up equal to an uninterrupted run's.

`ComputeCounters` makes compute a first-class quantity: cumulative tokens, forward calls and
estimated FLOPs, separately for rollout (generation, search, scoring) and learning. FLOPs follow the
usual dense-transformer estimate (Kaplan et al. 2020): 2 x params per token for a forward pass, 6 x
params per token for forward + backward; attention's context-length term and KV-cache reads are left
out, and prompt tokens served from a KV cache cost nothing. Each forward is charged with the
parameters that ran on its tokens: the language model's on every token it computed, the value head's
only where a value was read (one position per valued prefix in a search; every position of the
learner's passes of a method that has a head), so a method with a value head is not charged the
head's parameters on every generated token.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from treedistill.errors import UsageError
from treedistill.jsonl import truncate_jsonl

__all__ = ["ComputeCounters", "MetricsLogger", "Progress", "counter_delta", "format_duration", "read_metrics",
           "standard_error"]

BACKENDS = ("jsonl", "tensorboard", "wandb")


def _plain_number(value):
    """JSON-safe scalar: tensors and numpy scalars become Python numbers, NaN / inf become None."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """One JSON line per logged step in RUN_DIR/metrics.jsonl, mirrored to optional backends.

    resume_step: None starts a fresh file; an int keeps the existing lines whose step is <= it (the
    state of the checkpoint being resumed) and drops the rest.
    """

    def __init__(self, run_dir: str | Path, backends=("jsonl",), *, resume_step: int | None = None,
                 config: dict | None = None, wandb_project: str = "treedistill"):
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown:
            raise UsageError(f"unknown log backend {unknown[0]!r}; backends: {', '.join(BACKENDS)}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        truncate_jsonl(self.path, resume_step)
        self._file = open(self.path, "a")
        self._tensorboard = self._open_tensorboard() if "tensorboard" in backends else None
        self._wandb = self._open_wandb(wandb_project, config, resume_step) if "wandb" in backends else None

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise UsageError("the tensorboard log backend needs the tensorboard package: "
                             "pip install tensorboard") from err
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def _open_wandb(self, project: str, config: dict | None, resume_step: int | None):
        try:
            import wandb
        except ImportError as err:
            raise UsageError("the wandb log backend needs the wandb package: pip install wandb") from err
        return wandb.init(project=project, dir=str(self.run_dir), config=config,
                          resume="allow" if resume_step is not None else None)

    def log(self, step: int, metrics: dict) -> dict:
        """Write {"step": step, **metrics} as one line (flushed) and to the backends; returns it."""
        record = {"step": int(step), **{key: _plain_number(value) for key, value in metrics.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                   and not isinstance(v, bool)}
        if self._tensorboard is not None:
            for key, value in numbers.items():
                self._tensorboard.add_scalar(key, value, global_step=step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        return record

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def counter_delta(before: dict, after: dict) -> dict:
    """What an engine spent between two `engine.counters.snapshot()`s, counter by counter (a counter
    missing from `before` counts from 0): the rollout's compute, for `ComputeCounters.add_rollout`."""
    return {name: after[name] - before.get(name, 0) for name in after}


def standard_error(xs) -> float:
    """Standard error of the mean of `xs`: sqrt(sum (x - mean)^2 / (n - 1) / n) (ddof = 1); 0 for n < 2."""
    n = len(xs)
    if n < 2:
        return 0.0
    mean = sum(xs) / n
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n)


@dataclass
class ComputeCounters:
    """Cumulative compute of a run, separately for rollout and learning.

    params: parameters of the language model (the FLOPs multiplier of every token it computes);
    head_params: parameters of the value head (the multiplier of every position it values).
    """

    params: int = 0
    head_params: int = 0
    rollout_generated_tokens: int = 0   # tokens sampled (search expansions and plain sampling)
    rollout_prompt_tokens: int = 0      # prefix tokens recomputed by the model (prefill)
    rollout_cached_tokens: int = 0      # prefix tokens served from a KV cache (no FLOPs counted)
    rollout_scored_tokens: int = 0      # tokens run through value / log-prob scoring during rollout
    rollout_forward_calls: int = 0
    rollout_values: int = 0             # positions the value head valued during rollout (search leaves)
    learn_train_tokens: int = 0         # tokens through forward + backward
    learn_inference_tokens: int = 0     # tokens through no-grad forwards (reference log-probs, values)
    learn_forward_calls: int = 0
    learn_head_train_tokens: int = 0    # positions where the value head ran forward + backward
    learn_head_inference_tokens: int = 0  # positions where the value head ran without gradients

    def add_rollout(self, *, generated_tokens: int = 0, prompt_tokens: int = 0, cached_prompt_tokens: int = 0,
                    scored_tokens: int = 0, forward_calls: int = 0, values: int = 0) -> None:
        """Add a rollout's compute; the keywords match engine `Counters` fields, so the difference of
        two `engine.counters.snapshot()` dicts (`counter_delta`) can be passed as `**delta`."""
        self.rollout_generated_tokens += int(generated_tokens)
        self.rollout_prompt_tokens += int(prompt_tokens)
        self.rollout_cached_tokens += int(cached_prompt_tokens)
        self.rollout_scored_tokens += int(scored_tokens)
        self.rollout_forward_calls += int(forward_calls)
        self.rollout_values += int(values)

    def add_learning(self, *, train_tokens: int = 0, inference_tokens: int = 0, forward_calls: int = 0,
                     head_train_tokens: int = 0, head_inference_tokens: int = 0) -> None:
        """Add learning compute: `train_tokens` went through forward + backward, `inference_tokens`
        through no-grad forwards of the language model; the head_* counts are the positions where the
        value head ran (with and without gradients)."""
        self.learn_train_tokens += int(train_tokens)
        self.learn_inference_tokens += int(inference_tokens)
        self.learn_forward_calls += int(forward_calls)
        self.learn_head_train_tokens += int(head_train_tokens)
        self.learn_head_inference_tokens += int(head_inference_tokens)

    @property
    def rollout_flops(self) -> float:
        # 2 x LM params per token the model computes (cached prefix tokens are not recomputed),
        # 2 x head params per value read
        tokens = self.rollout_generated_tokens + self.rollout_prompt_tokens + self.rollout_scored_tokens
        return 2.0 * self.params * tokens + 2.0 * self.head_params * self.rollout_values

    @property
    def learn_flops(self) -> float:
        # 6 x params per trained token (forward + backward), 2 x params per no-grad token; the same for
        # the value head on the positions where it ran
        return (6.0 * self.params * self.learn_train_tokens + 2.0 * self.params * self.learn_inference_tokens
                + 6.0 * self.head_params * self.learn_head_train_tokens
                + 2.0 * self.head_params * self.learn_head_inference_tokens)

    @property
    def total_flops(self) -> float:
        return self.rollout_flops + self.learn_flops

    def budget_exhausted(self, *, generated_tokens: int | None = None, flops: float | None = None) -> str | None:
        """Why the run must stop at these budgets (None = keep going)."""
        if generated_tokens is not None and self.rollout_generated_tokens >= generated_tokens:
            return f"generated-token budget reached ({self.rollout_generated_tokens:,} >= {generated_tokens:,})"
        if flops is not None and self.total_flops >= flops:
            return f"FLOP budget reached ({self.total_flops:.3g} >= {flops:.3g})"
        return None

    def as_dict(self) -> dict:
        """Every counter plus the FLOP estimates, for a metrics line."""
        return {**asdict(self), "rollout_flops": self.rollout_flops, "learn_flops": self.learn_flops,
                "total_flops": self.total_flops}

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in fields(self):
            setattr(self, f.name, int(state.get(f.name, 0)))  # counters added later read 0 from older checkpoints


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Progress of a run on stderr: a tqdm bar with ETA on a terminal, one plain line per update
    otherwise (logs and CI). Never writes to stdout, which belongs to the command's output."""

    def __init__(self, total: int, *, initial: int = 0, desc: str = "train", stream=None,
                 tty: bool | None = None):
        self.total, self.count, self.desc = total, initial, desc
        self.stream = stream if stream is not None else sys.stderr
        self._start, self._start_count = time.monotonic(), initial
        is_tty = self.stream.isatty() if tty is None else tty
        self._bar = None
        if is_tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)
            return
        elapsed = time.monotonic() - self._start
        done = self.count - self._start_count
        eta = elapsed / done * (self.total - self.count) if done > 0 else float("nan")
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items())
        eta_text = format_duration(eta) if math.isfinite(eta) else "?"
        self.stream.write(f"{self.desc} {self.count}/{self.total} elapsed {format_duration(elapsed)} "
                          f"eta {eta_text} {shown}".rstrip() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
