"""Equal-compute comparisons: presets x seeds, each trained to the SAME budget, of generated rollout
tokens or of rollout + learning FLOPs (`axis`), evaluated at the same compute points, reported
together (report.py). Used by `treedistill compare` and `treedistill demo`.

How a comparison runs:
- Plan (before any compute): one run per (label, seed), in OUT/<preset>/seed-<s>/, its config
  resolved once and validated by `load_config` (so a preset edited while the comparison runs does
  not change it; a later invocation with the edited preset is refused for that folder). `steps` is
  raised to STEPS_CAP so that the budget, not the step count, ends every run; with a budget the
  learning-rate warm-up and decay are fractions of it (`TrainConfig.lr_multiplier`), so every method
  spends the same share of its compute at each learning rate.
- Evaluation points: budget/E, 2 budget/E, ..., budget (E = `evaluations`). `eval_every` is 0 and
  `eval_at_tokens` (or `eval_at_flops`) holds the points before the last: a run is evaluated after
  the step that passes each point, never cutting a step for it, so evaluating changes no step of
  training; only a token budget cuts its last step (`runs.problems_for_step`; a FLOP budget ends the
  run at the first step that reaches it), and the run's last evaluation uses `final_eval_problems`
  test problems (the intermediate ones may use fewer).
- The model before RL is evaluated ONCE, in OUT/pre-rl/ (the first seed's evaluation seed, the final
  evaluation's problems), and shared by every row (`eval_before_rl` is off in the runs); its
  per-problem results pair with every run's for the report's paired differences.
- Reuse: a run whose newest checkpoint already reached the budget (with its evaluation) is not run
  again; a run killed part-way continues from its newest checkpoint (`resume="auto"`). A run folder
  holding a different config is refused.
- Parallel: up to `jobs` runs at once, each in its own process with one torch thread (spawned, so
  a crash of one run costs only that run; a worker dies with the comparison's process, even a
  SIGKILLed one). Progress (which run, which step, tokens, ETA) is reported through a callback every
  `poll_s` seconds; this module never prints.
- One comparison at a time per output folder (a lock on OUT/.treedistill-compare): a second one is
  refused, naming the holder's pid. Seeds and evaluation points are bounded (MAX_SEEDS, MAX_EVALUATIONS).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import math
import multiprocessing
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from treedistill.config import TrainConfig, load_config, to_yaml
from treedistill.errors import UsageError, os_reason, shown
from treedistill.locks import hold, open_lock
from treedistill.metrics import format_duration
from treedistill.report import (
    headline,
    paired_differences,
    read_records,
    read_run,
    summarize,
    table_text,
    write_report,
)

__all__ = ["MAX_EVALUATIONS", "MAX_SEEDS", "PRE_RL_DIR", "STEPS_CAP", "RunSpec", "RunState", "evaluate_initial", "plan_runs", "run_all",
           "run_comparison", "run_state", "segment_budgets"]

STEPS_CAP = 1_000_000  # steps of a comparison run: the budget ends it long before
# Seeds per preset and evaluation points at most: each seed is a training run and each point an
# evaluation of every run, so more would not finish; refused before the configs are built (which
# alone took minutes for a mistyped 10**9 seeds).
MAX_SEEDS = 1_000
MAX_EVALUATIONS = 1_000
PRE_RL_DIR = "pre-rl"  # OUT/pre-rl: the one evaluation of the model before RL
COMPARE_LOCK = ".treedistill-compare"  # OUT/COMPARE_LOCK: locked while a comparison runs in OUT


@dataclass(frozen=True)
class RunSpec:
    """One run of a comparison. `cfg` is resolved once, when the comparison is planned, at the final
    budget: every segment trains with it (at its own budget), so editing a preset while a comparison
    runs cannot change a run half-way."""

    label: str
    preset: str
    seed: int
    run_dir: str
    budgets: tuple[int, ...]      # evaluation points in the budget's unit, increasing; the last is the budget
    cfg: TrainConfig
    pre_rl: bool = False          # the one evaluation of the model before RL, not a training run
    axis: str = "tokens"          # the budget's unit: "tokens" (generated rollout tokens) | "flops" (rollout + learning)

    def config(self) -> TrainConfig:
        return self.cfg


# The two budgets of a comparison: the counter each is measured by (a metrics.jsonl key) and its name.
AXES = {"tokens": ("rollout_generated_tokens", "generated tokens"), "flops": ("total_flops", "FLOPs")}


def _spent(record: dict, axis: str) -> float:
    """A metrics line's cumulative compute in the budget's unit."""
    return float(record.get(AXES[axis][0], 0))


def _amount(value: float, axis: str) -> str:
    return f"{value:,.0f}" if axis == "tokens" else f"{value:.3g}"


@dataclass(frozen=True)
class RunState:
    """Where a run folder stands: its newest complete checkpoint's step and cumulative generated
    tokens (0, 0: none), and whether it is done (that checkpoint reached the budget, or the step count,
    and was evaluated)."""

    checkpoint_step: int
    checkpoint_tokens: int
    done: bool


def segment_budgets(budget: float, evaluations: int) -> tuple[int, ...]:
    """Budget points at which runs are evaluated: budget * i / E for i = 1..E (distinct, increasing)."""
    if not budget >= 1:
        raise UsageError(f"the budget must be >= 1 (got {shown(budget)})")
    if not 1 <= evaluations <= MAX_EVALUATIONS:
        raise UsageError(f"evaluations must be in 1..{MAX_EVALUATIONS:,} (got {shown(evaluations)})")
    return tuple(sorted({max(1, round(budget * i / evaluations)) for i in range(1, evaluations + 1)}))


def _given(overrides: Sequence[str], key: str) -> bool:
    return any(text.split("=", 1)[0].strip() == key for text in overrides)


def plan_runs(presets: Mapping[str, str], *, seeds: Sequence[int], budget: float, out_dir: str | Path,
              overrides: Sequence[str] = (), evaluations: int = 3, axis: str = "tokens") -> list[RunSpec]:
    """The pre-RL evaluation's spec, then one RunSpec per (label, seed), configs validated now
    (UsageError before any compute).

    presets: label -> preset name (a label names a row of the report); run folders are
    OUT/<preset>/seed-<s>. Overrides apply to every run; `steps` and `eval_every` given there win
    over the comparison's own (a run stopped by steps before the budget is flagged in the report).
    axis: the budget's unit, "tokens" (budget_generated_tokens, evaluations at eval_at_tokens) or
    "flops" (budget_flops, eval_at_flops)."""
    if axis not in AXES:
        raise UsageError(f"the budget's unit must be one of {', '.join(AXES)} (got {shown(axis)})")
    if not presets:
        raise UsageError("give at least one preset")
    if len(set(presets.values())) != len(presets):
        raise UsageError(f"each preset may appear once (got {', '.join(presets.values())})")
    if not seeds:
        raise UsageError("give at least one seed")
    if len(seeds) > MAX_SEEDS:
        raise UsageError(f"at most {MAX_SEEDS:,} seeds per preset (got {len(seeds):,})")
    budgets = segment_budgets(budget, evaluations)
    out = Path(out_dir)
    specs = []
    for label, preset in presets.items():
        extra = ["eval_before_rl=false", f"eval_at_{axis}=" + ",".join(map(str, budgets[:-1]))]
        if not _given(overrides, "steps"):
            extra.append(f"steps={STEPS_CAP}")
        if not _given(overrides, "eval_every"):
            extra.append("eval_every=0")
        for seed in seeds:
            budget_key = "budget_generated_tokens" if axis == "tokens" else "budget_flops"
            cfg = load_config(preset=preset, overrides=[*overrides, *extra, f"seed={int(seed)}",
                                                        f"{budget_key}={budgets[-1]}"])
            specs.append(RunSpec(label=label, preset=preset, seed=int(seed),
                                 run_dir=str(out / preset / f"seed-{int(seed)}"), budgets=budgets, cfg=cfg,
                                 axis=axis))
    first = specs[0]
    pre = RunSpec(label="pre-RL", preset=first.preset, seed=first.seed, run_dir=str(out / PRE_RL_DIR),
                  budgets=budgets, cfg=dataclasses.replace(first.cfg, eval_before_rl=True), pre_rl=True, axis=axis)
    return [pre, *specs]


def _checkpoint_step(run_dir: Path) -> int:
    """Step of the run's newest complete checkpoint (0: none); checkpoint.py names its folders
    step-<step:08d>."""
    from treedistill.checkpoint import list_checkpoints

    found = list_checkpoints(run_dir)
    return int(found[-1].name.split("-", 1)[1]) if found else 0


def run_state(spec: RunSpec) -> RunState:
    """Where spec's run folder stands (see RunState)."""
    run_dir = Path(spec.run_dir)
    records = read_records(run_dir, missing_ok=True)
    spent_at = {int(r["step"]): _spent(r, spec.axis) for r in records if r.get("kind") == "train"}
    tokens_at = {int(r["step"]): int(r.get("rollout_generated_tokens", 0)) for r in records if r.get("kind") == "train"}
    step = _checkpoint_step(run_dir)
    tokens = tokens_at.get(step, 0)
    evaluated = {int(r["step"]) for r in records if r.get("kind") == "eval"}
    if spec.pre_rl:
        return RunState(checkpoint_step=0, checkpoint_tokens=0, done=0 in evaluated)
    done = step > 0 and step in evaluated and (spent_at.get(step, 0) >= spec.budgets[-1] or step >= spec.config().steps)
    return RunState(checkpoint_step=step, checkpoint_tokens=tokens, done=done)


def _check_folder(spec: RunSpec) -> None:
    """Refuse a run folder that holds a run of another config (only settings that `train` may change
    on resume are allowed to differ)."""
    from treedistill.runs import changed_settings  # (runs imports torch: not at the top of this module)

    path = Path(spec.run_dir) / "config.yaml"
    if not path.is_file():
        return
    changed = changed_settings(yaml.safe_load(path.read_text()) or {}, spec.config())
    if changed:
        raise UsageError(f"{spec.run_dir} holds a run with a different config ({', '.join(changed)} differ); "
                         "give another output folder or remove it")


def evaluate_initial(cfg: TrainConfig, run_dir: str | Path, *, engine: str = "native") -> dict:
    """Evaluate the model before RL once, as `train` evaluates step 0 (same function, engine and seed)
    but on the final evaluation's problems, into RUN_DIR/config.yaml and a metrics.jsonl holding that
    one eval line (with its per-problem results); returns the line."""
    from treedistill.engine import make_engine
    from treedistill.envs import get_env
    from treedistill.evaluate import evaluate
    from treedistill.jsonl import write_jsonl
    from treedistill.learner import load_train_policy
    from treedistill.metrics import ComputeCounters
    from treedistill.runs import eval_stats, run_problems

    t0 = time.perf_counter()
    env = get_env(cfg.env, **cfg.env_options)
    _, test = run_problems(cfg, env)
    problems = test[:cfg.final_eval_count] if cfg.final_eval_count else test
    policy = load_train_policy(cfg)
    result = evaluate(make_engine(policy, engine), policy, env, problems, k=cfg.eval_k,
                      temperature=cfg.eval_temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    record = {"step": 0, "kind": "eval", **eval_stats(result), **ComputeCounters().as_dict(),
              "eval_s": time.perf_counter() - t0, "wall_s": time.perf_counter() - t0}
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "config.yaml.tmp"
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, out / "config.yaml")
    write_jsonl(out / "metrics.jsonl", [record])
    return record


def _die_with_parent(parent: int) -> None:
    """Worker initializer: end this worker when the comparison's process ends, however it ends (a
    SIGKILL runs no clean-up: its workers would finish their run, then idle forever under pid 1,
    each holding a model). Linux: the kernel sends SIGKILL on the parent's death (PR_SET_PDEATHSIG);
    elsewhere a thread watches the parent's pid."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    else:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was asked for
        os._exit(1)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _train_run(spec: RunSpec) -> dict:
    """Worker: train one run to its budget, evaluated at its points (runs in a spawned process); or,
    for the pre-RL spec, evaluate the model before RL."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()  # progress is reported by the parent, per run
    if spec.pre_rl:
        evaluate_initial(spec.cfg, spec.run_dir)
        return {"run_dir": spec.run_dir, "stop_reason": "evaluated before RL"}
    from treedistill.train import train

    summary = train(spec.cfg, spec.run_dir, resume="auto", progress=False)
    return {"run_dir": spec.run_dir, "stop_reason": summary["stop_reason"]}


@dataclass
class _Active:
    spec: RunSpec
    future: cf.Future
    started: float
    shown_step: int = -1
    shown_at: float = 0.0


def _progress(spec: RunSpec) -> tuple[int, float, float]:
    """(last logged step, its compute in the budget's unit, estimated seconds left) of a run in flight.

    Seconds left = budget left x this run's seconds per unit of it in rollouts and updates so far
    + the evaluations still due (one at each budget point not reached yet, and one running now if
    the last step crossed a point) x the last evaluation's seconds; nan before the first step."""
    records = read_records(spec.run_dir, missing_ok=True)
    trains = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not trains:
        return 0, 0, math.nan
    step, tokens = int(trains[-1]["step"]), _spent(trains[-1], spec.axis)
    before = _spent(trains[-2], spec.axis) if len(trains) > 1 else 0
    per_token = sum(float(r.get("rollout_s", 0.0)) + float(r.get("learn_s", 0.0)) for r in trains) / max(1, tokens)
    eval_s = float(evals[-1].get("eval_s", 0.0)) if evals else 0.0
    evaluating = step not in {int(r["step"]) for r in evals} and any(before < b <= tokens for b in spec.budgets)
    evals_left = sum(b > tokens for b in spec.budgets) + evaluating
    return step, tokens, max(0, spec.budgets[-1] - tokens) * per_token + evals_left * eval_s


def _describe(active: _Active, now: float) -> str:
    spec = active.spec
    step, tokens, left = _progress(spec)
    budget = spec.budgets[-1]
    what = ("evaluating the model before RL" if spec.pre_rl else "starting" if step == 0 else
            f"step {step}, {_amount(tokens, spec.axis)}/{_amount(budget, spec.axis)} {AXES[spec.axis][1]} "
            f"({100 * min(1.0, tokens / budget):.0f}%)")
    return (f"{spec.label} seed {spec.seed}: {what}, {format_duration(now - active.started)} elapsed, "
            f"eta {format_duration(left) if math.isfinite(left) else '?'}")


def _overall(active: list[_Active], queued: int, durations: list[float], jobs: int, now: float,
             elapsed: float) -> str:
    """Runs done / running / queued and a rough ETA: active runs' own estimates, queued runs costed at
    the mean (projected) duration of the runs seen so far, spread over the parallel jobs."""
    lefts = [_progress(a.spec)[2] for a in active]
    totals = durations + [now - a.started + left for a, left in zip(active, lefts) if math.isfinite(left)]
    per_run = sum(totals) / len(totals) if totals else math.nan
    # a run without its own estimate yet (evaluating before RL) is costed like the others
    lefts = [left if math.isfinite(left) else max(0.0, per_run - (now - a.started)) for a, left in zip(active, lefts)]
    if (active or queued) and not totals:
        eta = "?"
    else:
        eta = format_duration(max(max(lefts, default=0.0), (sum(lefts) + queued * per_run) / jobs))
    return (f"overall: {len(durations)} done, {len(active)} running, {queued} queued; elapsed "
            f"{format_duration(elapsed)}, eta ~{eta}")


def run_all(specs: Sequence[RunSpec], *, jobs: int = 1, log: Callable[[str], None] = lambda line: None,
            poll_s: float = 15.0) -> dict:
    """Run every spec that is not done, `jobs` at a time; returns {"ran": [...], "reused": [...],
    "failed": [(run_dir, message)], "wall_s", "cpu_s"} (cpu_s: this process and its workers)."""
    if jobs < 1:
        raise UsageError(f"jobs must be >= 1 (got {jobs})")
    for spec in specs:
        _check_folder(spec)
    started = time.perf_counter()
    cpu_before = _cpu_seconds()
    pending = [s for s in specs if not run_state(s).done]
    reused = [s.run_dir for s in specs if s not in pending]
    for run_dir in reused:
        log(f"reusing finished run {run_dir}")
    ran, failed, durations = [], [], []
    total = len(pending)
    if pending:
        context = multiprocessing.get_context("spawn")
        queue = list(pending)
        active: list[_Active] = []
        with cf.ProcessPoolExecutor(max_workers=min(jobs, total), mp_context=context,
                                    initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
            try:
                while queue or active:
                    while queue and len(active) < jobs:
                        spec = queue.pop(0)
                        state = run_state(spec)
                        log(f"[{total - len(queue)}/{total}] {spec.label} seed {spec.seed}: "
                            + (f"continuing from step {state.checkpoint_step} "
                               f"({state.checkpoint_tokens:,} tokens)" if state.checkpoint_step else "starting")
                            + f" -> {_amount(spec.budgets[-1], spec.axis)} {AXES[spec.axis][1]}, in {spec.run_dir}")
                        future = pool.submit(_train_run, spec)
                        active.append(_Active(spec, future, time.perf_counter()))
                    finished, _ = cf.wait([a.future for a in active], timeout=poll_s,
                                          return_when=cf.FIRST_COMPLETED)
                    now = time.perf_counter()
                    for a in [a for a in active if a.future in finished]:
                        active.remove(a)
                        error = a.future.exception()
                        if error is None:
                            ran.append(a.spec.run_dir)
                            durations.append(now - a.started)
                            log(f"done: {a.spec.label} seed {a.spec.seed} in {format_duration(now - a.started)} "
                                f"({a.future.result()['stop_reason']})")
                        else:
                            failed.append((a.spec.run_dir, f"{type(error).__name__}: {error}"))
                            log(f"FAILED: {a.spec.label} seed {a.spec.seed}: {type(error).__name__}: {error}")
                    # a run's line when it took a step, or once a minute while it evaluates
                    shown = False
                    for a in active:
                        step = _progress(a.spec)[0]
                        if step != a.shown_step or now - a.shown_at >= 60.0:
                            a.shown_step, a.shown_at, shown = step, now, True
                            log("  " + _describe(a, now))
                    if shown or finished:
                        log("  " + _overall(active, len(queue), durations, jobs, now, now - started))
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    return {"ran": ran, "reused": reused, "failed": failed, "wall_s": time.perf_counter() - started,
            "cpu_s": _cpu_seconds() - cpu_before}


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished (reaped) children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@contextlib.contextmanager
def _holding(out_dir: Path):
    """One comparison at a time in a folder, or a UsageError naming the holder's pid: an OS lock
    (fcntl.flock, released when the process ends, however it ends) on OUT/COMPARE_LOCK. Two at once
    would train the same runs twice, each taking the other's runs, held, for failed ones."""
    try:
        fd = open_lock(out_dir, COMPARE_LOCK)
    except OSError as err:
        raise UsageError(f"--out {out_dir} cannot be created or written: {os_reason(err)}") from None
    try:
        hold(fd, busy=f"--out {out_dir} is in use by another comparison (pid {{pid}}); wait for it to end or "
                      "choose another --out", holder="treedistill comparison")
        yield
    finally:
        os.close(fd)


def run_comparison(presets: Mapping[str, str], *, seeds: Sequence[int], budget: float, out_dir: str | Path,
                   overrides: Sequence[str] = (), evaluations: int = 3, jobs: int | None = None, axis: str = "tokens",
                   log: Callable[[str], None] = lambda line: None, poll_s: float = 15.0,
                   reference: Mapping[str, float | None] | None = None, title: str = "Equal-compute comparison",
                   notes: Sequence[str] = (), run_first: Sequence[str] = ()) -> dict:
    """Plan, run (reusing finished runs) and report; returns the summary the commands print.

    jobs: runs at once (default: min(2, CPU count), one torch thread each).
    run_first: labels whose runs start first (the slowest first balances parallel jobs); the report
    keeps the order of `presets`."""
    specs = plan_runs(presets, seeds=seeds, budget=budget, out_dir=out_dir, overrides=overrides,
                      evaluations=evaluations, axis=axis)
    jobs = jobs or max(1, min(2, os.cpu_count() or 1))
    with _holding(Path(out_dir)):  # one comparison at a time in a folder
        rank = {label: i for i, label in enumerate(run_first)}
        # the pre-RL evaluation first, then seed by seed (an interrupted comparison has every method at the
        # same number of seeds), within a seed run_first, then the order of `presets`
        order = sorted(specs, key=lambda s: (-1, 0) if s.pre_rl else (s.seed, rank.get(s.label, len(rank))))
        outcome = run_all(order, jobs=jobs, log=log, poll_s=poll_s)
        runs: dict[str, list[str]] = {}
        for spec in specs:
            if any(r.get("kind") == "eval" for r in read_records(spec.run_dir, missing_ok=True)):
                runs.setdefault(spec.label, []).append(spec.run_dir)
        if not runs:
            raise UsageError("no run produced an evaluation: " + "; ".join(m for _, m in outcome["failed"]))
        if outcome["ran"] or outcome["failed"]:
            made = (f"Made with up to {jobs} runs at once; this invocation took {format_duration(outcome['wall_s'])} "
                    f"wall-clock and {format_duration(outcome['cpu_s'])} of CPU time (processes summed)."
                    + (f" Reused finished runs: {len(outcome['reused'])}." if outcome["reused"] else ""))
        else:  # only re-reported: this invocation's time says nothing about the runs
            made = (f"Every run ({len(outcome['reused'])}) was made by an earlier invocation; each run's train and "
                    "wall time are in the final table.")
        run_notes = [*notes, made]
        if outcome["failed"]:
            run_notes.append("Failed runs (reported up to their last evaluation, if any): "
                             + "; ".join(f"`{d}`: {m}" for d, m in outcome["failed"]))
        path = write_report(runs, out_dir, reference=reference, title=title, notes=run_notes)
        results = {label: [read_run(d) for d in dirs] for label, dirs in runs.items()}
        rows = summarize(results, reference)
        differences = paired_differences(results, rows)
        return {"report": str(path), "out_dir": str(out_dir),
                "budget_generated_tokens": budget if axis == "tokens" else None,
                "budget_flops": budget if axis == "flops" else None,
                "evaluation_points": list(specs[0].budgets), "seeds": list(seeds), "jobs": jobs,
                "rows": [r.to_dict() for r in rows], "differences": differences, "ran": outcome["ran"],
                "reused": outcome["reused"], "failed": [{"run_dir": d, "error": m} for d, m in outcome["failed"]],
                "wall_s": outcome["wall_s"], "cpu_s": outcome["cpu_s"], "headline": headline(rows, differences, equal="generated tokens" if axis == "tokens" else "FLOPs"),
                "table": table_text(rows, k=int(next(iter(results.values()))[0].config.get("eval_k", 16)))}
