"""The training loop's Ray collector: generator actors search or sample, the loop's learner steps.

`train.train(..., distributed=DistributedSettings(...))` runs the one training loop with the
`RayCollector` here instead of the one-process `collect.LocalCollector`; this module holds the actors,
their pool and that collector only. Layout (`treedistill train --distributed ray --generators G
[--learner-gpus L]`):
- G generator actors (`Generator`), each with its own policy copy and engine (one GPU each on a GPU
  cluster, one CPU otherwise). A task is a shard of the training stream's problems; the actor runs
  the method's own rollout on it (batched tree search for mcts, sampling for the baselines) and
  returns the scored trajectories with their behaviour log-probs and the weights version that made
  them. Evaluation runs on a generator too, with the same `evaluate` and seed as the one-process loop.
- One learner: the driver process (`learner.Learner`; L = 0, or L = 1 on a cluster without GPUs) or
  L FSDP processes holding one GPU each (`distributed/fsdp.py`). It runs `learner.learn`, so both
  collectors share every line of the maths.
- Weights go to the generators through the Ray object store: every `sync_every` steps the learner
  `ray.put`s its trainable weights as version = its step count, and each task carries a reference to
  the newest version; a generator loads it before its next task (between trees, never inside one)
  and empties its prefix cache, so no key/value of older weights is ever reused.
- Staleness is bounded by `max_staleness` versions (`ledger.py`: a throttle keeps it there in the
  steady state; older trajectories are dropped and counted) and corrected by the importance ratio
  against the behaviour log-probs recorded at generation (`algorithms/losses.py`).
- Faults: generator actors restart (Ray `max_restarts`); a task lost with its actor is requeued, its
  problems dispatched again first. Every stream position is accounted for (`Ledger.check`, after
  every event), and the counts are logged: problems_dispatched = problems_trained + dropped_stale +
  requeued_problems + problems_in_flight + problems_buffered.

Same config, run folder, metrics.jsonl (the one-process keys plus weight_version, staleness_mean,
staleness_max, dropped_stale, requeued_problems, generator_restarts, problems_dispatched,
problems_trained, problems_in_flight, problems_buffered), checkpoints and --resume as `train.train`.
The learner's checkpoint is the source of truth: it holds the stream position and the unresolved
problems, which a resumed run requeues before any new one (counted as requeued). A checkpoint of
either loop resumes in the other (the one-process loop skips the unresolved problems: it knows only
the position).

Departures from the one-process collector: a step's problems are the first fresh ones to come back,
not a fixed slice of the stream, and generation overlaps learning, so a run is not bit-reproducible
(max_staleness = 0 with one generator comes closest); rollout compute is counted when a task comes
back, including tasks whose trajectories are later dropped (compute spent is compute spent), and
lost with a dead actor only for what its task never reported. The last step is cut to the
generated-token budget as in one process (the learner takes only the problems the budget has room
for), but tasks already dispatched ahead of it still generate, so a run may spend up to about one
step's tokens past its budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import ray
import torch

from treedistill.collect import Collected, evaluation
from treedistill.distributed.ledger import Finished, Ledger, Task
from treedistill.engine import make_engine
from treedistill.envs import get_env
from treedistill.errors import UsageError
from treedistill.learner import Learner, derive_seed, load_train_policy
from treedistill.methods import METHODS, RolloutContext
from treedistill.metrics import ComputeCounters, counter_delta
from treedistill.runs import check_context, take_problems

__all__ = ["ClusterError", "DistributedSettings", "Generator", "GeneratorPool", "RayCollector", "load_weights",
           "start_cluster", "task_size"]


class ClusterError(UsageError):
    """The run stopped: the cluster cannot go on (every generator gone, too few resources)."""


@dataclass(frozen=True)
class DistributedSettings:
    """How a run is spread over a Ray cluster; the training itself is the TrainConfig's."""

    generators: int = 2             # generator actors, each with a policy copy (one GPU each on a GPU cluster)
    learner_gpus: int = 0           # 0: the driver learns; L >= 1 on a GPU cluster: L FSDP processes, one GPU each
    max_staleness: int = 1          # versions a trajectory may lag the weights it trains (older: dropped)
    sync_every: int = 1             # publish the learner's weights to the generators every this many steps
    max_restarts: int = 3           # restarts of each generator actor before it is given up
    address: str | None = None      # Ray cluster to join ("auto": the one `ray start` runs); None: a local one

    def errors(self) -> list[str]:
        problems = []
        for name, low in (("generators", 1), ("learner_gpus", 0), ("max_staleness", 0), ("sync_every", 1),
                          ("max_restarts", 0)):
            if getattr(self, name) < low:
                problems.append(f"{name} must be >= {low} (got {getattr(self, name)})")
        if not problems and self.max_staleness < self.sync_every - 1:
            problems.append(f"max_staleness={self.max_staleness} must be >= sync_every - 1 = {self.sync_every - 1}: "
                            f"weights published every {self.sync_every} steps are up to {self.sync_every - 1} "
                            "versions old, and every trajectory they generate would be dropped")
        return problems

    def check(self) -> None:
        problems = self.errors()
        if problems:
            raise UsageError("invalid distributed settings: " + "; ".join(problems))


# Longest wait for the generator actors to start (their resources may be held by other jobs).
START_TIMEOUT_S = 600


def task_size(cfg, generators: int) -> int:
    """Problems per task: a step's problems shared out over the generators, within the method's
    `task_limit` (the trees one search call grows together)."""
    share = -(-cfg.problems_per_step // generators)
    limit = METHODS[cfg.method].task_limit
    return min(share, limit(cfg)) if limit is not None else share


# ---------------------------------------------------------------------------------------------------
# Generators (Ray actors; plain classes here, made remote when the loop starts)


def load_weights(policy, engine, state: dict) -> None:
    """Copy published weights into a generator's policy IN PLACE (parameter versions move, so the
    native engine sees the change too) and empty the engine's prefix cache: its keys and values
    belong to the weights before."""
    with torch.no_grad():
        unexpected = policy.model.load_state_dict(state["model"], strict=False).unexpected_keys
        assert not unexpected, f"published weights name parameters the generator lacks: {unexpected[:3]}"
        if policy.value_head is not None:
            policy.value_head.load_state_dict(state["value_head"])
    engine.clear_cache()


class Generator:
    """A policy copy with its engine: rollouts of problem shards, and evaluations.

    exit_at_rollout: fault injection for tests; the actor process exits (as a crash would) right
    after computing its n-th rollout, before returning it, once (not again after its restart).
    """

    def __init__(self, cfg, engine: str, exit_at_rollout: int | None = None):
        self.cfg = cfg
        self.policy = load_train_policy(cfg)
        self.engine = make_engine(self.policy, engine)
        self.env = get_env(cfg.env, **cfg.env_options)
        self.method = METHODS[cfg.method]
        self.ctx = RolloutContext(engine=self.engine, policy=self.policy, env=self.env, cfg=cfg)
        self.version: int | None = None  # None: the weights loaded from cfg.model, not a learner's
        self.rollouts = 0
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self.exit_at = None if restarted else exit_at_rollout

    def ready(self) -> int:
        """The actor's process id: a new one means the actor was restarted."""
        return os.getpid()

    def _sync(self, version: int, weights: list) -> None:
        """Load weights `version` (weights = [object ref], nested so that Ray hands over the reference
        and this actor fetches it only when its version is not the newest)."""
        if version != self.version:
            load_weights(self.policy, self.engine, ray.get(weights[0]))
            self.version = version

    def rollout(self, positions: tuple, problems: list, seed: int, version: int, weights: list) -> dict:
        """The method's rollout on these problems -> one `Finished` per problem (its group of
        trajectories, stamped with `version`), the task's rollout stats, and its engine compute."""
        self._sync(version, weights)
        self.engine.clear_cache()
        before = self.engine.counters.snapshot()
        rollout = self.method.rollout(self.ctx, problems, seed)
        compute = counter_delta(before, self.engine.counters.snapshot())
        groups = [[] for _ in problems]
        for t in rollout.trajectories:
            groups[t.group].append(dataclasses.replace(t, weight_version=version))
        expected = self.cfg.rows_per_problem
        assert all(len(g) == expected if expected is not None else g for g in groups), (
            f"rollout gave {[len(g) for g in groups]} trajectories per problem, expected {expected or 'some'}")
        self.rollouts += 1
        if self.rollouts == self.exit_at:
            os._exit(1)
        return {"results": [Finished(p, tuple(g), version, rollout.stats) for p, g in zip(positions, groups)],
                "compute": compute}

    def evaluate(self, version: int, weights: list, problems: list, step: int, trajectories: list) -> tuple[dict, list]:
        """mean@k of weights `version` and the samples.jsonl records (`collect.evaluation`: the
        one-process loop's evaluation, same function, same seed)."""
        self._sync(version, weights)
        return evaluation(self.ctx, problems, self.cfg.eval_samples_logged, step, trajectories)

    def check_context(self, problems: list) -> None:
        """`runs.check_context` with this actor's policy (the driver may hold none: FSDP learners)."""
        check_context(self.cfg, self.policy, self.env, problems)


@dataclass
class _Slot:
    """The driver's view of one generator actor."""

    index: int
    handle: object
    pid: int | None = None
    task: Task | None = None
    ref: object = None      # its rollout in flight
    probe: object = None    # ready() after a failure: answers once the actor is back
    dead: bool = False      # out of restarts


class GeneratorPool:
    """The generator actors, seen from the driver: dispatch under the ledger's throttle, wait for
    results, requeue the tasks of actors that die and count their restarts."""

    def __init__(self, cfg, settings: DistributedSettings, engine: str, *, gpus: float,
                 fault: tuple[int, int] | None = None):
        self.cfg, self.settings = cfg, settings
        actor = ray.remote(Generator).options(num_cpus=1, num_gpus=gpus, max_restarts=settings.max_restarts,
                                              max_task_retries=0)
        self.slots = [_Slot(i, actor.remote(cfg, engine, fault[1] if fault and fault[0] == i else None))
                      for i in range(settings.generators)]
        try:
            pids = ray.get([s.handle.ready.remote() for s in self.slots], timeout=START_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            self.shutdown()
            raise ClusterError(f"the generator actors did not start within {START_TIMEOUT_S} s (resources "
                               f"taken by others, or each failed {settings.max_restarts + 1} times): "
                               f"{str(e).splitlines()[0]}") from e
        for slot, pid in zip(self.slots, pids):
            slot.pid = pid
        self.restarts = 0
        self.size = task_size(cfg, settings.generators)

    def live(self) -> list[_Slot]:
        return [s for s in self.slots if not s.dead]

    def dispatch(self, ledger: Ledger, *, learner_version: int, published: int, weights, problem_at) -> None:
        """Give every idle generator a task, as far as the throttle allows."""
        for slot in self.slots:
            if slot.dead or slot.ref is not None or slot.probe is not None:
                continue
            size = min(self.size, ledger.room(learner_version=learner_version, published_version=published))
            if size < 1:
                return
            task = ledger.dispatch(size, published)
            slot.task = task
            slot.ref = slot.handle.rollout.remote(task.positions, [problem_at(p) for p in task.positions],
                                                  derive_seed(self.cfg.seed, "rollout-task", task.task_id),
                                                  published, [weights])

    def wait(self, ledger: Ledger, counters) -> None:
        """Block until one rollout or restart probe answers, and book it."""
        pending = {s.ref: s for s in self.slots if s.ref is not None}
        probes = {s.probe: s for s in self.slots if s.probe is not None}
        if not pending and not probes:
            raise ClusterError(f"all {len(self.slots)} generator actors died (each restarted up to "
                               f"{self.settings.max_restarts} times); the last checkpoint holds the run")
        ready, _ = ray.wait([*pending, *probes], num_returns=1)
        for ref in ready:
            if ref in pending:
                self._settle(pending[ref], ledger, counters)
            else:
                self._settle_probe(probes[ref])

    def _settle(self, slot: _Slot, ledger: Ledger, counters) -> None:
        """Book the slot's finished (or failed) rollout."""
        ref, task = slot.ref, slot.task
        slot.ref = slot.task = None
        try:
            out = ray.get(ref)
        except ray.exceptions.RayActorError:
            ledger.lose(task.task_id)
            self._start_probe(slot)
            return
        ledger.finish(task.task_id, out["results"])
        counters.add_rollout(**out["compute"])

    def _start_probe(self, slot: _Slot) -> None:
        if slot.probe is None and not slot.dead:
            # retried until the restarted actor answers; fails at once when it is out of restarts
            slot.probe = slot.handle.ready.options(max_task_retries=-1).remote()

    def _settle_probe(self, slot: _Slot) -> None:
        ref, slot.probe = slot.probe, None
        try:
            pid = ray.get(ref)
        except ray.exceptions.RayActorError:
            slot.dead = True
            return
        if pid != slot.pid:
            self.restarts += 1
            slot.pid = pid

    def call(self, ledger: Ledger, counters, method: str, *args):
        """Run `method` on one live generator (an idle one if any) and return its answer; when that
        actor dies, book what it was doing and try again on the next one."""
        for _ in range(len(self.slots) * (self.settings.max_restarts + 2)):
            usable = [s for s in self.live() if s.probe is None]
            if not usable:
                self.wait(ledger, counters)  # every live actor is restarting: wait for one
                continue
            slot = min(usable, key=lambda s: s.ref is not None)
            try:
                return ray.get(getattr(slot.handle, method).remote(*args))
            except ray.exceptions.RayActorError:
                if slot.ref is not None:
                    self._settle(slot, ledger, counters)  # the rollout queued before the call
                self._start_probe(slot)
        raise ClusterError(f"generator call {method} failed on every generator actor")

    def settle_restarts(self) -> None:
        """Wait for the actors still restarting, so that the run's restart count is complete."""
        for slot in self.slots:
            if slot.probe is not None:
                ray.wait([slot.probe])
                self._settle_probe(slot)

    def shutdown(self) -> None:
        for slot in self.slots:
            ray.kill(slot.handle, no_restart=True)


# ---------------------------------------------------------------------------------------------------
# The collector the training loop calls


def _connect(settings: DistributedSettings) -> bool:
    """Join the cluster at settings.address, or start a local one; True when this call started Ray."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=settings.address, include_dashboard=False, log_to_driver=False)
    except ConnectionError as e:
        raise ClusterError(f"no Ray cluster at --address {settings.address} (start one with `ray start "
                           f"--head`): {str(e).splitlines()[0]}") from e
    return True


def _check_resources(settings: DistributedSettings) -> float:
    """Refuse layouts the cluster cannot hold (they would wait forever); -> GPUs per generator."""
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0), total.get("GPU", 0)
    if gpus == 0:
        if settings.learner_gpus > 1:
            raise ClusterError(f"--learner-gpus {settings.learner_gpus} needs a cluster with GPUs (this one has "
                               f"none); use 0 or 1: the driver process learns")
        if cpus < settings.generators:
            raise ClusterError(f"{settings.generators} generators need {settings.generators} CPUs; the cluster "
                               f"has {cpus:g}")
        return 0
    if settings.generators + settings.learner_gpus > gpus:
        raise ClusterError(f"{settings.generators} generators + {settings.learner_gpus} learner GPUs need "
                           f"{settings.generators + settings.learner_gpus} GPUs; the cluster has {gpus:g}")
    return 1


def _mean_stats(taken: list[Finished]) -> dict:
    """A step's rollout stats: each problem's task means, averaged over the step's problems."""
    keys = taken[0].stats.keys()
    return {k: sum(float(f.stats[k]) for f in taken) / len(taken) for k in keys}


def _ledger_from(saved: dict | None, cfg, settings: DistributedSettings) -> tuple[Ledger, int]:
    """The ledger and restart count a run continues from: a distributed checkpoint's, or a one-process
    checkpoint's position (everything before it trained), or a fresh stream."""
    loop = saved["loop"] if saved is not None else {}
    sizes = {"problems_per_step": cfg.problems_per_step, "max_staleness": settings.max_staleness}
    if "ledger" in loop:
        return Ledger.resume(loop["ledger"], **sizes), int(loop["generator_restarts"])
    position = int(loop.get("position", 0))
    return Ledger(position=position, counts={"dispatched": position, "trained": position}, **sizes), 0


def start_cluster(cfg, settings: DistributedSettings, stack: contextlib.ExitStack, *, env, train_problems: list,
                  saved: dict | None, start_from, engine: str, fault: tuple[int, int] | None = None):
    """Join (or start) the cluster and start the learner and the generators -> (learner, collector),
    both released by `stack`. The learner is this process (`learner.Learner`) or, with learner_gpus
    >= 1 on a GPU cluster, L FSDP processes."""
    if _connect(settings):
        stack.callback(ray.shutdown)
    gpus = _check_resources(settings)
    if gpus and settings.learner_gpus >= 1:
        from treedistill.distributed.fsdp import FSDPLearner

        learner = FSDPLearner(cfg, settings.learner_gpus, start_from, device="cuda")
    else:
        learner = Learner(cfg, saved, stack)
    stack.callback(learner.close)
    pool = GeneratorPool(cfg, settings, engine, gpus=gpus, fault=fault)
    stack.callback(pool.shutdown)
    return learner, RayCollector(cfg, settings, pool, learner, train_problems, saved)


class RayCollector:
    """The training loop's collector over the generator pool (the module docstring): keeps every
    generator busy as the staleness bound allows, hands the loop a step's problems as they come back,
    publishes the learner's weights every sync_every steps, evaluates on a generator."""

    name = "train (ray)"

    def __init__(self, cfg, settings: DistributedSettings, pool: GeneratorPool, learner, train_problems: list,
                 saved: dict | None):
        self.cfg, self.settings, self.pool, self.train_problems = cfg, settings, pool, train_problems
        self.ledger, self.restarts_before = _ledger_from(saved, cfg, settings)
        step = int(saved["loop"]["step"]) if saved is not None else 0
        self.version, self.weights = step, self._put(learner)  # version = the learner's step count

    @staticmethod
    def _put(learner):
        """The learner's published weights as an object reference (FSDP's rank 0 puts them itself)."""
        weights = learner.publish()
        return weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)

    @property
    def problems_seen(self) -> int:
        """Problems whose rollouts came back (their tokens are counted): what the budget cut divides by."""
        ledger = self.ledger
        return ledger.trained + ledger.dropped_stale + len(ledger.buffered)

    def check_context(self, problems: list) -> None:
        longest = sorted(problems, key=lambda p: len(repr(p)), reverse=True)[:8]
        # before any dispatch: no rollout is in flight whose compute the call could have to book
        self.pool.call(self.ledger, ComputeCounters(), "check_context", longest)

    def _dispatch(self, next_update: int) -> None:
        """Give idle generators work; next_update = the version the next batch taken will update."""
        self.pool.dispatch(self.ledger, learner_version=next_update, published=self.version, weights=self.weights,
                           problem_at=lambda position: take_problems(self.train_problems, self.cfg.seed, position, 1)[0])

    def collect(self, step: int, n: int, counters) -> Collected:
        """Keep every generator busy (as the staleness bound allows) until n problems with fresh enough
        trajectories are back; the learner updates version step - 1."""
        ledger = self.ledger
        while True:
            ledger.drop_stale(step - 1)
            if len(ledger.buffered) >= n:
                break
            self._dispatch(step - 1)
            self.pool.wait(ledger, counters)
            ledger.check()
        taken = ledger.take(n)
        self._dispatch(step)  # the generators work on while the learner learns (when max_staleness >= 1)
        ledger.check()
        trajectories = [dataclasses.replace(t, group=j) for j, f in enumerate(taken) for t in f.trajectories]
        staleness = [step - 1 - f.version for f in taken]
        return Collected(trajectories, len(taken), {**_mean_stats(taken), "staleness_mean": sum(staleness) / len(staleness),
                                                    "staleness_max": max(staleness)})

    def learned(self, step: int, learner) -> None:
        """Publish the learner's weights every sync_every steps, and put idle generators to work."""
        if step % self.settings.sync_every == 0:
            self.version, self.weights = step, self._put(learner)
            self._dispatch(step)

    def evaluate(self, step: int, learner, problems: list, trajectories: list, counters) -> tuple[dict, list]:
        """On a generator, with the learner's weights of this very step."""
        if self.version != step:
            self.version, self.weights = step, self._put(learner)
        return self.pool.call(self.ledger, counters, "evaluate", self.version, [self.weights], problems, step,
                              trajectories[:self.cfg.eval_samples_logged])

    def log_fields(self) -> dict:
        ledger = self.ledger
        return {"problems_seen": ledger.position, "weight_version": self.version,
                "dropped_stale": ledger.dropped_stale, "requeued_problems": ledger.requeued,
                "generator_restarts": self.restarts_before + self.pool.restarts,
                "problems_dispatched": ledger.dispatched, "problems_trained": ledger.trained,
                "problems_in_flight": ledger.flying, "problems_buffered": len(ledger.buffered)}

    def state(self) -> dict:
        """What a checkpoint holds: the stream position, the ledger (its unresolved problems are requeued
        on resume) and the restarts so far."""
        return {"position": self.ledger.position, "ledger": self.ledger.state(),
                "generator_restarts": self.restarts_before + self.pool.restarts}

    def summary(self) -> dict:
        """The run summary's distributed fields, once the actors still restarting are back."""
        self.pool.settle_restarts()
        fields = self.log_fields()
        del fields["problems_seen"]
        return {**fields, "distributed": dataclasses.asdict(self.settings)}
