"""Where every training problem is, and how fresh its trajectories are: the bookkeeping of the
distributed loop, pure (no Ray, no torch) so that it can be tested event by event.

Problems are named by their POSITION in the endless training stream (`runs.take_problems`), so a
position is all a checkpoint needs to name one. Every position taken from the stream is, at any
moment, in exactly one state:

    waiting   -- queued for a generator: taken from the stream and never dispatched, or requeued
    in flight -- inside a task a generator is working on
    buffered  -- its trajectories are back and wait for the learner
    trained   -- the learner stepped on its trajectories
    dropped   -- its trajectories were too stale to train on (counted, never trained)

A task lost with a dead generator sends its positions back to `waiting` (counted as requeued); they
are dispatched again before any new position. Two identities hold after every event and are checked
by `check()`; they are what "no problem silently lost" means:

    taken from the stream = trained + dropped + waiting + in flight + buffered
    dispatched            = trained + dropped + requeued + in flight + buffered

Versions and staleness. The learner's weights after n optimizer steps are version n; a task carries
the version it was dispatched with. The learner about to take step n + 1 updates version n, so a
trajectory of version v is (n - v) versions stale, and it is trained on only if that is at most
`max_staleness`; the importance ratio against its behaviour log-probs corrects what remains.

Throttle. A problem dispatched now is trained, first in first out, about `outstanding // P` steps
after the learner's next one (P = problems_per_step, outstanding = in flight + buffered). Generators
hold the last PUBLISHED version, `lag` steps behind the learner when weights are published every k
steps (lag < k). Dispatching only while `outstanding < (max_staleness - lag + 1) * P` keeps that
problem within the staleness bound, so in the steady state nothing is dropped: max_staleness = 0 is
the synchronous loop (generate with the newest weights, then learn), 1 generates the next batch while
the learner steps on this one. Tasks never straddle two steps' worth of problems.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["Finished", "Ledger", "Task"]


@dataclass(frozen=True)
class Task:
    """A shard of problems sent to one generator: positions [n] of the training stream, and the
    version of the weights it was dispatched with."""

    task_id: int
    positions: tuple[int, ...]
    version: int


@dataclass(frozen=True)
class Finished:
    """One problem's result: its group of trajectories (1 for mcts and bon, group_size for the
    sampling methods), the weights version that generated them, and the task's rollout statistics
    (means over the task's problems, shared by its problems)."""

    position: int
    trajectories: tuple
    version: int
    stats: dict = field(default_factory=dict, compare=False)


class Ledger:
    """The states of the stream's problems (see the module docstring) and their counts.

    position: the next stream position to take; waiting: positions to dispatch first (a resumed
    run's unresolved problems); counts: cumulative counts to continue from (a checkpoint's).
    """

    COUNTS = ("dispatched", "trained", "dropped_stale", "requeued")

    def __init__(self, *, problems_per_step: int, max_staleness: int, position: int = 0,
                 waiting: Iterable[int] = (), counts: dict | None = None):
        assert problems_per_step >= 1 and max_staleness >= 0, (problems_per_step, max_staleness)
        self.per_step = problems_per_step
        self.max_staleness = max_staleness
        self.position = position
        self.waiting: deque[int] = deque(waiting)
        self.in_flight: dict[int, Task] = {}
        self.buffered: list[Finished] = []
        self.next_task_id = 0
        counts = counts or {}
        self.dispatched, self.trained, self.dropped_stale, self.requeued = (
            int(counts.get(name, 0)) for name in self.COUNTS)
        self.check()

    # ---- sizes
    @property
    def flying(self) -> int:
        return sum(len(t.positions) for t in self.in_flight.values())

    @property
    def outstanding(self) -> int:
        """Problems dispatched and not yet trained or dropped."""
        return self.flying + len(self.buffered)

    def room(self, *, learner_version: int, published_version: int) -> int:
        """How many problems the next task may hold (0: dispatch nothing now), by the throttle.
        learner_version: the version the next batch taken will update (the learner's step count once
        it has stepped on every batch taken so far); published_version: the generators'."""
        lag = learner_version - published_version
        assert lag >= 0, f"published weights of version {published_version} are newer than the learner's"
        allowed = (self.max_staleness - lag + 1) * self.per_step - self.outstanding
        to_step_end = self.per_step - self.outstanding % self.per_step
        return max(0, min(allowed, to_step_end))

    # ---- events
    def dispatch(self, size: int, version: int) -> Task:
        """A task of `size` problems (waiting ones first, then fresh ones from the stream)."""
        assert size >= 1, size
        positions = []
        while self.waiting and len(positions) < size:
            positions.append(self.waiting.popleft())
        fresh = size - len(positions)
        positions += range(self.position, self.position + fresh)
        self.position += fresh
        task = Task(self.next_task_id, tuple(positions), version)
        self.next_task_id += 1
        self.in_flight[task.task_id] = task
        self.dispatched += size
        return task

    def finish(self, task_id: int, results: Sequence[Finished]) -> None:
        """A task came back: one result per position, in the task's order."""
        task = self.in_flight.pop(task_id)
        assert tuple(r.position for r in results) == task.positions, (
            f"task {task_id} returned positions {[r.position for r in results]}, expected {task.positions}")
        self.buffered += results

    def lose(self, task_id: int) -> int:
        """A task died with its generator: its problems go back to the front of the queue."""
        task = self.in_flight.pop(task_id)
        self.waiting.extendleft(reversed(task.positions))
        self.requeued += len(task.positions)
        return len(task.positions)

    def drop_stale(self, learner_version: int) -> int:
        """Drop the buffered results more than max_staleness versions behind the learner."""
        keep = [r for r in self.buffered if learner_version - r.version <= self.max_staleness]
        dropped = len(self.buffered) - len(keep)
        self.buffered = keep
        self.dropped_stale += dropped
        return dropped

    def take(self, n: int) -> list[Finished]:
        """The n oldest buffered results (lowest version first, then arrival), now trained."""
        assert len(self.buffered) >= n, f"take({n}) with only {len(self.buffered)} buffered"
        order = sorted(range(len(self.buffered)), key=lambda i: (self.buffered[i].version, i))
        chosen = set(order[:n])
        taken = [self.buffered[i] for i in order[:n]]
        self.buffered = [r for i, r in enumerate(self.buffered) if i not in chosen]
        self.trained += n
        return taken

    # ---- checkpoints and checks
    def pending(self) -> list[int]:
        """Positions dispatched and unresolved (in flight or buffered), dispatch order."""
        return sorted([p for t in self.in_flight.values() for p in t.positions]
                      + [r.position for r in self.buffered])

    def counts(self) -> dict:
        return {name: getattr(self, name) for name in self.COUNTS}

    def state(self) -> dict:
        """What a checkpoint keeps: a resumed run requeues the pending problems (their work died
        with the run) ahead of the waiting ones, so none is lost across a restart."""
        return {"position": self.position, "pending": self.pending(), "waiting": list(self.waiting),
                "counts": self.counts()}

    @classmethod
    def resume(cls, state: dict, *, problems_per_step: int, max_staleness: int) -> Ledger:
        counts = dict(state["counts"])
        counts["requeued"] = counts.get("requeued", 0) + len(state["pending"])
        return cls(problems_per_step=problems_per_step, max_staleness=max_staleness,
                   position=int(state["position"]), waiting=[*state["pending"], *state["waiting"]],
                   counts=counts)

    def check(self) -> None:
        """Assert the two identities of the module docstring."""
        taken = self.position
        states = self.trained + self.dropped_stale + len(self.waiting) + self.flying + len(self.buffered)
        assert taken == states, (
            f"stream positions lost: {taken} taken, {states} accounted for (trained {self.trained}, dropped "
            f"{self.dropped_stale}, waiting {len(self.waiting)}, in flight {self.flying}, buffered {len(self.buffered)})")
        resolved = self.trained + self.dropped_stale + self.requeued + self.outstanding
        assert self.dispatched == resolved, (
            f"dispatches unaccounted for: {self.dispatched} dispatched, {resolved} trained + dropped + "
            f"requeued + outstanding")
