"""Comparison reports from run folders: Student-t maths worked by hand, tables and plots from
synthetic run folders written in the real format (config.yaml by to_yaml, metrics.jsonl by
MetricsLogger with ComputeCounters)."""

import json
import math

import numpy as np
import pytest

from treedistill.config import load_config, to_yaml
from treedistill.errors import UsageError
from treedistill.metrics import ComputeCounters, MetricsLogger
from treedistill.report import (
    PRE_RL,
    REFERENCE,
    bootstrap_interval,
    confidence_interval,
    paired_differences,
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
             budget=3000, finished=True, eval_extra=None, train_extra=None):
    """A run folder as `train` writes it. evals: {step: (accuracy, stderr)}; a train line per step
    1..max(evals) with counters growing by tokens_per_step generated tokens; train_extra(step): more fields."""
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
                                  **(train_extra(step) if train_extra else {}),
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
                                                   "value_mse_const": 0.03, "value_auc_reachable": 0.75})],
    }
    path = write_report(runs, tmp_path / "out", reference=REFERENCE, title="Test comparison")
    text = path.read_text()
    # the value heads at the final evaluation: mcts has one, GRPO none
    assert "## Value head" in text and "| MCTS distillation | 1 | +0.250 | 0.0200 | 0.0300 | 0.750 |" in text
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
    assert "| 0 | - | - | - | - | 0 | - | - | 3.1 |" in text
    assert "| 3 | 0m06s | 0m11s | - |" in text and "| 2 | 0m04s | 0m09s | 11.3 |" in text
    # FLOPs: mcts at step 2 = rollout 2 x 0.9M x (3,000 + 1,500) + learning (6 x 3,000 + 2 x 6,000) x 0.9M
    assert f"{2 * 900_000 * 4_500:.3g}" in text and f"{900_000 * (6 * 3_000 + 2 * 6_000):.3g}" in text
    # ... per generated token (3,000): rollout 2.7e6, learning 9e6
    assert f"| {2 * 900_000 * 4_500 / 3_000:.3g} / {900_000 * (6 * 3_000 + 2 * 6_000) / 3_000:.3g} |" in text
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


def test_report_says_what_the_rollouts_learn(tmp_path):
    tree = {1: {"learned_token_share": 0.5, "tree_lines_per_1k_tokens": 10.0},
            2: {"learned_token_share": 1.0, "tree_lines_per_1k_tokens": 20.0}}
    runs = {
        "GRPO": [make_run(tmp_path / "grpo", "countdown-tiny-grpo", evals={0: (0.05, 0.01), 2: (0.10, 0.015)},
                          train_extra=lambda step: {"learned_token_share": 1.0})],
        "mcts-tree": [make_run(tmp_path / f"tree{seed}", "countdown-tiny-mcts-tree", seed=seed,
                               evals={0: (0.05, 0.01), 2: (0.10, 0.015)},
                               train_extra=lambda step: {k: v * (1 if step == 1 else 0.9) for k, v in tree[step].items()})
                      for seed in (0, 1)],
    }
    assert read_run(runs["mcts-tree"][0]).learned_token_share == pytest.approx((0.5 + 0.9) / 2)
    text = write_report(runs, tmp_path / "out", reference=None, title="t").read_text()
    # equal tokens per step: the run's share is the mean of its steps' (0.5 and 0.9), lines (10 and 18)
    assert "| GRPO | 1.000 | - |" in text and "| mcts-tree | 0.700 | 14.0 |" in text


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
    assert "had different budgets" in text


def test_bad_run_folders_are_refused(tmp_path):
    with pytest.raises(UsageError, match="no metrics.jsonl"):
        read_run(tmp_path)
    MetricsLogger(tmp_path / "empty").close()
    with pytest.raises(UsageError, match="no evaluation yet"):
        read_run(tmp_path / "empty")
    with pytest.raises(UsageError):
        write_report({}, tmp_path / "out")


# ---- the two-level bootstrap (seeds, then problems) and the paired differences

def _per_problem_run(path, preset, per_problem, *, seed=0):
    """A finished run whose final evaluation logged `per_problem` (its mean is the eval accuracy)."""
    mean = sum(per_problem) / len(per_problem)
    return make_run(path, preset, seed=seed, evals={0: (0.0, 0.0), 2: (mean, 0.1)},
                    eval_extra={"eval_per_problem": list(per_problem)})


def test_paired_differences_by_hand(tmp_path):
    # Four test problems. pre-RL [0, 0, .5, .5]; A = pre-RL + .5 on every problem (both seeds); B [0, 1, .5, .5]
    # (both seeds). Seeds agree within a row, so only the jointly resampled problems move the replicates:
    # - A - pre-RL = .5 on every problem: every replicate is .5, interval [.5, .5], significant.
    # - B - A = [-.5, +.5, -.5, -.5], estimate -.25. A replicate is -.5 + .25 k, k ~ Binomial(4, 1/4) the
    #   draws of problem 2: P(k = 0) = 81/256 = .316 > .025 -> low = -.5; P(k <= 2) = 243/256 = .949 < .975
    #   <= P(k <= 3) = .996 -> high = -.5 + .75 = +.25. Includes 0: not significant.
    # - B - pre-RL = [0, 1, 0, 0], estimate .25. Replicate k / 4: low = 0 (P(k = 0) = .316), high = 3/4.
    #   The interval touches 0, so it does not exclude it: not significant.
    runs = {
        PRE_RL: [_per_problem_run(tmp_path / "pre", "countdown-tiny-grpo", [0, 0, 0.5, 0.5])],
        "A": [_per_problem_run(tmp_path / "a" / str(s), "countdown-tiny-grpo", [0.5, 0.5, 1, 1], seed=s)
              for s in (0, 1)],
        "B": [_per_problem_run(tmp_path / "b" / str(s), "countdown-tiny-cispo", [0, 1, 0.5, 0.5], seed=s)
              for s in (0, 1)],
    }
    results = {label: [read_run(d) for d in dirs] for label, dirs in runs.items()}
    rows = summarize(results)
    got = [(d["label"], d["versus"], d["difference"], d["ci_low"], d["ci_high"], d["significant"])
           for d in paired_differences(results, rows)]
    assert got == [("A", PRE_RL, pytest.approx(0.5), pytest.approx(0.5), pytest.approx(0.5), True),
                   ("B", "A", pytest.approx(-0.25), -0.5, 0.25, False),
                   ("B", PRE_RL, pytest.approx(0.25), 0.0, 0.75, False)]
    # A's own interval: .5 + .125 k, k ~ Binomial(4, 1/2) the draws of problems 3-4:
    # P(k = 0) = 1/16 > .025 -> low = .5; P(k <= 3) = 15/16 < .975 -> high = 1
    assert (rows[1].label, rows[1].ci_low, rows[1].ci_high) == ("A", 0.5, 1.0)
    # the report prints those intervals, the paired table and the headline from them
    text = write_report(runs, tmp_path / "out", title="Paired").read_text()
    assert "95% CI (bootstrap, seeds and problems)" in text
    assert "| A | 75.00 | [50.00, 100.00] |" in text
    assert "| B | A | -25.00 | [-50.00, +25.00] | no |" in text
    assert "| A | pre-RL | +50.00 | [+50.00, +50.00] | yes |" in text
    assert "| B | pre-RL | +25.00 | [+0.00, +75.00] | no |" in text
    assert "paired 95% CI [-25.00, 50.00] over seeds and problems: not significant" in text


def test_bootstrap_interval_has_width_from_seeds_alone():
    # Three seeds at .2, .5, .8, each the same on all 50 problems: resampling problems changes nothing, so
    # all the width comes from resampling seeds. A replicate is the mean of 3 seeds drawn with
    # replacement: the smallest, .2, has probability 1/27 = .037 > .025 (so does .8): the interval is [.2, .8].
    a = np.repeat([[0.2], [0.5], [0.8]], 50, axis=1)  # [3 seeds, 50 problems]
    estimate, low, high = bootstrap_interval(a)
    assert (estimate, low, high) == (pytest.approx(0.5), pytest.approx(0.2), pytest.approx(0.8))
    # paired against a row whose seeds agree: the same width, shifted
    diff, low, high = bootstrap_interval(a, np.full((2, 50), 0.5))
    assert (diff, low, high) == (pytest.approx(0.0), pytest.approx(-0.3), pytest.approx(0.3))


def test_bootstrap_intervals_cover_the_true_mean_95_percent_of_the_time():
    # y[s, p] = mu + u_s + e_p + noise: seed effects u ~ N(0, .05^2) over 10 seeds, problem effects
    # e ~ N(0, .1^2) over 40 problems shared by the seeds. Var(mean) = .05^2 / 10 + .1^2 / 40 + ... : the
    # seeds carry about half of it, so an interval that forgets to resample them covers ~80% (0.78-0.83 over
    # three simulation seeds), a 50% interval 43-50%, the real one 92-95% (the percentile bootstrap runs a
    # little narrow). 300 draws: the coverage's standard error is sqrt(.95 x .05 / 300) = 1.3 points.
    rng = np.random.default_rng(0)
    mu, seeds, problems, trials = 0.3, 10, 40, 300
    covered = 0
    for t in range(trials):
        y = (mu + rng.normal(0, 0.05, size=(seeds, 1)) + rng.normal(0, 0.1, size=(1, problems))
             + rng.normal(0, 0.05, size=(seeds, problems)))
        _, low, high = bootstrap_interval(y, samples=1000, seed=t)
        covered += low <= mu <= high
    assert 0.88 <= covered / trials <= 0.99, covered / trials  # 0.947 with these seeds


def test_curve_points_share_their_problems_and_bands_stay_within_0_and_100():
    """A curve's last evaluation on more problems than the others is cut to the first ones they all
    covered, and its band is the two-level bootstrap's, clipped to [0, 100] (a t-band over 3 seeds at
    0% fell below 0)."""
    from treedistill.report.plots import _curve_series
    from treedistill.report.runs import CurvePoint, RunResult

    def run(seed, middle, final):
        # evaluated on the first 2 problems at step 1, on 4 at the end; problems 3 and 4 always solved
        curve = (CurvePoint(1, 100, 1e9, sum(middle) / 2, 0.0, tuple(middle)),
                 CurvePoint(2, 200, 2e9, sum(final) / 4, 0.0, tuple(final)))
        return RunResult(run_dir="r", method="grpo", seed=seed, config={}, curve=curve, steps=2,
                         generated_tokens=200, rollout_flops=1e9, learn_flops=1e9, train_s=1.0, wall_s=1.0,
                         finished=True, under_budget=False, final_per_problem=tuple(final))

    runs = [run(0, (0.0, 0.0), (0.0, 0.5, 1.0, 1.0)), run(1, (0.0, 0.0), (0.0, 0.0, 1.0, 1.0)),
            run(2, (0.0, 0.0), (0.5, 0.0, 1.0, 1.0))]
    (series,), problems = _curve_series(runs)
    tokens, flops, accuracy, low, high = series
    assert problems == 2 and tokens == [100, 200] and flops == [1e9, 2e9]
    # the final point on problems 1-2 only: (0.25 + 0 + 0.25) / 3 = 1/6, not the 4-problem mean
    assert accuracy == pytest.approx([0.0, 100 / 6])
    assert low[0] == high[0] == 0.0  # all zero: the band is the point, never below 0
    assert 0.0 <= low[1] < accuracy[1] < high[1] <= 100.0
