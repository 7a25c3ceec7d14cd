"""Where a step's trajectories come from: the collector the training loop (`train.py`) calls.

A collector hands the loop each step's scored trajectories (groups numbered 0.. in problem order),
evaluates the learner's current weights, and says what a checkpoint must hold to continue its stream
of problems. Two exist, with the same methods:
- `LocalCollector` (here): the learner's own process runs the method's rollout on the next problems
  of the seeded stream, with the learner's policy (the engine reads the weights in place);
- `distributed.ray_loop.RayCollector`: generator actors on a Ray cluster, with a ledger of every
  problem in flight and a staleness bound.
Both evaluate with `evaluation` below, the same function and seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from treedistill.engine import make_engine
from treedistill.evaluate import evaluate
from treedistill.learner import derive_seed
from treedistill.methods import METHODS, RolloutContext
from treedistill.metrics import ComputeCounters, counter_delta
from treedistill.runs import check_context, eval_stats, sample_records, take_problems
from treedistill.value_probe import value_quality

__all__ = ["Collected", "LocalCollector", "evaluation"]


@dataclass(frozen=True)
class Collected:
    """One step's trajectories [B] (the rows of a problem contiguous, groups numbered 0..problems - 1)
    and the rollout's scalar statistics for the log."""

    trajectories: list
    problems: int
    stats: dict = field(default_factory=dict)


def evaluation(ctx: RolloutContext, problems: Sequence[dict], shown: int, step: int,
               trajectories: Sequence) -> tuple[dict, list[dict]]:
    """mean@k of ctx's policy on `problems` (no search, sparse reward, the run's seed), its value head
    against Monte Carlo truth (`value_probe.value_quality`), and the samples.jsonl records of this
    evaluation (the first `shown` problems and trajectories)."""
    cfg = ctx.cfg
    ctx.engine.clear_cache()
    result = evaluate(ctx.engine, ctx.policy, ctx.env, problems, k=cfg.eval_k, temperature=cfg.eval_temperature,
                      max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    records = sample_records(ctx, problems[:shown], step, trajectories[:shown])
    return {**eval_stats(result), **value_quality(ctx.engine, ctx.policy, ctx.env, problems, cfg)}, records


class LocalCollector:
    """The one-process collector: the method's rollout on the stream's next problems, in this process.

    Every random choice is seeded from (cfg.seed, what, step), and the engine's prefix cache is emptied
    before every rollout and evaluation (its keys and values belong to the weights before an update),
    so a resumed run repeats the same steps."""

    name = "train"

    def __init__(self, cfg, learner, env, train_problems: list, *, engine: str, saved: dict | None):
        self.cfg, self.train_problems = cfg, train_problems
        self.method = METHODS[cfg.method]
        self.ctx = RolloutContext(engine=make_engine(learner.policy, engine), policy=learner.policy, env=env,
                                  cfg=cfg)
        self.position = int(saved["loop"]["position"]) if saved is not None else 0

    @property
    def problems_seen(self) -> int:
        return self.position

    def check_context(self, problems: Sequence[dict]) -> None:
        check_context(self.cfg, self.ctx.policy, self.ctx.env, problems)

    def collect(self, step: int, n: int, counters: ComputeCounters) -> Collected:
        """The next n problems' rollout (scored inside: best-of-N and the search choose by reward); its
        engine compute counted into `counters`."""
        engine = self.ctx.engine
        engine.clear_cache()  # cached keys/values belong to the weights before the last update
        problems = take_problems(self.train_problems, self.cfg.seed, self.position, n)
        self.position += len(problems)
        before = engine.counters.snapshot()
        rollout = self.method.rollout(self.ctx, problems, derive_seed(self.cfg.seed, "rollout", step))
        counters.add_rollout(**counter_delta(before, engine.counters.snapshot()))
        return Collected(rollout.trajectories, len(problems), rollout.stats)

    def learned(self, step: int, learner) -> None:
        """After an update: nothing to send, the engine generates with the learner's own weights."""

    def evaluate(self, step: int, learner, problems: Sequence[dict], trajectories: Sequence,
                 counters: ComputeCounters) -> tuple[dict, list]:
        """`evaluation` in this process (its compute is not the run's: evaluations are not charged)."""
        return evaluation(self.ctx, problems, self.cfg.eval_samples_logged, step, trajectories)

    def log_fields(self) -> dict:
        return {"problems_seen": self.position}

    def state(self) -> dict:
        """What a checkpoint holds of the stream: the next position."""
        return {"position": self.position}

    def summary(self) -> dict:
        return {}
