"""Pretraining of the tiny model: data, masks, schedule, a short run that learns, and the shipped checkpoint."""

import json
import math

import pytest

torch = pytest.importorskip("torch")

from treedistill.envs import countdown  # noqa: E402
from treedistill.pretrain import (  # noqa: E402
    Example,
    PretrainConfig,
    TraceSource,
    _lr_factor,
    lm_loss,
    pad_examples,
    pretrain,
    save_model_folder,
)

# A model small enough that 30 steps take a few seconds on one core.
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1}


def small_config(**overrides) -> PretrainConfig:
    base = dict(steps=30, batch=16, warmup=5, lr=3e-3, solver_problems=300, value_steps=10,
                value_batch=16, model=SMALL, ema=0.0)  # the last step's weights: a short run's average is ~init
    base.update(overrides)
    return PretrainConfig(**base)


@pytest.mark.parametrize("step_format", countdown.STEP_FORMATS)
def test_traces_are_legal_and_reach_their_targets(step_format):
    env = countdown.CountdownEnv()
    source = TraceSource(seed=1, solver_share=0.3, problem_seed=5, solver_problems=200, exclude=[],
                         step_format=step_format)
    for _ in range(200):
        problem, completion = source.lm_trace()
        score = env.score(problem, completion)
        # Random play: the target is the reached value; solver: the trace reaches the target.
        assert score.well_formed and score.sparse == 1.0, (problem, completion)


def test_value_traces_have_generator_targets_and_spread_rewards():
    env = countdown.CountdownEnv()
    source = TraceSource(seed=2, solver_share=0.05, problem_seed=5, solver_problems=200, exclude=[])
    pool_keys = {countdown.key(p) for p in source.pool}
    rewards = []
    for _ in range(200):
        problem, completion = source.value_trace()
        assert countdown.key(problem) in pool_keys
        rewards.append(env.score(problem, completion).dense)
    assert min(rewards) < 0 < max(rewards) and max(rewards) == 1.0


def test_miss_traces_are_legal_and_aim_at_generator_targets():
    env = countdown.CountdownEnv()
    source = TraceSource(seed=4, solver_share=0.0, miss_share=1.0, problem_seed=5, solver_problems=200, exclude=[])
    pool_keys = {countdown.key(p) for p in source.pool}
    hits = 0
    for _ in range(200):
        problem, completion = source.lm_trace()
        score = env.score(problem, completion)
        assert score.well_formed and countdown.key(problem) in pool_keys, (problem, completion)
        hits += score.sparse
    # Random play reaches a least-frequent generator target well under 5% of the time.
    assert hits < 20


def test_trace_shares_are_checked():
    with pytest.raises(ValueError, match="miss_share"):
        TraceSource(seed=0, solver_share=0.5, miss_share=0.6, problem_seed=5, solver_problems=50, exclude=[])


def test_excluded_problems_are_never_trained_on():
    # Exclude every problem whose numbers contain a 1, with every value a full reduction can reach
    # (so every generator target too): no trace may then show a 1, although 27% of uniform draws
    # of four numbers in 1..13 hold one (1 - (12/13)^4).
    import itertools

    env = countdown.CountdownEnv()
    exclude = [{"numbers": list(ms), "target": value}
               for ms in itertools.combinations_with_replacement(range(1, 14), 4) if 1 in ms
               for value in countdown.reduction_distribution(ms)]
    source = TraceSource(seed=3, solver_share=0.5, problem_seed=7, solver_problems=300, exclude=exclude)
    assert source.pool and all(1 not in p["numbers"] for p in source.pool)
    for _ in range(300):
        problem, completion = source.lm_trace()
        assert 1 not in problem["numbers"]
        assert env.score(problem, completion).sparse == 1.0


def test_pad_examples_masks_by_hand():
    # prompt (1, 2, 3), completion (4, 5): tokens 4 and 5 are predicted (positions 3, 4 are
    # targets); the value is fitted from the last prompt token (position 2) to the end.
    batch = pad_examples([Example((1, 2, 3), (4, 5), 0.5), Example((1, 2), (7,), -1.0)], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [1, 2, 7, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["target_mask"].int().tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0]]
    assert batch["value_mask"].int().tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert batch["rewards"].tolist() == [0.5, -1.0]


def test_lm_loss_by_hand():
    examples = [Example((1, 2, 3), (4, 9, 5, 6), 0.5), Example((1, 2), (7,), -1.0)]

    class Uniform(torch.nn.Module):  # logits 0 everywhere except for token 5 at one position
        def forward(self, input_ids):
            logits = torch.zeros(*input_ids.shape, 10)
            logits[0, 4, 5] = math.log(9.0)  # p(5) = 9 / 18 = 1/2 where 5 is the target
            return type("Out", (), {"logits": logits})()

    # targets 4, 9, 5, 6 (row 0) and 7 (row 1): CE log 10 except log 2 for token 5, mean over the 5
    batch = pad_examples(examples, pad_id=0)
    assert lm_loss(Uniform(), batch).item() == pytest.approx((4 * math.log(10) + math.log(2)) / 5, rel=1e-6)


def test_schedule_by_hand():
    cfg = PretrainConfig(steps=110, warmup=10, min_lr_ratio=0.1)
    assert _lr_factor(0, cfg) == pytest.approx(0.1)  # (0+1)/10
    assert _lr_factor(9, cfg) == pytest.approx(1.0)
    # Half-way through the decay (step 60 of 10..110): 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55.
    assert _lr_factor(60, cfg) == pytest.approx(0.55)
    assert _lr_factor(110, cfg) == pytest.approx(0.1)
    assert all(0 < _lr_factor(s, cfg) <= 1 for s in range(200))


def test_short_run_lowers_the_loss_and_fits_the_value_head(tmp_path):
    result = pretrain(small_config())
    assert result.steps_done == 30 and all(math.isfinite(x) for x in result.losses)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    # A fresh model over 264 tokens starts near ln(264) = 5.58.
    assert first > 4.5 and last < first - 1.0, result.losses
    assert len(result.value_losses) == 10
    assert sum(result.value_losses[-3:]) / 3 < sum(result.value_losses[:3]) / 3

    save_model_folder(result, tmp_path, {"note": "test"})
    record = json.loads((tmp_path / "pretrain.json").read_text())
    assert record["steps_done"] == 30 and record["note"] == "test"
    assert record["config"]["solver_share"] == small_config().solver_share

    from treedistill.models.load import load_policy

    policy = load_policy(tmp_path, device="cpu")
    assert policy.compact_prompt
    x = torch.tensor([[257, 117, 258, 259, 49, 43, 50]])
    with torch.no_grad():
        assert torch.allclose(policy.model(x).logits, result.model(x).logits)
        hidden = torch.randn(3, 64)
        assert torch.equal(policy.value_head(hidden), result.value_head(hidden))


def test_value_fit_leaves_the_language_model_unchanged():
    a = pretrain(small_config(steps=3, value_steps=3))
    b = pretrain(small_config(steps=3, value_fit=False))
    assert a.losses == b.losses and b.value_losses == []
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.value_head.parameters(), b.value_head.parameters()))


def test_ema_keeps_the_moving_average_of_the_weights(monkeypatch):
    # The same run without and with the average: identical training, and the averaged result is
    # decay-weighted over the weights after each step (first step: copied), recomputed here by hand.
    import treedistill.pretrain as module

    decay = 0.5
    snapshots, holder = [], {}
    build = module.build_model

    def keep(*args, **kwargs):
        holder["model"] = build(*args, **kwargs)
        return holder["model"]

    monkeypatch.setattr(module, "build_model", keep)
    plain = pretrain(small_config(steps=4, value_fit=False),
                     progress=lambda phase, step, metrics: snapshots.append(
                         [p.detach().clone() for p in holder["model"].parameters()]))
    averaged = pretrain(small_config(steps=4, value_fit=False, ema=decay))
    assert averaged.losses == plain.losses
    expected = snapshots[0]
    for later in snapshots[1:]:
        expected = [decay * e + (1 - decay) * p for e, p in zip(expected, later)]
    for got, want in zip(averaged.model.parameters(), expected):
        assert torch.allclose(got, want, atol=1e-6)
    assert not all(torch.equal(got, last) for got, last in zip(averaged.model.parameters(),
                                                               plain.model.parameters()))
    with pytest.raises(ValueError, match="ema must be in"):
        pretrain(small_config(steps=1, ema=1.0))


def test_shipped_checkpoint_meets_the_format_target():
    from treedistill.datasets import load_split
    from treedistill.engine import make_engine
    from treedistill.envs import get_env
    from treedistill.evaluate import evaluate
    from treedistill.models.load import load_policy

    policy = load_policy("tiny", device="cpu")
    assert 500_000 < policy.num_parameters < 10_000_000 and policy.compact_prompt
    test = load_split("countdown", "test")[:20]
    result = evaluate(make_engine(policy, "hf"), policy, get_env("countdown"), test, k=4,
                      temperature=0.2, max_new_tokens=128, seed=0)
    assert result.samples == 80
    assert result.format_rate >= 0.9, result


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--solver-share", "1.5"], "--solver-share must be in [0, 1]"),
    (["--miss-share", "0.99"], "--miss-share must be in [0, 1 - solver share]"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--minutes", "-1"], "--minutes must be > 0"),
    (["--eval-k", "-1"], "--eval-k must be >= 0"),
    (["--ema", "1"], "--ema must be in [0, 1)"),
    (["--min-lr-ratio", "-0.1"], "--min-lr-ratio must be in [0, 1]"),
    (["--step-format", "tree"], "unknown --step-format 'tree': choose one of numbers, substitute"),
    (["--step-format", "expressions"], "unknown --step-format 'expressions': choose one of numbers, substitute"),
    (["--device", "tpu"], "unknown --device 'tpu': choose one of cpu, cuda"),
])
def test_cli_refuses_bad_input(flags, message, capsys, tmp_path):
    from treedistill.cli import main

    assert main(["pretrain", "--out", str(tmp_path / "out"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--answer-weight", "--bucket", "--processes", "--micro"])
def test_removed_flags_are_unknown(flag, capsys, tmp_path):
    # Measured and removed (docs/log.md): argparse's own error, before anything runs.
    from treedistill.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--out", str(tmp_path / "out"), flag, "2"])
    assert exit_.value.code == 2
    assert f"unrecognized arguments: {flag} 2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_output_folder_of_other_files(capsys, tmp_path):
    from treedistill.cli import main

    (tmp_path / "notes.txt").write_text("mine")
    assert main(["pretrain", "--out", str(tmp_path)]) == 2
    assert "holds files that treedistill did not write" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_refuses_cuda_without_a_device(capsys, tmp_path):
    from treedistill.cli import main

    assert main(["pretrain", "--out", str(tmp_path / "out"), "--device", "cuda"]) == 2
    assert "--device cuda: this machine has no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
def test_pretrain_on_cuda_lowers_the_loss_and_keeps_both_parts_there():
    result = pretrain(small_config(device="cuda", ema=0.9))
    assert next(result.model.parameters()).device.type == "cuda"
    assert next(result.value_head.parameters()).device.type == "cuda"
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 1.0
    assert result.value_losses and all(math.isfinite(v) for v in result.value_losses)


def test_pretrain_sweep_writes_one_record_per_run(tmp_path):
    """bench/pretrain_sweep.py as a dry run on the CPU: every (recipe, seed) gets its record file."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "pretrain_sweep.py"
    done = subprocess.run([sys.executable, str(script), "--recipes", "defaults,ema", "--seeds", "0", "--workers", "2",
                           "--device", "cpu", "--steps", "3", "--problems", "2", "--k", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(summary) == ["defaults", "ema"] and summary["ema"]["seeds"] == [0]
    record = json.loads((tmp_path / "ema_s0.json").read_text())
    assert record["overrides"] == {"step_format": "numbers", "miss_share": 0.0, "min_lr_ratio": 0.0, "ema": 0.995,
                                   "steps": 3}
    assert record["problems"] == 2 and record["k"] == 1 and 0.0 <= record["well_formed"] <= 1.0
    assert math.isfinite(record["final_loss"])
