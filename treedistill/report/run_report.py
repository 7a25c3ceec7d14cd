"""One training run's own report.md, written by the loops at the end of every run: the final
evaluation, the learning curve as a table, compute, the config."""

from __future__ import annotations

from pathlib import Path

from treedistill.config import TrainConfig, to_yaml
from treedistill.metrics import format_duration, read_metrics

__all__ = ["write_run_report"]


def write_run_report(run_dir: Path, cfg: TrainConfig, stop_reason: str, wall_s: float) -> str:
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
        probed = [r for r in evals if "value_mse" in r]
        if probed:
            lines += ["## Value head (value_probe.py)", "",
                      f"V(prefix) against the mean {cfg.reward} reward of {cfg.value_probe_k} policy completions "
                      f"(T={cfg.value_probe_temperature}) from step prefixes of test problems: a useful head has "
                      "Spearman > 0 and an MSE under the best constant's.", "",
                      "| step | prefixes | Spearman | MSE | best constant's MSE | mean target | AUC (reachable) |",
                      "|---:|---:|---:|---:|---:|---:|---:|"]
            for r in probed:
                rho, auc = r.get("value_spearman"), r.get("value_auc_reachable")
                lines.append(f"| {r['step']} | {r['value_probe_prefixes']} | {'n/a' if rho is None else f'{rho:+.3f}'} | "
                             f"{r['value_mse']:.4f} | {r['value_mse_const']:.4f} | {r['value_probe_target_mean']:.3f} | "
                             f"{'n/a' if auc is None else f'{auc:.3f}'} |")
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
    tmp.replace(run_dir / "report.md")
    return text
