"""metrics.jsonl with resume truncation, compute counters and budgets, progress lines."""

import importlib.util
import io
import json

import pytest

from treedistill.errors import UsageError
from treedistill.metrics import ComputeCounters, MetricsLogger, Progress, read_metrics


def test_resumed_file_equals_an_uninterrupted_one(tmp_path):
    def run(run_dir, steps, resume_step=None):
        with MetricsLogger(run_dir, resume_step=resume_step) as logger:
            for step in steps:
                logger.log(step, {"loss": 1.0 / step, "reward_mean": step * 0.1})

    run(tmp_path / "straight", range(1, 7))
    interrupted = tmp_path / "interrupted"
    run(interrupted, range(1, 6))  # checkpoint after step 3, killed after logging step 5 ...
    with open(interrupted / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss"')  # ... in the middle of writing step 6
    run(interrupted, range(4, 7), resume_step=3)
    assert (interrupted / "metrics.jsonl").read_text() == (tmp_path / "straight" / "metrics.jsonl").read_text()
    assert [r["step"] for r in read_metrics(interrupted)] == [1, 2, 3, 4, 5, 6]


def test_lines_are_flushed_at_once_and_json_safe(tmp_path):
    torch = pytest.importorskip("torch")
    logger = MetricsLogger(tmp_path)
    logger.log(1, {"loss": torch.tensor(0.5), "kl": float("nan"), "grad_norm": float("inf"), "note": "x"})
    # readable before close: a SIGKILL right after `log` loses nothing
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {
        "step": 1, "loss": 0.5, "kl": None, "grad_norm": None, "note": "x"}
    logger.close()
    MetricsLogger(tmp_path).close()  # a fresh (not resumed) run starts a new file
    assert (tmp_path / "metrics.jsonl").read_text() == ""


@pytest.mark.parametrize("backend,package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_optional_backends_fail_clearly_when_missing(tmp_path, backend, package):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed")
    with pytest.raises(UsageError, match=f"needs the {package} package: pip install {package}"):
        MetricsLogger(tmp_path, backends=("jsonl", backend))
    with pytest.raises(UsageError, match="unknown log backend 'mlflow'"):
        MetricsLogger(tmp_path, backends=("mlflow",))


def test_compute_counters_hand_values_and_budgets():
    counters = ComputeCounters(params=1_000_000)
    # rollout: 300 generated + 200 recomputed prompt + 50 scored = 550 tokens x 2 x 1e6 = 1.1e9 FLOPs
    # (100 cached prompt tokens cost nothing)
    counters.add_rollout(generated_tokens=300, prompt_tokens=200, cached_prompt_tokens=100,
                         scored_tokens=50, forward_calls=7)
    # learning: 400 trained tokens x 6e6 + 400 no-grad tokens x 2e6 = 2.4e9 + 0.8e9 = 3.2e9 FLOPs
    counters.add_learning(train_tokens=400, inference_tokens=400, forward_calls=3)
    d = counters.as_dict()
    assert (d["rollout_flops"], d["learn_flops"], d["total_flops"]) == (1.1e9, 3.2e9, 4.3e9)
    assert (d["rollout_generated_tokens"], d["rollout_forward_calls"], d["learn_forward_calls"]) == (300, 7, 3)
    assert counters.budget_exhausted(generated_tokens=301, flops=5e9) is None
    assert "generated-token budget" in counters.budget_exhausted(generated_tokens=300)
    assert "FLOP budget" in counters.budget_exhausted(flops=4.3e9)
    restored = ComputeCounters()
    restored.load_state_dict(counters.state_dict())
    assert restored == counters


def test_progress_writes_plain_lines_with_eta_off_a_terminal():
    stream = io.StringIO()
    progress = Progress(10, initial=2, desc="train", stream=stream)
    progress.update(1, reward=0.25, step_tokens=96)
    progress.close()
    line = stream.getvalue().strip()
    assert line.startswith("train 3/10 elapsed ") and " eta " in line and line.endswith("reward=0.25 step_tokens=96")
