"""Reading run folders for a report: each evaluation's point on the learning curve, the compute used.

Input: a run folder written by `treedistill train` (config.yaml + metrics.jsonl), finished or still
running; nothing here trains or loads a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from treedistill.errors import UsageError

__all__ = ["VALUE_KEYS", "CurvePoint", "RunResult", "read_records", "read_run"]


@dataclass(frozen=True)
class CurvePoint:
    """One evaluation of a run: step, cumulative compute when it ran, mean@k and its stderr, and each
    test problem's mean@k [P] in test-split order (() where the run did not log them)."""

    step: int
    generated_tokens: int
    total_flops: float
    accuracy: float
    stderr: float
    per_problem: tuple[float, ...] = ()


@dataclass(frozen=True)
class RunResult:
    """What a report needs from one run folder. curve: [E] evaluations in step order (step 0 = pre-RL)."""

    run_dir: str
    method: str
    seed: int
    config: dict
    curve: tuple[CurvePoint, ...]
    steps: int                    # last logged training step
    generated_tokens: int         # cumulative, at the last logged training step
    rollout_flops: float
    learn_flops: float
    train_s: float                # seconds in rollouts + updates (evaluations excluded)
    wall_s: float                 # wall time of the run so far, evaluations included
    finished: bool                # the last evaluation is at the last logged training step
    under_budget: bool            # stopped (finished) short of its budget (generated tokens or FLOPs)
    final_per_problem: tuple[float, ...] = ()  # [P] the final evaluation's per-problem mean@k; () if not logged
    final_value: dict = field(default_factory=dict)  # the final evaluation's VALUE_KEYS
    # Over the whole run, each step weighted by the tokens it generated (None where no train line logged it):
    learned_token_share: float | None = None  # generated tokens that ended in a learned row, per generated token
    lines_per_1k_tokens: float | None = None  # a tree method's finished lines per 1,000 generated tokens

    @property
    def final(self) -> CurvePoint:
        return self.curve[-1]

    @property
    def initial(self) -> CurvePoint | None:
        return self.curve[0] if self.curve and self.curve[0].step == 0 else None


VALUE_KEYS = ("value_spearman", "value_mse", "value_mse_const", "value_auc_reachable")  # value_probe.py's, on eval lines


def read_records(run_dir: str | Path, *, missing_ok: bool = False) -> list[dict]:
    """metrics.jsonl records of a run folder, finished or in flight: a line cut short by a kill (or
    being written) is skipped. A folder without the file is refused, or gives [] with missing_ok."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        if missing_ok:
            return []
        raise UsageError(f"{run_dir} is not a run folder: no metrics.jsonl")
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_run(run_dir: str | Path) -> RunResult:
    """The curve, compute and final evaluation of one run folder (finished or not)."""
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    evals = [r for r in records if r.get("kind") == "eval"]
    if not evals:
        raise UsageError(f"{run_dir} has no evaluation yet (no kind=eval line in metrics.jsonl)")
    trains = [r for r in records if r.get("kind") == "train"]
    last = trains[-1] if trains else evals[-1]
    curve = tuple(CurvePoint(step=int(r["step"]), generated_tokens=int(r.get("rollout_generated_tokens", 0)),
                             total_flops=float(r.get("total_flops", 0.0)), accuracy=float(r["eval_accuracy"]),
                             stderr=float(r["eval_stderr"] or 0.0),
                             per_problem=tuple(float(x) for x in r.get("eval_per_problem") or ())) for r in evals)
    steps = int(last["step"])
    finished = curve[-1].step == steps and steps > 0
    tokens_budget, flops_budget = config.get("budget_generated_tokens"), config.get("budget_flops")
    generated = int(last.get("rollout_generated_tokens", 0))
    return RunResult(
        run_dir=str(run_dir), method=str(config.get("method", "?")), seed=int(config.get("seed", 0)),
        config=config, curve=curve, steps=steps, generated_tokens=generated,
        rollout_flops=float(last.get("rollout_flops", 0.0)), learn_flops=float(last.get("learn_flops", 0.0)),
        train_s=sum(float(r.get("rollout_s", 0.0)) + float(r.get("learn_s", 0.0)) for r in trains),
        wall_s=max(float(r.get("wall_s") or 0.0) for r in records), finished=finished,
        under_budget=finished and ((tokens_budget is not None and generated < int(tokens_budget))
                                   or (flops_budget is not None and float(last.get("total_flops", 0.0))
                                       < float(flops_budget))),
        final_per_problem=tuple(float(x) for x in evals[-1].get("eval_per_problem") or ()),
        final_value={key: evals[-1][key] for key in VALUE_KEYS if key in evals[-1]},
        learned_token_share=_token_weighted(trains, "learned_token_share"),
        lines_per_1k_tokens=_token_weighted(trains, "tree_lines_per_1k_tokens"))


def _token_weighted(trains: list[dict], key: str) -> float | None:
    """The mean of a per-step rate over a run's train lines, each step weighted by the tokens it generated
    (the difference of the cumulative rollout_generated_tokens); None where no line has the key."""
    total = weight = 0.0
    before = 0
    for r in trains:
        now = int(r.get("rollout_generated_tokens", 0))
        if r.get(key) is not None:
            total += float(r[key]) * (now - before)
            weight += now - before
        before = now
    return total / weight if weight > 0 else None
