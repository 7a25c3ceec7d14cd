"""The online training loop: one function, `train`, read top to bottom.

Each step, in file order: collect trajectories (search or sampling, scored by the environment) ->
rewards and advantages -> loss and optimizer update(s) -> log -> periodic evaluation -> checkpoint.
The method (mcts | bon | grpo | cispo | ppo) is looked up ONCE in `methods.METHODS`; the loop only
calls its rollout, advantages and loss. Steps 2 to 4 are `learn`, which the distributed loop
(`distributed/ray_loop.py`, `distributed/fsdp.py`) calls too, so both loops share every line of the maths.

Compute is counted as it is spent: the engine's counters around every rollout (generated tokens,
prefill, cache hits, forward calls) and the learner's own forwards and backwards, into
`metrics.ComputeCounters`. A run ends at cfg.steps or at the first budget reached
(budget_generated_tokens, budget_flops), checked after every step. A step that would run past the
generated-token budget takes fewer problems (`problems_for_step`): so methods whose steps cost very
different amounts (an MCTS step searches 16 trees, a GRPO step samples 4 x 16 completions) all end
within about one problem's tokens of the same budget instead of up to one whole step past it. Only the
final budget cuts a step: an evaluation point (`eval_at_tokens`) is taken after the step that passes
it, so a run evaluated at k points trains exactly as the same run evaluated only at its end. With a
budget, warm-up and decay are fractions of the budget (`TrainConfig.lr_multiplier`), so every method
spends the same share of its compute at each learning rate.

Exact resume. Every random choice of a step is seeded from (cfg.seed, what, step): the problems
(a seeded shuffle per epoch, the position saved), the engine's samples, the search, the minibatch
order; evaluation always uses cfg.seed. The engine's prefix cache is emptied before every rollout and
evaluation, so no phase depends on what an earlier one left there (nor on stale keys/values of
weights that have since changed). A checkpoint holds model, value head, optimizer, all RNG states,
the data position, the counters and the loop's own state; the learning rate is a pure function of
the step and the compute spent (`TrainConfig.lr_multiplier`), so there is no scheduler state. A run killed at any moment
and resumed from its newest complete checkpoint therefore repeats the same steps with the same
numbers on CPU (tests/test_resume.py kills real processes between steps and inside a checkpoint write).

Run folder: config.yaml (resolved), metrics.jsonl (one "train" line per step, one "eval" line per
evaluation, step 0 = before RL), samples.jsonl (a few decoded trajectories at each evaluation),
checkpoints/, report.md (final evaluation and the learning curve), final/ (the trained model as a
Hugging Face folder, exported from the newest checkpoint by `treedistill.export`), and .treedistill-run, which
marks the folder as a run and is locked (fcntl.flock) while a process runs in it: a second run on the
folder, a folder of other files, or one that cannot be written is refused before any compute.

Departures from the reference run (../shared/docs/method.md):
- importance ratios divide by the behaviour log-probs recorded at generation, never by log-probs
  recomputed before the update;
- dropout stays off (the model is kept in eval mode) so that the trained function is the one that
  sampled;
- a non-finite loss or gradient norm skips its update instead of corrupting the weights, and an update
  that leaves a weight non-finite is rolled back (weights and optimizer state); three such updates in
  a row stop the run;
- the frozen reference policy is run only when the loss has a KL term (kl_coef > 0), so a method
  without one is neither slowed nor charged compute for a number it does not use.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import yaml

from treedistill import checkpoint
from treedistill.algorithms.batch import shift_right
from treedistill.algorithms.losses import combine_metrics, token_entropy, token_logprobs
from treedistill.config import TrainConfig, to_yaml
from treedistill.datasets import load_split
from treedistill.engine import make_engine
from treedistill.envs import get_env
from treedistill.envs.countdown import generate_problems
from treedistill.errors import UsageError
from treedistill.evaluate import evaluate
from treedistill.export import write_final
from treedistill.jsonl import writable_folder
from treedistill.methods import METHODS, RolloutContext
from treedistill.metrics import ComputeCounters, MetricsLogger, Progress, format_duration, read_metrics
from treedistill.models.load import load_policy
from treedistill.models.value_head import ValueHead
from treedistill.rollout.collate import to_batch
from treedistill.rollout.sample import completion_text

__all__ = ["DivergedError", "Learned", "RESUMABLE_CHANGES", "Shard", "advance_bar", "append_jsonl",
           "apply_update", "check_context", "check_same_run", "claim_run_folder", "clear_engine_cache", "derive_seed", "finish_run",
           "holding_run_folder", "is_run_folder", "learn", "load_problems",
           "load_train_policy", "open_run_logs", "reference_policy", "restore_loop", "resume_point", "sample_records",
           "take_problems", "train", "truncate_jsonl", "why_stop", "write_report", "budget_progress", "spent",
           "passed_eval_point", "eval_stats"]

# Settings that may differ between a run and its resumption: they change when the run stops or how it
# is logged, not what any step computes (`steps` does move a linear decay that ends at `steps`).
RESUMABLE_CHANGES = ("steps", "budget_generated_tokens", "budget_flops", "keep_checkpoints", "log_backends",
                     "wandb_project", "eval_every", "checkpoint_every", "eval_at_tokens", "final_eval_problems",
                     "eval_before_rl")
# Quantities whose non-finite value skips an update, in the order they are named.
CHECKED = ("policy_loss", "value_loss", "kl", "loss", "grad_norm")
MAX_NONFINITE_IN_A_ROW = 3
# The file that marks a folder as a run's and is locked while a process runs in it; the files a run writes.
RUN_MARKER = ".treedistill-run"
RUN_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl", "report.md")

# Splits an environment can generate from (train_size, test_size, data_seed) when no file is given.
GENERATORS = {"countdown": lambda cfg: generate_problems(cfg.train_size, cfg.test_size, cfg.data_seed)}


class DivergedError(UsageError):
    """The run stopped: MAX_NONFINITE_IN_A_ROW updates in a row had a non-finite loss or gradient."""


# ---------------------------------------------------------------------------------------------------
# Plumbing the loop calls: data, seeds, forward pass, update, evaluation, files


def load_problems(cfg: TrainConfig, env) -> tuple[list[dict], list[dict]]:
    """(train, test) problems: from cfg.train_path / cfg.test_path, else generated (countdown: test
    first, disjoint on env.key) or the environment's named split. Training problems equal to a test
    problem under env.key are dropped, whatever their source."""
    generated = GENERATORS[cfg.env](cfg) if cfg.env in GENERATORS else None
    train = (load_split(cfg.env, "train", cfg.train_path) if cfg.train_path or generated is None
             else generated[0])
    test = load_split(cfg.env, "test", cfg.test_path) if cfg.test_path or generated is None else generated[1]
    test_keys = {env.key(p) for p in test}
    train = [p for p in train if env.key(p) not in test_keys]
    if not train or not test:
        raise UsageError(f"need training and test problems, got {len(train)} (after dropping test "
                         f"problems) and {len(test)}")
    return train, test


def derive_seed(seed: int, what: str, step: int) -> int:
    """A 31-bit seed for one random choice of one step, independent across (what, step)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{what}/{step}".encode()).digest()[:4], "little") >> 1


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


def forward(policy, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logits [B, T, V], log-probs of batch.input_ids [B, T], values V(s_t) [B, T] or None), the last
    two in the Batch alignment (column t: the state that generated token t)."""
    logits, hidden = policy.forward(batch.input_ids, batch.attention_mask)  # [B, T, V], [B, T, H]
    logprobs = token_logprobs(logits, batch.input_ids)  # [B, T]
    values = shift_right(policy.value_head(hidden)) if policy.value_head is not None else None  # [B, T]
    return logits, logprobs, values


def apply_update(optimizer, params: list, metrics: dict, cfg: TrainConfig) -> dict:
    """Clip the accumulated gradients and step, or skip the step when a loss or the gradient norm is
    not finite (the gradients are dropped either way). A step that leaves a weight non-finite (finite
    gradients can still overflow in the update) is rolled back: the weights and the optimizer state
    return to what they were before it, and "weights" is named as non-finite. Returns metrics +
    grad_norm + nonfinite (the names of the non-finite quantities; empty when the step was taken).

    The roll-back costs one copy of the trainable weights and of the optimizer state per update."""
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    values = {**metrics, "grad_norm": grad_norm}
    bad = [name for name in CHECKED if name in values and not math.isfinite(values[name])]
    if not bad:
        weights = [_local(p).detach().clone() for p in params]
        state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                 for p, s in optimizer.state.items()}
        optimizer.step()
        if not _all_finite(params):
            with torch.no_grad():
                for p, saved in zip(params, weights):
                    _local(p).copy_(saved)
            optimizer.state.clear()
            optimizer.state.update(state)
            bad = ["weights"]
    optimizer.zero_grad(set_to_none=True)
    return {**values, "nonfinite": bad}


def _local(param: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter: its shard under FSDP (a DTensor), else itself."""
    return param.to_local() if hasattr(param, "to_local") else param


def _all_finite(params: list) -> bool:
    """Whether every weight is finite, in every process when several share the parameters (FSDP: each
    checks its shards, and all agree on the answer, so all roll back together)."""
    local = [_local(p) for p in params]
    flag = torch.stack([torch.isfinite(t).all() for t in local]).all().to(torch.int32)  # scalar
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag)


def _mean_metrics(updates: list[dict]) -> dict:
    """Metrics of a step's updates: means, maxima for `*_max` keys."""
    keys = [k for k in updates[0] if isinstance(updates[0][k], (int, float))]
    return {k: (max(u[k] for u in updates) if k.endswith("_max") else sum(u[k] for u in updates) / len(updates))
            for k in keys}


def load_train_policy(cfg: TrainConfig):
    """The policy to train, as the config says (model, dtype, device, value head, LoRA), in eval mode:
    no dropout, so the trained function is the one that sampled. Generators of a distributed run load
    theirs with this same function."""
    lora = None if cfg.lora.r == 0 else {"r": cfg.lora.r, "alpha": cfg.lora.alpha,
                                         **({"target_modules": list(cfg.lora.target_modules)}
                                            if cfg.lora.target_modules else {})}
    policy = load_policy(cfg.model, dtype=None if cfg.dtype == "auto" else cfg.dtype,
                         device=None if cfg.device == "auto" else cfg.device,
                         value_head=cfg.uses_value_head, lora=lora)
    if cfg.fresh_value_head and policy.value_head is not None:
        # a saved head predicts the reward it was fitted to (the tiny model's: the dense reward); a run on
        # another reward starts from a new head, as the reference run's did (seeded: every process of a
        # distributed run builds the same one)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            policy.value_head = ValueHead(policy.hidden_size).to(policy.device)
    policy.model.eval()
    return policy


@dataclasses.dataclass(frozen=True)
class Shard:
    """Which micro-batches of each minibatch this process trains on when several learner processes
    share every update (data-parallel / FSDP): micro-batch i belongs to rank i % world, and `gather`
    returns the metric dicts of all ranks' micro-batches (this process's own when world == 1).
    Micro-batches are normalised by their minibatch's token count, so the ranks' gradients SUM to the
    minibatch's gradient."""

    rank: int = 0
    world: int = 1
    gather: Callable[[list[dict]], list[dict]] = list


@dataclasses.dataclass(frozen=True)
class Learned:
    """What one step's learning did: the batch [B, T] it built (advantages filled in), its updates'
    metrics, the learning rate, updates skipped as non-finite in this step, the non-finite streak
    after it, and why the run must stop (None: it goes on)."""

    batch: object
    updates: list
    lr: float
    skipped: int
    nonfinite_streak: int
    diverged: str | None

    def metrics(self, trajectories: Sequence, skipped_updates: int) -> dict:
        """The learning part of the step's metrics line (skipped_updates: the run's total)."""
        rewards = self.batch.rewards
        return {"kind": "train", **_mean_metrics(self.updates), "lr": self.lr,
                "updates": len(self.updates), "skipped_updates": skipped_updates,
                "nonfinite": ",".join(sorted({n for u in self.updates for n in u["nonfinite"]})),
                "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False)),
                "sparse_mean": sum(t.sparse for t in trajectories) / len(trajectories),
                "completion_tokens_mean": float(self.batch.loss_mask.sum(dim=1).mean())}


def learn(trajectories: Sequence, *, policy, reference, method, optimizer, params: list, counters: ComputeCounters,
          cfg: TrainConfig, step: int, nonfinite_streak: int, shard: Shard = Shard(),
          progress: float | None = None) -> Learned:
    """Steps 2 to 4 of the loop on one step's trajectories: rewards -> advantages (with V(s_t) and the
    reference log-probs of these very rows) -> cfg.epochs x minibatches optimizer updates, each
    accumulated over micro-batches. Counts the learner's compute into `counters`. progress: the
    share of the run's budget this step stands at (`budget_progress`; None: a step-limited run),
    which sets the learning rate."""
    # 2. rewards -> 3. advantages, with V(s_t) and the reference log-probs of these very rows
    batch = to_batch(trajectories, pad_id=policy.pad_token_id, device=policy.device)
    # (the reference pass only where the loss has a KL term: a method without one is not charged for it)
    old_values, ref_logprobs = [], []
    micros = batch.split(cfg.micro_batch_rows)
    with torch.no_grad():
        for micro in micros:
            if policy.value_head is not None:
                old_values.append(forward(policy, micro)[2])
            if cfg.kl_coef > 0:
                ref_logprobs.append(reference(micro.input_ids, micro.attention_mask))
    passes = (policy.value_head is not None) + (cfg.kl_coef > 0)
    tokens = int(batch.attention_mask.sum())
    counters.add_learning(inference_tokens=passes * tokens, forward_calls=passes * len(micros),
                          head_inference_tokens=tokens if policy.value_head is not None else 0)
    width = batch.input_ids.shape[1]
    old_values = _pad_cat(old_values, width) if old_values else None  # [B, T]
    advantages, returns = method.advantages(batch.rewards, old_values, batch.loss_mask, cfg)  # [B, T] x2
    batch = dataclasses.replace(batch, advantages=advantages, returns=returns, old_values=old_values,
                                ref_logprobs=_pad_cat(ref_logprobs, width) if ref_logprobs else None)

    # 4. loss and optimizer update(s): epochs x minibatches, each accumulated over micro-batches
    lr = cfg.lr * cfg.lr_multiplier(step - 1, progress)
    for group in optimizer.param_groups:
        group["lr"] = lr
    shuffle = torch.Generator().manual_seed(derive_seed(cfg.seed, "minibatches", step))
    updates, skipped = [], 0
    for _ in range(cfg.epochs):
        for minibatch in batch.minibatches(cfg.minibatch_rows, shuffle):
            parts, trained_tokens = [], 0
            for i, micro in enumerate(minibatch.split(cfg.micro_batch_rows)):
                if i % shard.world != shard.rank:
                    continue
                logits, logprobs, values = forward(policy, micro)
                loss, metrics = method.loss(micro, logprobs, values, cfg, entropy=token_entropy(logits))
                loss.backward()
                parts.append(metrics)
                trained_tokens += int(micro.attention_mask.sum())
            counters.add_learning(train_tokens=trained_tokens, forward_calls=len(parts),
                                  head_train_tokens=trained_tokens if policy.value_head is not None else 0)
            update = apply_update(optimizer, params, combine_metrics(shard.gather(parts)), cfg)
            updates.append(update)
            skipped += bool(update["nonfinite"])
            nonfinite_streak = nonfinite_streak + 1 if update["nonfinite"] else 0
            if nonfinite_streak >= MAX_NONFINITE_IN_A_ROW:
                return Learned(batch, updates, lr, skipped, nonfinite_streak,
                               f"step {step}: non-finite {', '.join(update['nonfinite'])} in {nonfinite_streak} "
                               "updates in a row; run stopped (its last checkpoint holds the weights before)")
    return Learned(batch, updates, lr, skipped, nonfinite_streak, None)


def eval_stats(result) -> dict:
    """An evaluation's metrics-line fields: eval_<statistic>, and eval_per_problem [P] (each test
    problem's mean sparse reward over its k samples, in test-split order), which paired comparisons
    between runs evaluated on the same problems read (report.py)."""
    stats = {f"eval_{k}": v for k, v in result.to_dict().items() if k != "seconds"}
    return {**stats, "eval_per_problem": [round(x, 6) for x in result.per_problem]}


def clear_engine_cache(engine) -> None:
    """Empty the engine's prefix cache (a backend without one has nothing to clear)."""
    getattr(engine, "clear_cache", lambda: None)()


def reference_policy(policy, stack: contextlib.ExitStack):
    """ref(input_ids, attention_mask) -> log-probs [B, T] (Batch alignment) under the FROZEN initial
    policy: the disabled LoRA adapter when there is one, else a frozen copy made now."""
    lora_ref = stack.enter_context(policy.reference())
    if lora_ref is not None:
        def ref(ids, mask):
            return torch.cat([torch.zeros_like(ids[:, :1], dtype=torch.float32), lora_ref(ids, mask)], dim=1)
        return ref
    frozen = dataclasses.replace(policy, model=copy.deepcopy(policy.model).requires_grad_(False), value_head=None)

    def ref(ids, mask):
        return token_logprobs(frozen.forward(ids, mask)[0], ids)  # [B, T]
    return ref


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


def check_same_run(saved_yaml: str, cfg: TrainConfig) -> None:
    saved, now = yaml.safe_load(saved_yaml), yaml.safe_load(to_yaml(cfg))
    changed = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if changed:
        raise UsageError(f"cannot resume: the config differs from the checkpoint's in {', '.join(changed)} "
                         f"(only {', '.join(RESUMABLE_CHANGES)} may change); use a new --run-dir")


def truncate_jsonl(path: Path, step: int | None) -> None:
    """Keep the records of steps <= step (None: none), so a resumed run rewrites what followed."""
    kept = []
    if step is not None and path.exists():
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue  # a line cut short by a kill (or damaged by hand)
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line + "\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def append_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


# The loop skeleton that `train` and the distributed loop (distributed/ray_loop.py) share.


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
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / RUN_MARKER, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UsageError(f"--run-dir {run_dir} cannot be created or written ({err.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = re.search(r"pid (\d+)", os.pread(fd, 200, 0).decode("utf-8", "replace"))
            raise UsageError(f"--run-dir {run_dir} is in use by another run (pid {holder[1] if holder else '?'}); "
                             "wait for it to end or choose another folder") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"treedistill run folder, held while running by pid {os.getpid()}\n".encode(), 0)
            for folder in (run_dir, run_dir / "checkpoints"):
                writable_folder(folder)
            for name in RUN_FILES:
                if (run_dir / name).exists() and not os.access(run_dir / name, os.W_OK):
                    raise PermissionError(errno.EACCES, "Permission denied", str(run_dir / name))
        except OSError as err:
            raise UsageError(f"--run-dir {run_dir} cannot be written: {_os_error(err)}") from None
        yield
    except OSError as err:
        if created:
            _remove_unused(run_dir)
        raise UsageError(f"stopped by an I/O error: {_os_error(err)}") from None
    except BaseException:
        if created:
            _remove_unused(run_dir)
        raise
    finally:
        os.close(fd)  # releases the lock


def _os_error(err: OSError) -> str:
    """An OSError as "what: which file" (without Python's "[Errno N]")."""
    return f"{err.strerror}: {err.filename}" if err.strerror and err.filename else str(err)


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


def passed_eval_point(cfg: TrainConfig, before: int, after: int) -> bool:
    """Whether the step that took the run's generated tokens from `before` to `after` passed one of
    cfg.eval_at_tokens: the run is evaluated after that step, which is never cut for it (only the
    final budget cuts a step, `problems_for_step`), so evaluating changes no step of training."""
    return any(before < point <= after for point in cfg.eval_at_tokens)


def why_stop(step: int, counters: ComputeCounters, cfg: TrainConfig) -> str | None:
    """Why the run stops after `step` steps (a compute budget spent, or every step done), or None."""
    spent = counters.budget_exhausted(generated_tokens=cfg.budget_generated_tokens, flops=cfg.budget_flops)
    return spent or (f"all {cfg.steps} steps done" if step >= cfg.steps else None)


def advance_bar(bar: Progress | None, record: dict, last_eval: dict | None) -> None:
    """One step on the progress bar (if any), showing the step's reward and loss and the last mean@k."""
    if bar is not None:
        bar.update(1, reward=record["reward_mean"], loss=record.get("loss", math.nan),
                   **({"mean@k": last_eval["eval_accuracy"]} if last_eval else {}))


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


def write_report(run_dir: Path, cfg: TrainConfig, stop_reason: str, wall_s: float) -> str:
    """report.md from metrics.jsonl: the final evaluation, the learning curve as a table, compute."""
    records = read_metrics(run_dir)
    evals = [r for r in records if r.get("kind") == "eval"]
    trains = {r["step"]: r for r in records if r.get("kind") == "train"}
    k = cfg.eval_k
    lines = [f"# Training run: {cfg.method} on {cfg.env} with {cfg.model}", "",
             f"Stopped: {stop_reason}. Steps done: {max(trains, default=0)}. Wall time: {format_duration(wall_s)}.", ""]
    if evals:
        first, last = evals[0], evals[-1]
        lines += ["## Final evaluation (no search, sparse reward)", "",
                  f"mean@{k} at step {last['step']}: {100 * last['eval_accuracy']:.2f}% "
                  f"+- {100 * last['eval_stderr']:.2f} ({last['eval_problems']} test problems x {k} samples at "
                  f"T={cfg.eval_temperature}); at step {first['step']}: {100 * first['eval_accuracy']:.2f}% "
                  f"+- {100 * first['eval_stderr']:.2f}.", "",
                  "## Learning curve", "",
                  f"| step | generated tokens | total FLOPs | mean@{k} % | stderr | pass@{k} % | train reward |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in evals:
            reward = trains.get(r["step"], {}).get("reward_mean")
            lines.append(f"| {r['step']} | {r['rollout_generated_tokens']:,} | {r['total_flops']:.3g} | "
                         f"{100 * r['eval_accuracy']:.2f} | {100 * r['eval_stderr']:.2f} | "
                         f"{100 * r['eval_pass_at_k']:.1f} | {'' if reward is None else f'{reward:+.3f}'} |")
        lines.append("")
    if trains:
        c = trains[max(trains)]
        lines += ["## Compute (cumulative)", "", "| quantity | rollout | learning |", "|---|---:|---:|",
                  f"| tokens | {c['rollout_generated_tokens']:,} generated, {c['rollout_prompt_tokens']:,} prefill, "
                  f"{c['rollout_cached_tokens']:,} from cache, {c['rollout_scored_tokens']:,} scored | "
                  f"{c['learn_train_tokens']:,} trained, {c['learn_inference_tokens']:,} no-grad |",
                  f"| forward calls | {c['rollout_forward_calls']:,} | {c['learn_forward_calls']:,} |",
                  f"| FLOPs (estimate) | {c['rollout_flops']:.3g} | {c['learn_flops']:.3g} |", ""]
    lines += ["## Config", "", "```yaml", to_yaml(cfg).rstrip(), "```", ""]
    text = "\n".join(lines)
    tmp = run_dir / "report.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, run_dir / "report.md")
    return text


# ---------------------------------------------------------------------------------------------------
# The loop


def check_context(cfg: TrainConfig, policy, env, problems: Sequence[dict]) -> None:
    """Refuse (UsageError, before any compute) a run whose longest prompt plus max_new_tokens does not
    fit in the model's context. The longest prompts by characters stand for the longest by tokens."""
    longest = sorted(problems, key=lambda p: len(json.dumps(p)), reverse=True)[:8]
    prompt = max(len(policy.prompt_ids(env.messages(p, compact=policy.compact_prompt))) for p in longest)
    if prompt + cfg.max_new_tokens > policy.context_length:
        raise UsageError(f"max_new_tokens={cfg.max_new_tokens} does not fit: prompts of up to {prompt} tokens "
                         f"leave room for {policy.context_length - prompt} in {policy.name}'s context of "
                         f"{policy.context_length} tokens")


@holding_run_folder
def train(cfg: TrainConfig, run_dir: str | Path, *, resume: str = "auto", engine: str = "native",
          progress: bool = True) -> dict:
    """Run (or continue) training as the config says; returns a summary of the run.

    resume: "auto" (continue from the run folder's newest complete checkpoint, else start), "never"
    (start; refused if the folder holds checkpoints) or a checkpoint / run folder path.
    engine: generation backend, "native" (KV cache shared across the search tree) or "hf".
    """
    # ---- set-up: everything that can refuse the input comes before any compute
    run_dir = Path(run_dir)
    method = METHODS[cfg.method]
    _, saved = resume_point(run_dir, resume)
    if saved is not None:
        check_same_run(saved["config"], cfg)
    env = get_env(cfg.env)
    train_problems, test_problems = load_problems(cfg, env)
    eval_problems = test_problems[:cfg.eval_problems] if cfg.eval_problems else test_problems
    final_eval_problems = test_problems[:cfg.final_eval_count] if cfg.final_eval_count else test_problems
    torch.manual_seed(cfg.seed)
    policy = load_train_policy(cfg)
    check_context(cfg, policy, env, [*train_problems, *test_problems])
    stack = contextlib.ExitStack()
    # the frozen initial policy, for the KL term: taken BEFORE any checkpoint weights are loaded
    reference = reference_policy(policy, stack) if cfg.kl_coef > 0 else None
    gen = make_engine(policy, engine)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    if policy.value_head is not None:
        params += list(policy.value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    head_params = sum(p.numel() for p in policy.value_head.parameters()) if policy.value_head is not None else 0
    counters = ComputeCounters(params=policy.num_parameters, head_params=head_params)
    step, skipped_updates, nonfinite_streak, wall_before = restore_loop(saved, counters)
    position = 0
    if saved is not None:
        policy.model.load_state_dict(saved["model"])
        if policy.value_head is not None:
            policy.value_head.load_state_dict(saved["value_head"])
        optimizer.load_state_dict(saved["optimizer"])
        position = int(saved["loop"]["position"])
    logger = open_run_logs(run_dir, cfg, step if saved is not None else None)
    ctx = RolloutContext(engine=gen, policy=policy, env=env, cfg=cfg)
    started = time.perf_counter()

    def wall() -> float:
        return wall_before + time.perf_counter() - started

    def evaluation(at_step: int, trajectories: Sequence = (), final: bool = False) -> dict:
        t0 = time.perf_counter()
        clear_engine_cache(gen)
        problems = final_eval_problems if final else eval_problems
        result = evaluate(gen, policy, env, problems, k=cfg.eval_k, temperature=cfg.eval_temperature,
                          max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        shown = problems[:cfg.eval_samples_logged]
        append_jsonl(run_dir / "samples.jsonl",
                      sample_records(ctx, shown, at_step, trajectories[:cfg.eval_samples_logged]))
        return logger.log(at_step, {"kind": "eval", **eval_stats(result), **counters.as_dict(),
                                    "eval_s": time.perf_counter() - t0, "wall_s": wall()})

    if step == 0 and cfg.eval_before_rl:
        evaluation(0)  # before RL
    stop_reason = why_stop(step, counters, cfg)
    bar = Progress(cfg.steps, initial=step, desc=f"train {cfg.method}") if progress and stop_reason is None else None
    last_eval = None
    try:
        while stop_reason is None:
            step += 1
            t_step = time.perf_counter()

            # 1. collect trajectories (scored inside: best-of-N and the search choose by reward)
            clear_engine_cache(gen)  # cached keys/values belong to the weights before the last update
            spent_before = spent(counters)
            problems = take_problems(train_problems, cfg.seed, position, problems_for_step(cfg, counters, position))
            position += len(problems)
            before = gen.counters.snapshot()
            rollout = method.rollout(ctx, problems, derive_seed(cfg.seed, "rollout", step))
            after = gen.counters.snapshot()
            counters.add_rollout(**{name: after[name] - before.get(name, 0) for name in after})
            trajectories = rollout.trajectories
            assert len(trajectories) == len(problems) * cfg.samples_per_problem, (
                f"{cfg.method} rollout returned {len(trajectories)} trajectories, expected "
                f"{len(problems) * cfg.samples_per_problem} (problems x samples per problem)")
            t_rollout = time.perf_counter()

            # 2. rewards -> 3. advantages -> 4. loss and optimizer update(s)
            learned = learn(trajectories, policy=policy, reference=reference, method=method, optimizer=optimizer,
                            params=params, counters=counters, cfg=cfg, step=step, nonfinite_streak=nonfinite_streak,
                            progress=budget_progress(cfg, spent_before, spent(counters)))
            skipped_updates += learned.skipped
            nonfinite_streak = learned.nonfinite_streak
            t_learn = time.perf_counter()

            # 5. log
            stop_reason = why_stop(step, counters, cfg)
            record = logger.log(step, {
                **learned.metrics(trajectories, skipped_updates),
                **rollout.stats, **counters.as_dict(), "problems_seen": position,
                "rollout_s": t_rollout - t_step, "learn_s": t_learn - t_rollout, "wall_s": wall(),
            })
            if learned.diverged:
                raise DivergedError(learned.diverged)

            # 6. evaluation (mean@k, sparse reward, no search): every eval_every steps, after the step
            #    that passes an evaluation point, and always at the end
            if (cfg.eval_every and step % cfg.eval_every == 0) or stop_reason or passed_eval_point(
                    cfg, spent_before[0], counters.rollout_generated_tokens):
                last_eval = evaluation(step, trajectories, final=stop_reason is not None)

            # 7. checkpoint (atomic; the newest keep_checkpoints kept), and always at the end
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or stop_reason:
                checkpoint.save_checkpoint(run_dir, step, {
                    "model": policy.model.state_dict(),
                    **({"value_head": policy.value_head.state_dict()} if policy.value_head is not None else {}),
                    "optimizer": optimizer.state_dict(),
                    "rng": checkpoint.rng_state(),
                    "counters": counters.state_dict(),
                    "loop": {"step": step, "position": position, "skipped_updates": skipped_updates,
                             "nonfinite_streak": nonfinite_streak, "wall_s": wall()},
                    "config": to_yaml(cfg),
                }, keep=cfg.keep_checkpoints)
            advance_bar(bar, record, last_eval)
    finally:
        if bar is not None:
            bar.close()
        logger.close()
        stack.close()

    # ---- the end: report.md and a summary
    return finish_run(run_dir, cfg, step=step, stop_reason=stop_reason, skipped_updates=skipped_updates,
                      counters=counters, wall_s=wall())


def finish_run(run_dir: Path, cfg: TrainConfig, *, step: int, stop_reason: str | None, skipped_updates: int,
               counters: ComputeCounters, wall_s: float, **extra) -> dict:
    """Write DIR/report.md and the trained model DIR/final/ (from the newest checkpoint, so that the
    distributed loop's, written by whichever process holds the weights, serves as well), and return the
    run's summary: its evaluation curve, compute counters, the final folder and `extra` fields (the
    single-process and the distributed loop end the same way)."""
    write_report(run_dir, cfg, stop_reason, wall_s)
    final = write_final(run_dir)
    evals = [r for r in read_metrics(run_dir) if r.get("kind") == "eval"]
    return {"run_dir": str(run_dir), "method": cfg.method, "steps": step, "stop_reason": stop_reason,
            "skipped_updates": skipped_updates, "eval_k": cfg.eval_k,
            "curve": [{"step": r["step"], "generated_tokens": r["rollout_generated_tokens"],
                       "total_flops": r["total_flops"], "accuracy": r["eval_accuracy"],
                       "stderr": r["eval_stderr"]} for r in evals],
            **counters.as_dict(), "wall_s": wall_s, "final": str(final) if final else None, **extra}


def _pad_cat(parts: list[torch.Tensor], width: int) -> torch.Tensor:
    """Micro-batch results [b_i, T_i] (T_i <= width after `select` trimmed padding) -> [B, width]."""
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts], dim=0)
