"""Comparison reports from run folders: Student-t maths worked by hand, tables and plots from
synthetic run folders written in the real format (config.yaml by to_yaml, metrics.jsonl by
MetricsLogger with ComputeCounters)."""

import json
import math

import pytest

from treedistill.config import load_config, to_yaml
from treedistill.errors import UsageError
from treedistill.metrics import ComputeCounters, MetricsLogger
from treedistill.report import (
    REFERENCE,
    confidence_interval,
    read_run,
    summarize,
    t_cdf,
    t_quantile,
    verdict,
    write_report,
    z_score,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- (a) numbers worked by hand

def test_t_quantiles_match_the_table():
    # Two-sided 95% critical values t_{0.975, df} from any t table.
    for df, expected in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)]:
        assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    # df = 2 in closed form: P(|T| <= t) = t / sqrt(t^2 + 2) = 0.95  =>  t^2 = 1.805 / 0.0975
    assert t_quantile(0.975, 2) == pytest.approx(math.sqrt(1.805 / 0.0975), rel=1e-9)
    assert t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1) / pi
    assert t_cdf(-2.5, 7) == pytest.approx(1 - t_cdf(2.5, 7))
    assert t_quantile(0.5, 5) == pytest.approx(0.0, abs=1e-9)


def test_three_seed_interval_by_hand():
    # mean 0.12; sd = sqrt(((-0.02)^2 + 0 + 0.02^2) / 2) = 0.02; s.e. = 0.02 / sqrt(3) = 0.0115470;
    # half width = t_{0.975, 2} * s.e. = 4.302653 * 0.0115470 = 0.0496828
    mean, half = confidence_interval([0.10, 0.12, 0.14])
    assert mean == pytest.approx(0.12)
    assert half == pytest.approx(0.0496828, abs=1e-6)
    with pytest.raises(ValueError):
        confidence_interval([0.1])


def test_z_score_and_verdict_by_hand():
    # (0.30 - 0.20) / sqrt(0.03^2 + 0.04^2) = 0.10 / 0.05 = 2.0
    assert z_score(0.30, 0.03, 0.20, 0.04) == pytest.approx(2.0)
    assert z_score(0.2, 0.0, 0.2, 0.0) == 0.0
    assert verdict(0.5).startswith("well within noise")
    assert verdict(-1.5).startswith("suggestive")
    assert verdict(2.0).startswith("2 or more")


# ---- synthetic run folders in the real format

def make_run(path, preset, *, seed=0, evals, tokens_per_step=1000, step_s=2.0, overrides=(),
             budget=3000, finished=True, eval_extra=None):
    """A run folder as `train` writes it. evals: {step: (accuracy, stderr)}; a train line per step
    1..max(evals) with counters growing by tokens_per_step generated tokens."""
    cfg = load_config(preset=preset, overrides=[f"seed={seed}", f"budget_generated_tokens={budget}",
                                                "eval_problems=200", *overrides])
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(to_yaml(cfg))
    counters = ComputeCounters(params=900_000)
    last = max(evals) if finished else max(evals) + 1
    with MetricsLogger(path) as logger:
        for step in range(last + 1):
            if step > 0:
                counters.add_rollout(generated_tokens=tokens_per_step, prompt_tokens=tokens_per_step // 2)
                counters.add_learning(train_tokens=tokens_per_step, inference_tokens=2 * tokens_per_step)
                logger.log(step, {"kind": "train", "loss": 0.1, "reward_mean": -0.3, **counters.as_dict(),
                                  "rollout_s": step_s * 0.75, "learn_s": step_s * 0.25, "wall_s": step * step_s})
            if step in evals:
                accuracy, stderr = evals[step]
                logger.log(step, {"kind": "eval", "eval_accuracy": accuracy, "eval_stderr": stderr,
                                  "eval_pass_at_k": min(1.0, 3 * accuracy), "eval_problems": 200, "eval_k": 16,
                                  **(eval_extra or {}), **counters.as_dict(), "eval_s": 5.0,
                                  "wall_s": step * step_s + 5.0})
    return path


def test_report_from_one_seed_per_method(tmp_path):
    runs = {
        "GRPO": [make_run(tmp_path / "grpo", "countdown-tiny-grpo",
                          evals={0: (0.05, 0.01), 2: (0.10, 0.015), 3: (0.20, 0.03)})],
        "MCTS distillation": [make_run(tmp_path / "mcts", "countdown-tiny-mcts", tokens_per_step=1500,
                                       evals={0: (0.05, 0.01), 1: (0.12, 0.02), 2: (0.30, 0.04)},
                                       eval_extra={"value_spearman": 0.25, "value_mse": 0.02,
                                                   "value_mse_const": 0.03})],
    }
    path = write_report(runs, tmp_path / "out", reference=REFERENCE, title="Test comparison")
    text = path.read_text()
    # the value heads at the final evaluation: mcts has one, GRPO none
    assert "## Value head" in text and "| MCTS distillation | 1 | +0.250 | 0.0200 | 0.0300 |" in text
    assert "| GRPO | 1 |" not in text
    for name in ("curves.png", "final.png"):
        data = (tmp_path / "out" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    # the final table: pre-RL from the step-0 evaluations, then the labels in order, with their numbers
    assert "| pre-RL | 5.00 | ± 1.00 | 0 |" in text
    assert "| GRPO | 20.00 | ± 3.00 | 3,000 |" in text
    assert "| MCTS distillation | 30.00 | ± 4.00 | 3,000 |" in text
    assert text.index("| pre-RL |") < text.index("| GRPO |") < text.index("| MCTS distillation |")
    # reference numbers beside ours; GRPO has none
    # (train time = 3 steps x 2 s; wall time = 3 x 2 s + the last evaluation's 5 s)
    assert "| 0 | - | - | - | 0 | - | - | 3.1 |" in text
    assert "| 3 | 0m06s | 0m11s | - |" in text and "| 2 | 0m04s | 0m09s | 11.3 |" in text
    # FLOPs: mcts at step 2 = rollout 2 x 0.9M x (3,000 + 1,500) + learning (6 x 3,000 + 2 x 6,000) x 0.9M
    assert f"{2 * 900_000 * 4_500:.3g}" in text and f"{900_000 * (6 * 3_000 + 2 * 6_000):.3g}" in text
    # the headline: (0.30 - 0.20) / sqrt(0.04^2 + 0.03^2) = 2.00
    assert "**MCTS distillation** scored highest" in text and "= 2.00 combined standard errors" in text
    assert "Every run had the same budget of 3,000" in text
    assert "![final](final.png)" in text and "![curves](curves.png)" in text
    short = (tmp_path / "out" / "table.md").read_text()
    assert "| MCTS distillation | 30.00 ± 4.00 | 3,000 | 3.51e+10 | 0m04s | 11.3 |" in short
    assert "| pre-RL | 5.00 ± 1.00 | 0 | - | - | 3.1 |" in short and "**MCTS distillation** scored highest" in short
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["label"] for r in summary["rows"]] == ["pre-RL", "GRPO", "MCTS distillation"]
    assert summary["rows"][2]["mean"] == pytest.approx(0.30)


def test_report_over_three_seeds_gives_t_intervals(tmp_path):
    runs = {}
    for label, preset, finals in [("CISPO", "countdown-tiny-cispo", (0.10, 0.12, 0.14)),
                                  ("best-of-N", "countdown-tiny-bon", (0.08, 0.09, 0.13))]:
        runs[label] = [make_run(tmp_path / label / str(seed), preset, seed=seed,
                                evals={0: (0.04 + seed / 100, 0.01), 3: (final, 0.02)})
                       for seed, final in enumerate(finals)]
    write_report(runs, tmp_path / "out", title="Seeds")
    text = (tmp_path / "out" / "report.md").read_text()
    # CISPO: 12.00 +- 4.97 (worked above); per-seed values listed
    assert "| CISPO | 12.00 | ± 4.97 | 10.00 / 12.00 / 14.00 |" in text
    # pre-RL: one step-0 value per seed (4, 5, 6 %): mean 5, sd 1, half width 4.3027 * 1 / sqrt(3) = 2.48
    assert "| pre-RL | 5.00 | ± 2.48 | 4.00 / 5.00 / 6.00 |" in text
    assert "95% Student-t interval over seeds" in text and "reference" not in text.split("## Final table")[1][:300]
    results = {label: [read_run(d) for d in dirs] for label, dirs in runs.items()}
    rows = summarize(results)
    assert rows[1].ci95 == pytest.approx(0.0496828, abs=1e-6)
    assert rows[1].se == pytest.approx(0.02 / math.sqrt(3))


def test_caveats_name_unfinished_runs_and_mismatched_evaluations(tmp_path):
    runs = {
        "a": [make_run(tmp_path / "a", "countdown-tiny-grpo", evals={0: (0.05, 0.01), 2: (0.1, 0.02)},
                       finished=False)],
        "b": [make_run(tmp_path / "b", "countdown-tiny-cispo", evals={0: (0.05, 0.01), 3: (0.1, 0.02)},
                       overrides=["eval_k=8"])],
        "c": [make_run(tmp_path / "c", "countdown-tiny-bon", evals={0: (0.05, 0.01), 2: (0.1, 0.02)},
                       budget=10_000)],
    }
    text = write_report(runs, tmp_path / "out").read_text()
    caveats = text.split("## Caveats")[1]
    assert "`eval_k` differs between runs" in caveats
    assert "a: seed 0: unfinished (last evaluation at step 2 of 3)" in caveats
    assert "c: seed 0: stopped at 2 steps, under its budget of 10,000" in caveats
    assert "different generated-token budgets" in text


def test_bad_run_folders_are_refused(tmp_path):
    with pytest.raises(UsageError, match="no metrics.jsonl"):
        read_run(tmp_path)
    MetricsLogger(tmp_path / "empty").close()
    with pytest.raises(UsageError, match="no evaluation yet"):
        read_run(tmp_path / "empty")
    with pytest.raises(UsageError):
        write_report({}, tmp_path / "out")
