"""A run's bookkeeping around the learner, shared by the one-process and the distributed loop.

What a run takes and where it stops: its problems (`run_problems`, an endless seeded stream
`take_problems`), its budgets (`problems_for_step` cuts the last step to the generated-token budget,
`why_stop`, `budget_progress` for the learning rate, `passed_eval_point`), the records an evaluation
writes (`eval_stats`, `sample_records`). Where it lives: the run folder, claimed and locked before any
compute (`claim_run_folder`), resumed from its newest complete checkpoint (`resume_point`,
`check_same_run`, `restore_loop`), logged (`open_run_logs`) and closed with its report and final
model (`finish_run`).

Run folder: config.yaml (resolved), metrics.jsonl (one "train" line per step, one "eval" line per
evaluation, step 0 = before RL), samples.jsonl (a few decoded trajectories at each evaluation),
checkpoints/, report.md (final evaluation and the learning curve), final/ (the trained model as a
Hugging Face folder, exported from the newest checkpoint by `treedistill.export`), and .treedistill-run, which
marks the folder as a run and is locked (fcntl.flock) while a process runs in it: a second run on the
folder, a folder of other files, or one that cannot be written is refused before any compute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path

import yaml

from treedistill import checkpoint
from treedistill.config import TrainConfig, to_yaml
from treedistill.datasets import load_split
from treedistill.envs import ENVS
from treedistill.errors import UsageError, os_reason
from treedistill.export import write_final
from treedistill.jsonl import truncate_jsonl, writable_folder
from treedistill.locks import hold, open_lock
from treedistill.methods import RolloutContext
from treedistill.metrics import ComputeCounters, MetricsLogger, Progress, read_metrics
from treedistill.models.load import FINAL_FOLDER
from treedistill.report import write_run_report
from treedistill.rollout.sample import completion_text

__all__ = ["RESUMABLE_CHANGES", "RUN_FILES", "RUN_MARKER", "advance_bar", "budget_progress",
           "changed_settings", "check_context", "check_same_run", "claim_run_folder", "eval_stats", "finish_run", "holding_run_folder",
           "is_run_folder", "open_run_logs", "passed_eval_point", "problems_for_step", "restore_loop",
           "resume_point", "run_problems", "sample_records", "spent", "take_problems", "why_stop"]

# Settings that may differ between a run and its resumption: they change when the run stops or how it
# is logged, not what any step computes (`steps` does move a linear decay that ends at `steps`).
RESUMABLE_CHANGES = ("steps", "budget_generated_tokens", "budget_flops", "keep_checkpoints", "log_backends",
                     "wandb_project", "eval_every", "checkpoint_every", "eval_at_tokens", "eval_at_flops", "final_eval_problems",
                     "eval_before_rl")
# Settings removed from TrainConfig (measured and left off: docs/log.md), each with the value that is the
# behaviour kept: a run saved with that value resumes (and is reused) as before; one saved with another
# value is refused, since its behaviour is gone.
RETIRED_SETTINGS = {"tree_leaf_weight": "one"}
# The file that marks a folder as a run's and is locked while a process runs in it; the files a run writes.
RUN_MARKER = ".treedistill-run"
RUN_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl", "report.md")


# ---------------------------------------------------------------------------------------------------
# The problems: the run's splits and the endless seeded stream the steps take from


def run_problems(cfg: TrainConfig, env) -> tuple[list[dict], list[dict]]:
    """(train, test) problems: from cfg.train_path / cfg.test_path, else generated (countdown: test
    first, disjoint on env.key) or the environment's named split. Training problems equal to a test
    problem under env.key are dropped, whatever their source."""
    generated = ENVS[cfg.env].generate_splits(cfg.train_size, cfg.test_size, cfg.data_seed)
    train = (load_split(cfg.env, "train", cfg.train_path) if cfg.train_path or generated is None
             else generated[0])
    test = load_split(cfg.env, "test", cfg.test_path) if cfg.test_path or generated is None else generated[1]
    test_keys = {env.key(p) for p in test}
    train = [p for p in train if env.key(p) not in test_keys]
    if not train or not test:
        raise UsageError(f"need training and test problems, got {len(train)} (after dropping test "
                         f"problems) and {len(test)}")
    return train, test


@functools.lru_cache(maxsize=4)
def _epoch_order(size: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(size))
    random.Random(f"{seed}/data/{epoch}").shuffle(order)
    return tuple(order)


def take_problems(problems: Sequence[dict], seed: int, position: int, n: int) -> list[dict]:
    """Problems position .. position + n - 1 of an endless stream: epoch e is a shuffle seeded by
    (seed, e), so the stream is a pure function of (seed, position)."""
    out = []
    for i in range(position, position + n):
        epoch, index = divmod(i, len(problems))
        out.append(problems[_epoch_order(len(problems), seed, epoch)[index]])
    return out


def check_context(cfg: TrainConfig, policy, env, problems: Sequence[dict]) -> None:
    """Refuse (UsageError, before any compute) a run whose longest prompt plus max_new_tokens does not
    fit in the model's context. The longest prompts by characters stand for the longest by tokens."""
    longest = sorted(problems, key=lambda p: len(json.dumps(p)), reverse=True)[:8]
    prompt = max(len(policy.prompt_ids(env.messages(p, compact=policy.compact_prompt))) for p in longest)
    if prompt + cfg.max_new_tokens > policy.context_length:
        raise UsageError(f"max_new_tokens={cfg.max_new_tokens} does not fit: prompts of up to {prompt} tokens "
                         f"leave room for {policy.context_length - prompt} in {policy.name}'s context of "
                         f"{policy.context_length} tokens")


# ---------------------------------------------------------------------------------------------------
# Budgets and stop reasons: checked after every step


def problems_for_step(cfg: TrainConfig, counters: ComputeCounters, problems_seen: int) -> int:
    """Problems of the next step: cfg.problems_per_step, or, where a generated-token budget is set
    and the run has seen problems, only as many as the budget still has room for at the run's mean
    generated tokens per problem so far (rounded up, at least one)."""
    budget, spent = cfg.budget_generated_tokens, counters.rollout_generated_tokens
    if budget is None or problems_seen <= 0 or spent <= 0:
        return cfg.problems_per_step
    per_problem = spent / problems_seen
    return max(1, min(cfg.problems_per_step, math.ceil((budget - spent) / per_problem)))


def spent(counters: ComputeCounters) -> tuple[int, float]:
    """(generated tokens, total FLOPs) spent so far: what budgets and evaluation points are measured in."""
    return counters.rollout_generated_tokens, counters.total_flops


def budget_progress(cfg: TrainConfig, before: tuple[int, float], after: tuple[int, float]) -> float | None:
    """The share of the run's budget at which this step's update stands: the midpoint of the shares
    spent before and after its rollout (generated tokens when that budget is set, else FLOPs), so an
    update is scheduled by the compute its data cost. None for a step-limited run."""
    if cfg.budget_generated_tokens is not None:
        return (before[0] + after[0]) / 2 / cfg.budget_generated_tokens
    if cfg.budget_flops is not None:
        return (before[1] + after[1]) / 2 / cfg.budget_flops
    return None


def passed_eval_point(cfg: TrainConfig, before: tuple[int, float], after: tuple[int, float]) -> bool:
    """Whether the step that took the run's (generated tokens, FLOPs) from `before` to `after` (`spent`)
    passed one of cfg.eval_at_tokens or cfg.eval_at_flops: the run is evaluated after that step, which
    is never cut for it (only the final budget cuts a step, `problems_for_step`), so evaluating changes
    no step of training."""
    return (any(before[0] < point <= after[0] for point in cfg.eval_at_tokens)
            or any(before[1] < point <= after[1] for point in cfg.eval_at_flops))


def why_stop(step: int, counters: ComputeCounters, cfg: TrainConfig) -> str | None:
    """Why the run stops after `step` steps (a compute budget spent, or every step done), or None."""
    spent = counters.budget_exhausted(generated_tokens=cfg.budget_generated_tokens, flops=cfg.budget_flops)
    return spent or (f"all {cfg.steps} steps done" if step >= cfg.steps else None)


def advance_bar(bar: Progress | None, record: dict, last_eval: dict | None) -> None:
    """One step on the progress bar (if any), showing the step's reward and loss and the last mean@k."""
    if bar is not None:
        bar.update(1, reward=record["reward_mean"], loss=record.get("loss", math.nan),
                   **({"mean@k": last_eval["eval_accuracy"]} if last_eval else {}))


# ---------------------------------------------------------------------------------------------------
# What an evaluation writes


def eval_stats(result) -> dict:
    """An evaluation's metrics-line fields: eval_<statistic>, and eval_per_problem [P] (each test
    problem's mean sparse reward over its k samples, in test-split order), which paired comparisons
    between runs evaluated on the same problems read (report.py)."""
    stats = {f"eval_{k}": v for k, v in result.to_dict().items() if k != "seconds"}
    return {**stats, "eval_per_problem": [round(x, 6) for x in result.per_problem]}


def sample_records(ctx: RolloutContext, problems: Sequence[dict], step: int, trajectories: Sequence) -> list[dict]:
    """A few decoded trajectories for samples.jsonl: one sample per listed test problem at the evaluation
    temperature (seeded, like the evaluation), and the given training trajectories."""
    cfg, policy = ctx.cfg, ctx.policy
    records = []
    if problems:
        prompts = [policy.prompt_ids(ctx.env.messages(p, compact=policy.compact_prompt)) for p in problems]
        outputs = ctx.engine.sample(prompts, n=1, max_new_tokens=cfg.max_new_tokens,
                                    temperature=cfg.eval_temperature, seed=cfg.seed)
        for problem, prompt, (s,) in zip(problems, prompts, outputs):
            text = completion_text(policy, s.tokens)
            score = ctx.env.score(problem, text)
            records.append({"step": step, "kind": "eval", "problem": problem, "prompt": policy.decode(prompt),
                            "completion": text, "reward": score.dense, "sparse": score.sparse})
    for t in trajectories:
        records.append({"step": step, "kind": "train", "prompt": policy.decode(t.prompt_ids),
                        "completion": completion_text(policy, t.completion_ids), "reward": t.reward,
                        "sparse": t.sparse, "search_tokens": t.search_tokens})
    return records


# ---------------------------------------------------------------------------------------------------
# Resume


def resume_point(run_dir: Path, resume: str) -> tuple[Path | None, dict | None]:
    """(the checkpoint to continue from, its loaded state), or (None, None) to start: auto = the run
    folder's newest checkpoint that loads (a newer damaged one is skipped with a warning; none: start),
    never = none (refused if the folder already holds checkpoints), else a checkpoint or run folder."""
    if resume == "auto":
        return checkpoint.load_latest(run_dir) or (None, None)
    if resume == "never":
        if checkpoint.latest_checkpoint(run_dir) is not None:
            raise UsageError(f"{run_dir} already holds checkpoints; use another --run-dir or --resume auto")
        return None, None
    path = Path(resume).expanduser()
    if (path / checkpoint.MARKER).is_file():
        return path, checkpoint.load_checkpoint(path)
    found = checkpoint.load_latest(path) if path.is_dir() else None
    if found is None:
        raise UsageError(f"--resume {resume}: not a complete checkpoint nor a run folder holding one")
    return found


def changed_settings(saved: dict, cfg: TrainConfig) -> list[str]:
    """The settings, in order, where a run's saved config (its YAML, loaded) and `cfg` differ in a way
    a resumption may not (RESUMABLE_CHANGES may differ). A setting the saved config lacks (it was added
    to TrainConfig after the run was written; new settings default to the earlier behaviour) reads as
    its default, in nested sections (search) too; a setting removed since (RETIRED_SETTINGS) differs only
    where the run saved another value than the one kept."""
    now = yaml.safe_load(to_yaml(cfg))
    defaults = yaml.safe_load(to_yaml(TrainConfig()))
    saved = {k: v for k, v in saved.items() if not (k in RETIRED_SETTINGS and v == RETIRED_SETTINGS[k])}

    def as_saved(key: str):
        value = saved.get(key, defaults.get(key))
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            return {**defaults[key], **value}
        return value

    return sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and as_saved(k) != now.get(k))


def check_same_run(saved_yaml: str, cfg: TrainConfig) -> None:
    """Refuse (UsageError) to resume a checkpoint whose config differs from `cfg` beyond RESUMABLE_CHANGES."""
    changed = changed_settings(yaml.safe_load(saved_yaml), cfg)
    if changed:
        raise UsageError(f"cannot resume: the config differs from the checkpoint's in {', '.join(changed)} "
                         f"(only {', '.join(RESUMABLE_CHANGES)} may change); use a new --run-dir")


def restore_loop(saved: dict | None, counters: ComputeCounters) -> tuple[int, int, int, float]:
    """(step, skipped updates, non-finite streak, wall seconds before this process) of a checkpoint's
    loop record, its compute counters loaded into `counters` and its RNG state restored; zeros for a
    new run."""
    if saved is None:
        return 0, 0, 0, 0.0
    counters.load_state_dict(saved["counters"])
    checkpoint.set_rng_state(saved["rng"])
    loop = saved["loop"]
    return int(loop["step"]), int(loop["skipped_updates"]), int(loop["nonfinite_streak"]), float(loop["wall_s"])


# ---------------------------------------------------------------------------------------------------
# The run folder: claimed before any compute, logged into, closed with its report and final model


def is_run_folder(run_dir: Path) -> bool:
    """Whether a folder is a treedistill run's: it holds the RUN_MARKER, or (run folders written before
    the marker existed) a complete checkpoint, a config.yaml of TrainConfig's settings, or a
    metrics.jsonl whose first line is a metrics record."""
    if (run_dir / RUN_MARKER).is_file() or checkpoint.list_checkpoints(run_dir):
        return True
    if [p.name for p in run_dir.iterdir()] == ["checkpoints"] and not any((run_dir / "checkpoints").iterdir()):
        return True  # what a refused or failed start leaves in a folder it did not create
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = first = None
    try:
        if (run_dir / "config.yaml").is_file():
            config = yaml.safe_load((run_dir / "config.yaml").read_bytes())
        if (run_dir / "metrics.jsonl").is_file():
            with open(run_dir / "metrics.jsonl", "rb") as f:
                first = json.loads(f.readline(1 << 20) or b"null")
    except (OSError, ValueError, RecursionError, yaml.YAMLError):  # ValueError: JSON, UTF-8, int digits
        return False
    if isinstance(config, dict) and {"method", "model", "env"} <= config.keys():
        return 4 * len(fields & config.keys()) >= 3 * len(config)  # a few keys of another version may differ
    return isinstance(first, dict) and {"kind", "step"} <= first.keys()


@contextlib.contextmanager
def claim_run_folder(run_dir: Path):
    """Hold `run_dir` for one run, or refuse it (UsageError, before any compute): not a folder, holding
    files that are not a treedistill run's, not writable (itself, checkpoints/ or a run file), or held by
    another process, whose pid the message gives. Held by an OS lock on RUN_DIR/.treedistill-run
    (fcntl.flock: released when the block ends or the process dies, however it dies). A folder this
    call created is removed again when the block fails before writing anything into it. An OSError in
    the block (a full disk, a folder made read-only) becomes a one-line UsageError: checkpoints are
    written atomically, so the newest complete one is intact."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--run-dir {run_dir} is a file, not a folder")
    try:
        foreign = run_dir.is_dir() and any(run_dir.iterdir()) and not is_run_folder(run_dir)
        names = sorted(p.name for p in run_dir.iterdir()) if foreign else []
    except OSError as err:
        raise UsageError(f"--run-dir {run_dir} cannot be read ({err.strerror})") from None
    if foreign:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise UsageError(f"--run-dir {run_dir} holds files that are not a treedistill run's ({shown}): "
                         "choose an empty or new folder")
    created = not run_dir.exists()
    try:
        fd = open_lock(run_dir, RUN_MARKER)
    except OSError as err:
        raise UsageError(f"--run-dir {run_dir} cannot be created or written ({err.strerror})") from None
    try:
        hold(fd, busy=f"--run-dir {run_dir} is in use by another run (pid {{pid}}); wait for it to end or choose "
                      "another folder", holder="treedistill run folder")
        try:
            for folder in (run_dir, run_dir / "checkpoints"):
                writable_folder(folder)
            for name in RUN_FILES:
                if (run_dir / name).exists() and not os.access(run_dir / name, os.W_OK):
                    raise PermissionError(errno.EACCES, "Permission denied", str(run_dir / name))
            # what a process killed while writing final/ left (checkpoints/ has its own: checkpoint.latest_checkpoint)
            checkpoint.remove_stale_temporaries(run_dir / FINAL_FOLDER)
        except OSError as err:
            raise UsageError(f"--run-dir {run_dir} cannot be written: {os_reason(err)}") from None
        yield
    except OSError as err:
        if created:
            _remove_unused(run_dir)
        raise UsageError(f"stopped by an I/O error: {os_reason(err)}") from None
    except BaseException:
        if created:
            _remove_unused(run_dir)
        raise
    finally:
        os.close(fd)  # releases the lock


def _remove_unused(run_dir: Path) -> None:
    """Remove a run folder that holds nothing but what `claim_run_folder` put there."""
    with contextlib.suppress(OSError):
        if {p.name for p in run_dir.iterdir()} <= {RUN_MARKER, "checkpoints"}:
            (run_dir / "checkpoints").rmdir()  # only when empty
            (run_dir / RUN_MARKER).unlink()
            run_dir.rmdir()


def holding_run_folder(loop):
    """`loop(cfg, run_dir, ...)` (a training loop) run while this process holds run_dir (`claim_run_folder`)."""
    @functools.wraps(loop)
    def run(cfg, run_dir, **options):
        with claim_run_folder(Path(run_dir)):
            return loop(cfg, run_dir, **options)
    return run


def open_run_logs(run_dir: Path, cfg: TrainConfig, resumed_at: int | None) -> MetricsLogger:
    """The run folder with its config.yaml, and its metrics logger; metrics.jsonl and samples.jsonl keep
    only the records up to `resumed_at` (None: a new run, both start empty)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    logger = MetricsLogger(run_dir, cfg.log_backends, resume_step=resumed_at, config=dataclasses.asdict(cfg),
                           wandb_project=cfg.wandb_project)
    truncate_jsonl(run_dir / "samples.jsonl", resumed_at)
    return logger


def finish_run(run_dir: Path, cfg: TrainConfig, *, step: int, stop_reason: str | None, skipped_updates: int,
               counters: ComputeCounters, wall_s: float, **extra) -> dict:
    """Write DIR/report.md and the trained model DIR/final/ (from the newest checkpoint, so that the
    distributed loop's, written by whichever process holds the weights, serves as well), and return the
    run's summary: its evaluation curve, compute counters, the final folder and `extra` fields (the
    single-process and the distributed loop end the same way)."""
    write_run_report(run_dir, cfg, stop_reason, wall_s)
    final = write_final(run_dir)
    evals = [r for r in read_metrics(run_dir) if r.get("kind") == "eval"]
    return {"run_dir": str(run_dir), "method": cfg.method, "steps": step, "stop_reason": stop_reason,
            "skipped_updates": skipped_updates, "eval_k": cfg.eval_k,
            "curve": [{"step": r["step"], "generated_tokens": r["rollout_generated_tokens"],
                       "total_flops": r["total_flops"], "accuracy": r["eval_accuracy"],
                       "stderr": r["eval_stderr"]} for r in evals],
            **counters.as_dict(), "wall_s": wall_s, "final": str(final) if final else None, **extra}
