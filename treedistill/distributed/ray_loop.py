"""The training loop spread over a Ray cluster: generator actors search or sample, one learner steps.

Layout (`treedistill train --distributed ray --generators G [--learner-gpus L]`):
- G generator actors (`Generator`), each with its own policy copy and engine (one GPU each on a GPU
  cluster, one CPU otherwise). A task is a shard of the training stream's problems; the actor runs
  the method's own rollout on it (batched tree search for mcts, sampling for the baselines) and
  returns the scored trajectories with their behaviour log-probs and the weights version that made
  them. Evaluation runs on a generator too, with the same `evaluate` and seed as the one-process loop.
- One learner: the driver process (L = 0, or L = 1 on a cluster without GPUs) or L FSDP processes
  holding one GPU each (`distributed/fsdp.py`). It runs `learner.learn`, the one-process loop's own
  steps 2 to 4, so both loops share every line of the maths.
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

Departures from the one-process loop: a step's problems are the first fresh ones to come back, not
a fixed slice of the stream, and generation overlaps learning, so a run is not bit-reproducible
(max_staleness = 0 with one generator comes closest); rollout compute is counted when a task comes
back, including tasks whose trajectories are later dropped (compute spent is compute spent), and
lost with a dead actor only for what its task never reported; every step is a whole one (tasks are
dispatched ahead of the learner), so a run may end up to one step past its generated-token budget,
where the one-process loop's last step takes only the problems the budget has room for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from treedistill import checkpoint
from treedistill.config import to_yaml
from treedistill.distributed.ledger import Finished, Ledger, Task
from treedistill.engine import make_engine
from treedistill.envs import get_env
from treedistill.errors import UsageError
from treedistill.evaluate import evaluate
from treedistill.jsonl import append_jsonl
from treedistill.learner import (
    DivergedError,
    derive_seed,
    learn,
    load_train_policy,
    reference_policy,
    trainable_params,
)
from treedistill.methods import METHODS, RolloutContext
from treedistill.metrics import ComputeCounters, Progress, counter_delta
from treedistill.runs import (
    advance_bar,
    budget_progress,
    check_same_run,
    eval_stats,
    finish_run,
    holding_run_folder,
    open_run_logs,
    passed_eval_point,
    restore_loop,
    resume_point,
    run_problems,
    sample_records,
    spent,
    take_problems,
    why_stop,
)
from treedistill.value_probe import value_quality

__all__ = ["ClusterError", "DistributedSettings", "Generator", "LocalLearner", "load_weights", "train_distributed"]


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


# Most problems one rollout call of a method batches well: the trees one search call grows together
# (mcts); the sampling methods put all of a task's problems in one engine call.
TASK_LIMITS = {"mcts": lambda cfg: cfg.search.problems_at_once}


def task_size(cfg, generators: int) -> int:
    """Problems per task: a step's problems shared out over the generators, within TASK_LIMITS."""
    share = -(-cfg.problems_per_step // generators)
    return min(share, TASK_LIMITS.get(cfg.method, lambda cfg: share)(cfg))


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
        self.env = get_env(cfg.env)
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
        expected = self.cfg.samples_per_problem
        assert all(len(g) == expected for g in groups), (
            f"rollout gave {[len(g) for g in groups]} trajectories per problem, expected {expected}")
        self.rollouts += 1
        if self.rollouts == self.exit_at:
            os._exit(1)
        return {"results": [Finished(p, tuple(g), version, rollout.stats) for p, g in zip(positions, groups)],
                "compute": compute}

    def evaluate(self, version: int, weights: list, problems: list, shown: list, step: int,
                 trajectories: list) -> tuple[dict, list[dict]]:
        """mean@k of weights `version` (the one-process loop's evaluation: same function, same seed)
        and the samples.jsonl records of this evaluation."""
        self._sync(version, weights)
        self.engine.clear_cache()
        cfg = self.cfg
        result = evaluate(self.engine, self.policy, self.env, problems, k=cfg.eval_k,
                          temperature=cfg.eval_temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        records = sample_records(self.ctx, shown, step, trajectories)
        return {**eval_stats(result), **value_quality(self.engine, self.policy, self.env, problems, cfg)}, records


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
# The learner in the driver process


class LocalLearner:
    """The driver process learns: the one-process loop's policy, frozen reference and optimizer."""

    def __init__(self, cfg, saved: dict | None, stack: contextlib.ExitStack):
        self.cfg, self.method = cfg, METHODS[cfg.method]
        torch.manual_seed(cfg.seed)
        self.policy = load_train_policy(cfg)
        self.reference = reference_policy(self.policy, stack)  # frozen BEFORE any checkpoint weights are loaded
        self.params = trainable_params(self.policy)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        head = self.policy.value_head
        self.num_params = self.policy.num_parameters
        self.head_params = sum(p.numel() for p in head.parameters()) if head else 0
        if saved is not None:
            self.policy.model.load_state_dict(saved["model"])
            if head is not None:
                head.load_state_dict(saved["value_head"])
            self.optimizer.load_state_dict(saved["optimizer"])

    def learn(self, trajectories, *, step: int, nonfinite_streak: int, skipped_updates: int, counters,
              progress: float | None = None):
        """-> (the step's learning metrics, updates skipped, non-finite streak, why to stop or None)."""
        learned = learn(trajectories, policy=self.policy, reference=self.reference, method=self.method,
                        optimizer=self.optimizer, params=self.params, counters=counters, cfg=self.cfg, step=step,
                        nonfinite_streak=nonfinite_streak, progress=progress)
        total = skipped_updates + learned.skipped
        return learned.metrics(trajectories, total), learned.skipped, learned.nonfinite_streak, learned.diverged

    def publish(self):
        """The trainable weights (CPU copies) in the object store -> its reference."""
        return ray.put(trainable_state(self.policy))

    def save(self, run_dir: Path, step: int, entries: dict, keep: int) -> None:
        head = self.policy.value_head
        checkpoint.save_checkpoint(run_dir, step, {
            "model": self.policy.model.state_dict(),
            **({"value_head": head.state_dict()} if head is not None else {}),
            "optimizer": self.optimizer.state_dict(), **entries,
        }, keep=keep)

    def close(self) -> None:
        """Nothing to release: the driver's own objects go with it."""


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


# ---------------------------------------------------------------------------------------------------
# The loop


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


@holding_run_folder
def train_distributed(cfg, run_dir: str | Path, *, settings: DistributedSettings = DistributedSettings(),
                      resume: str = "auto", engine: str = "native", progress: bool = True,
                      fault: tuple[int, int] | None = None) -> dict:
    """`train.train` over a Ray cluster (see the module docstring); returns the same summary plus the
    distributed counters. fault = (generator, n): that generator's process exits after its n-th
    rollout (fault-injection tests)."""
    # ---- set-up: everything that can refuse the input comes before any compute
    settings.check()
    if cfg.rows_per_problem is None:
        raise UsageError(f"method {cfg.method} runs in the one-process loop only (`treedistill train`): "
                         "its rows per problem vary, which the distributed ledger does not handle yet")
    run_dir = Path(run_dir)
    start_from, saved = resume_point(run_dir, resume)
    if saved is not None:
        check_same_run(saved["config"], cfg)
    env = get_env(cfg.env)
    train_problems, test_problems = run_problems(cfg, env)
    eval_problems = test_problems[:cfg.eval_problems] if cfg.eval_problems else test_problems
    final_eval_problems = test_problems[:cfg.final_eval_count] if cfg.final_eval_count else test_problems
    started_ray = _connect(settings)
    stack = contextlib.ExitStack()
    pool = learner = None
    try:
        gpus = _check_resources(settings)
        if gpus and settings.learner_gpus >= 1:
            from treedistill.distributed.fsdp import FSDPLearner

            learner = FSDPLearner(cfg, settings.learner_gpus, start_from, device="cuda")
        else:
            learner = LocalLearner(cfg, saved, stack)
        pool = GeneratorPool(cfg, settings, engine, gpus=gpus, fault=fault)
        return _loop(cfg, run_dir, settings, saved, learner, pool, train_problems, eval_problems,
                     final_eval_problems, progress)
    finally:
        if pool is not None:
            pool.shutdown()
        if learner is not None:
            learner.close()
        stack.close()
        if started_ray:
            ray.shutdown()


def _loop(cfg, run_dir: Path, settings: DistributedSettings, saved: dict | None, learner, pool: GeneratorPool,
          train_problems: list, eval_problems: list, final_eval_problems: list, progress: bool) -> dict:
    """The loop itself, in the one-process loop's order: collect -> learn -> log -> evaluate ->
    checkpoint, with weights published to the generators every sync_every steps."""
    P = cfg.problems_per_step
    counters = ComputeCounters(params=learner.num_params, head_params=learner.head_params)
    ledger, restarts_before = _ledger_from(saved, cfg, settings)
    step, skipped_updates, nonfinite_streak, wall_before = restore_loop(saved, counters)
    logger = open_run_logs(run_dir, cfg, step if saved is not None else None)
    started = time.perf_counter()
    published, weights = step, learner.publish()  # version = the learner's step count

    def wall() -> float:
        return wall_before + time.perf_counter() - started

    def problem_at(position: int) -> dict:
        return take_problems(train_problems, cfg.seed, position, 1)[0]

    def dispatch(next_update: int) -> None:
        """Give idle generators work; next_update = the version the next batch taken will update."""
        pool.dispatch(ledger, learner_version=next_update, published=published, weights=weights,
                      problem_at=problem_at)

    def distributed_counters() -> dict:
        return {"weight_version": published, "dropped_stale": ledger.dropped_stale,
                "requeued_problems": ledger.requeued, "generator_restarts": restarts_before + pool.restarts,
                "problems_dispatched": ledger.dispatched, "problems_trained": ledger.trained,
                "problems_in_flight": ledger.flying, "problems_buffered": len(ledger.buffered)}

    def evaluation(at_step: int, trajectories=(), final: bool = False) -> dict:
        nonlocal published, weights
        t0 = time.perf_counter()
        if published != at_step:  # evaluate the learner's weights of this very step
            published, weights = at_step, learner.publish()
        problems = final_eval_problems if final else eval_problems
        stats, records = pool.call(ledger, counters, "evaluate", published, [weights], problems,
                                   problems[:cfg.eval_samples_logged], at_step,
                                   list(trajectories[:cfg.eval_samples_logged]))
        append_jsonl(run_dir / "samples.jsonl", records)
        return logger.log(at_step, {"kind": "eval", **stats, **counters.as_dict(), **distributed_counters(),
                                    "eval_s": time.perf_counter() - t0, "wall_s": wall()})

    if step == 0 and cfg.eval_before_rl:
        evaluation(0)  # before RL
    stop_reason = why_stop(step, counters, cfg)
    bar = Progress(cfg.steps, initial=step, desc=f"train {cfg.method} (ray)") if progress and stop_reason is None else None
    last_eval = None
    try:
        while stop_reason is None:
            step += 1
            t_step = time.perf_counter()
            spent_before = spent(counters)

            # 1. collect: keep every generator busy (as the staleness bound allows) until P problems
            #    with fresh enough trajectories are back; the learner updates version step - 1
            while True:
                ledger.drop_stale(step - 1)
                if len(ledger.buffered) >= P:
                    break
                dispatch(step - 1)
                pool.wait(ledger, counters)
                ledger.check()
            taken = ledger.take(P)
            dispatch(step)  # the generators work on while the learner learns (when max_staleness >= 1)
            ledger.check()
            trajectories = [dataclasses.replace(t, group=j) for j, f in enumerate(taken) for t in f.trajectories]
            assert len(trajectories) == cfg.trajectories_per_step, (len(trajectories), cfg.trajectories_per_step)
            staleness = [step - 1 - f.version for f in taken]
            t_rollout = time.perf_counter()

            # 2. rewards -> 3. advantages -> 4. loss and optimizer update(s): the one-process loop's own
            metrics, skipped, nonfinite_streak, diverged = learner.learn(
                trajectories, step=step, nonfinite_streak=nonfinite_streak, skipped_updates=skipped_updates,
                counters=counters, progress=budget_progress(cfg, spent_before, spent(counters)))
            skipped_updates += skipped
            if step % settings.sync_every == 0:
                published, weights = step, learner.publish()
                dispatch(step)
            t_learn = time.perf_counter()

            # 5. log
            stop_reason = why_stop(step, counters, cfg)
            record = logger.log(step, {
                **metrics, **_mean_stats(taken), **counters.as_dict(), "problems_seen": ledger.position,
                "staleness_mean": sum(staleness) / len(staleness), "staleness_max": max(staleness),
                **distributed_counters(),
                "rollout_s": t_rollout - t_step, "learn_s": t_learn - t_rollout, "wall_s": wall(),
            })
            if diverged:
                raise DivergedError(diverged)

            # 6. periodic evaluation (mean@k, sparse reward, no search) on a generator, and at the end
            if (cfg.eval_every and step % cfg.eval_every == 0) or stop_reason or passed_eval_point(
                    cfg, spent_before[0], counters.rollout_generated_tokens):
                last_eval = evaluation(step, trajectories, final=stop_reason is not None)

            # 7. checkpoint: the learner's state is the run's; unresolved problems are requeued on resume
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or stop_reason:
                learner.save(run_dir, step, {
                    "rng": checkpoint.rng_state(),
                    "counters": counters.state_dict(),
                    "loop": {"step": step, "position": ledger.position, "skipped_updates": skipped_updates,
                             "nonfinite_streak": nonfinite_streak, "wall_s": wall(), "ledger": ledger.state(),
                             "generator_restarts": restarts_before + pool.restarts},
                    "config": to_yaml(cfg),
                }, cfg.keep_checkpoints)
            advance_bar(bar, record, last_eval)
    finally:
        if bar is not None:
            bar.close()
        logger.close()

    # ---- the end: report.md and a summary
    pool.settle_restarts()
    return finish_run(run_dir, cfg, step=step, stop_reason=stop_reason, skipped_updates=skipped_updates,
                      counters=counters, wall_s=wall(), **distributed_counters(),
                      distributed=dataclasses.asdict(settings))
