"""The equal-compute comparison is fair to every method: schedules in fractions of the budget,
evaluation points that change no step of training, FLOPs charged as they are spent, GRPO and CISPO
as distinct runs (several minibatch updates per rollout batch), and paired statistics."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from treedistill import checkpoint
from treedistill.compare import plan_runs
from treedistill.config import load_config
from treedistill.metrics import ComputeCounters
from treedistill.report import bootstrap_interval
from treedistill.runs import budget_progress, passed_eval_point
from treedistill.train import train

# Sizes that make a step take well under a second on the tiny model.
SMALL = [
    "train_size=64", "test_size=8", "eval_problems=4", "eval_k=2", "eval_samples_logged=1",
    "max_new_tokens=24", "problems_per_step=2", "group_size=2", "bon_n=3", "minibatch_size=2",
    "search.simulations=4", "search.parallel=2", "search.problems_at_once=2", "search.k_children=2",
    "search.step_max_tokens=8", "search.max_depth=3", "checkpoint_every=0", "eval_every=0",
]
TIMING = ("rollout_s", "learn_s", "wall_s", "eval_s")


def _records(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in r.items() if k not in TIMING} for r in map(json.loads, lines) if r["kind"] == kind]


# ---- 1. schedules in the unit of the comparison


def test_budget_schedule_by_hand():
    cfg = load_config(overrides=["budget_generated_tokens=1000", "warmup_fraction=0.1", "lr_schedule=linear-decay",
                                 "warmup_steps=5"])
    # warm-up: progress / 0.1; then (1 - progress) / 0.9; warmup_steps does not apply with a budget
    assert [cfg.lr_multiplier(0, p) for p in (0.0, 0.05, 0.1, 0.55, 1.0, 1.3)] == pytest.approx(
        [0.0, 0.5, 1.0, 0.5, 0.0, 0.0])
    constant = load_config(overrides=["budget_flops=1e12", "warmup_fraction=0.2", "lr_schedule=constant"])
    assert [constant.lr_multiplier(7, p) for p in (0.1, 0.2, 0.9)] == pytest.approx([0.5, 1.0, 1.0])
    # the update's progress: the midpoint of the budget shares before and after its rollout
    assert budget_progress(cfg, (100, 0.0), (300, 0.0)) == pytest.approx(0.2)
    assert budget_progress(constant, (0, 1e11), (0, 3e11)) == pytest.approx(0.2)
    assert budget_progress(load_config(), (100, 1.0), (300, 2.0)) is None  # step-limited: step schedule


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["countdown-tiny-grpo", "countdown-tiny-mcts"])
def test_warmup_is_a_fraction_of_the_budget_whatever_a_step_costs(tmp_path, preset):
    # warm-up over half the budget: each step's learning rate follows the tokens it had spent, not
    # the step count (the presets' warmup_steps=5 would give 0.2, 0.4, ... whatever the budget)
    cfg = load_config(preset, overrides=[*SMALL, "budget_generated_tokens=600", "warmup_fraction=0.5",
                                         "steps=1000", "eval_before_rl=false"])
    train(cfg, tmp_path / "run", progress=False)
    trains = _records(tmp_path / "run", "train")
    before = 0
    for r in trains:
        after = r["rollout_generated_tokens"]
        progress = (before + after) / 2 / 600
        assert r["lr"] == pytest.approx(cfg.lr * min(1.0, progress / 0.5)), r["step"]
        before = after
    assert trains[-1]["rollout_generated_tokens"] >= 600 and len(trains) >= 3


# ---- 2. evaluation never changes training


def test_evaluation_points_are_taken_when_passed():
    cfg = load_config(overrides=["eval_at_tokens=100,250"])
    assert [passed_eval_point(cfg, (a, 0.0), (b, 0.0))
            for a, b in [(0, 99), (0, 100), (100, 180), (180, 400), (250, 900)]] == [False, True, False, True, False]
    # points in FLOPs, passed by the step that takes the FLOPs from before to after
    flops = load_config(overrides=["eval_at_flops=1e9"])
    assert [passed_eval_point(flops, (0, a), (10, b)) for a, b in [(0, 9e8), (9e8, 1e9), (1e9, 5e9)]] == [
        False, True, False]
    specs = plan_runs({"g": "countdown-tiny-grpo"}, seeds=[0], budget=900, out_dir="/tmp/unused", evaluations=3)
    run = specs[1].config()
    assert (run.eval_at_tokens, run.budget_generated_tokens, run.eval_before_rl) == ((300, 600), 900, False)
    assert specs[0].pre_rl and specs[0].config().eval_before_rl
    two = plan_runs({"g": "countdown-tiny-grpo"}, seeds=[0], budget=900, out_dir="/tmp/unused", evaluations=2)
    assert two[1].config().eval_at_tokens == (450,)  # one point: `--set eval_at_tokens=450` is a list of one
    assert load_config(overrides=["eval_at_tokens=5000"]).eval_at_tokens == (5000,)


@pytest.mark.slow
def test_a_run_evaluated_at_several_points_trains_as_one_evaluated_at_the_end(tmp_path):
    base = [*SMALL, "budget_generated_tokens=900", "steps=1000", "checkpoint_every=3"]
    train(load_config("countdown-tiny-grpo", overrides=base), tmp_path / "end", progress=False)
    train(load_config("countdown-tiny-grpo", overrides=[*base, "eval_at_tokens=150,300,450"]),
          tmp_path / "points", progress=False)
    end, points = _records(tmp_path / "end", "train"), _records(tmp_path / "points", "train")
    assert end == points and len(end) >= 6
    assert [r["step"] for r in _records(tmp_path / "end", "eval")] == [0, end[-1]["step"]]
    evals = [r["step"] for r in _records(tmp_path / "points", "eval")]
    assert len(evals) == 5 and evals[0] == 0 and evals[-1] == end[-1]["step"]  # before RL, 3 points, the end
    weights = [checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path / d))["model"] for d in ("end", "points")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# ---- 3. FLOPs as they are spent


def test_flop_estimate_by_hand():
    c = ComputeCounters(params=1000, head_params=100)
    c.add_rollout(generated_tokens=50, prompt_tokens=20, scored_tokens=30, cached_prompt_tokens=999, values=7)
    c.add_learning(train_tokens=40, inference_tokens=80, head_train_tokens=40, head_inference_tokens=40)
    # rollout: 2 x 1000 x (50 + 20 + 30) + 2 x 100 x 7 = 200,000 + 1,400
    assert c.rollout_flops == 201_400
    # learning: 6 x 1000 x 40 + 2 x 1000 x 80 + 6 x 100 x 40 + 2 x 100 x 40 = 240,000 + 160,000 + 24,000 + 8,000
    assert c.learn_flops == 432_000
    old = ComputeCounters(params=1000)
    old.load_state_dict({"params": 1000, "rollout_generated_tokens": 5})  # a checkpoint older than the head counters
    assert (old.head_params, old.rollout_values, old.rollout_generated_tokens) == (0, 0, 5)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["countdown-tiny-grpo", "countdown-tiny-mcts", "countdown-tiny-bon",
                                    "countdown-tiny-ppo"])
def test_each_method_is_charged_the_parameters_that_ran(tmp_path, preset):
    cfg = load_config(preset, overrides=[*SMALL, "steps=1", "eval_before_rl=false"])
    train(cfg, tmp_path / "run", progress=False)
    r = _records(tmp_path / "run", "train")[-1]
    lm, head = r["params"], r["head_params"]
    tokens = r["rollout_generated_tokens"] + r["rollout_prompt_tokens"] + r["rollout_scored_tokens"]
    if preset == "countdown-tiny-grpo":  # no value head: no head FLOPs anywhere
        assert head == 0 and r["rollout_values"] == 0 and r["learn_head_inference_tokens"] == 0
    else:
        assert head > 0
        # the head ran on every learner position (values pass + trained pass), never on rollout tokens
        assert r["learn_head_train_tokens"] == r["learn_train_tokens"] > 0
        assert r["learn_head_inference_tokens"] > 0
        # the search reads a value at its non-terminal leaves only; sampling methods read none
        assert (r["rollout_values"] > 0) == (preset == "countdown-tiny-mcts")
        assert r["rollout_values"] < tokens
        assert r["rollout_flops"] < 2 * (lm + head) * tokens  # the old charge: head params on every token


@pytest.mark.slow
def test_each_budget_stops_the_run_at_the_first_step_that_crosses_it(tmp_path, capsys):
    from treedistill.cli import main

    # generated tokens: a step of 2 problems x 2 samples spends <= 4 x 24 = 96 tokens; the budget of 150 is
    # crossed by the second or a later step, and the step before it was still under
    cfg = load_config("countdown-tiny-grpo", overrides=[*SMALL, "steps=1000", "budget_generated_tokens=150",
                                                       "eval_before_rl=false"])
    train(cfg, tmp_path / "tokens", progress=False)
    spent = [r["rollout_generated_tokens"] for r in _records(tmp_path / "tokens", "train")]
    assert len(spent) >= 2 and spent[-2] < 150 <= spent[-1]
    # FLOPs, through the CLI: a budget of 2.5 first steps' rollout + learning FLOPs
    budget = 2.5 * _records(tmp_path / "tokens", "train")[0]["total_flops"]
    flags = [flag for item in [*SMALL, "eval_before_rl=false"] for flag in ("--set", item)]
    assert main(["train", "--preset", "countdown-tiny-grpo", *flags, "--steps", "1000", "--budget-flops",
                 f"{budget:.6e}", "--run-dir", str(tmp_path / "flops"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "FLOP budget reached" in summary["stop_reason"]
    spent = [r["total_flops"] for r in _records(tmp_path / "flops", "train")]
    assert len(spent) >= 2 and spent[-2] < budget <= spent[-1] and summary["steps"] == len(spent)
    assert [r["step"] for r in _records(tmp_path / "flops", "eval")] == [len(spent)]  # the end is evaluated


class _ScriptedEngine:
    """Sample j of every prefix is SCRIPT[j % 2] then eos, whatever the weights: each call counts its
    prefixes as prefilled once and the returned tokens as generated, as an engine without a cache does."""

    SCRIPT = ("<answer>1+2</answer>", "<step>9-3=6 (6)</step><answer>9-3</answer>")

    def __init__(self, policy):
        from treedistill.engine.base import Counters

        eos = policy.eos_token_ids[0]
        self.lines = [tuple(policy.tokenizer.encode(t, add_special_tokens=False)) + (eos,) for t in self.SCRIPT]
        self.counters, self.calls, self.prefixes = Counters(), [], []

    def clear_cache(self):
        pass

    def sample(self, prefixes, n=1, *, max_new_tokens, temperature=1.0, top_p=1.0, stop=(), seed=None):
        from treedistill.engine.base import FINISH_EOS, Sample

        assert all(len(line) <= max_new_tokens for line in self.lines)
        self.calls.append((n, temperature, [len(p) for p in prefixes]))
        self.prefixes.append([tuple(p) for p in prefixes])
        self.counters.prompt_tokens += sum(len(p) for p in prefixes)
        out = [[Sample(self.lines[j % 2], (-0.5,) * len(self.lines[j % 2]), (-0.5,) * len(self.lines[j % 2]),
                       FINISH_EOS) for j in range(n)] for _ in prefixes]
        self.counters.generated_tokens += sum(len(s.tokens) for row in out for s in row)
        return out


@pytest.mark.slow
def test_flops_are_charged_for_the_tokens_a_scripted_engine_fixed(tmp_path, monkeypatch):
    import treedistill.collect as collect_module
    from treedistill.models.tiny import build_model

    engines = []
    monkeypatch.setattr(collect_module, "make_engine", lambda policy, name: engines.append(_ScriptedEngine(policy))
                        or engines[-1])
    cfg = load_config("countdown-tiny-grpo", overrides=[*SMALL, "steps=1", "eval_problems=2", "max_new_tokens=40",
                                                         "pack_rows=false"])
    train(cfg, tmp_path / "run", progress=False)
    (r,) = _records(tmp_path / "run", "train")
    (engine,) = engines
    la, lb = map(len, engine.lines)
    # the engine was called for the step-0 evaluation (2 problems x eval_k 2 at T = 0.2) and its logged sample,
    # the rollout (2 problems x group_size 2 at T = 1: samples a and b each), the final evaluation and its
    # logged sample: only the rollout is charged to the run's rollout counters
    assert [(n, t) for n, t, _ in engine.calls] == [(2, 0.2), (1, 0.2), (2, 1.0), (2, 0.2), (1, 0.2)]
    p1, p2 = engine.calls[2][2]
    assert (r["rollout_generated_tokens"], r["rollout_prompt_tokens"]) == (2 * (la + lb), p1 + p2)
    assert r["rollout_scored_tokens"] == r["rollout_values"] == 0
    # the learner: 4 rows (prompt + completion), each trained once (1 epoch, each row in one minibatch);
    # GRPO has no value head and no KL term: no no-grad pass
    rows = (p1 + la) + (p1 + lb) + (p2 + la) + (p2 + lb)
    assert (r["learn_train_tokens"], r["learn_inference_tokens"]) == (rows, 0)
    lm = sum(p.numel() for p in build_model(0).parameters())  # the tiny model's parameters
    assert r["params"] == lm
    # 2 x params per rollout token, 6 x params per trained token
    assert r["rollout_flops"] == 2 * lm * (2 * (la + lb) + p1 + p2)
    assert r["learn_flops"] == 6 * lm * rows
    assert r["total_flops"] == r["rollout_flops"] + r["learn_flops"]

    # packed rows (the tiny presets' setting): the learner computes each distinct prefix of a
    # micro-batch's rows once (here a micro-batch is one problem's group of 2: its prompt, and a shared
    # first completion token), and is charged for exactly those positions; the rollout's is unchanged
    assert cfg.micro_batch_rows == cfg.group_size == 2
    train(dataclasses.replace(cfg, pack_rows=True), tmp_path / "packed", progress=False)
    (packed,) = _records(tmp_path / "packed", "train")
    groups = [[prompt + line for line in engines[1].lines] for prompt in engines[1].prefixes[2]]
    distinct = sum(len({row[:i] for row in group for i in range(1, len(row) + 1)}) for group in groups)
    assert distinct < rows and packed["learn_train_tokens"] == distinct
    assert packed["learn_flops"] == 6 * lm * distinct and packed["rollout_flops"] == r["rollout_flops"]


# ---- 4. GRPO and CISPO as their users run them


@pytest.mark.slow
def test_grpo_and_cispo_take_off_policy_minibatch_updates_and_differ(tmp_path):
    # dense reward and 100-token completions: every group has non-zero advantages, so every update moves
    # the policy; a learning rate high enough that ratios leave PPO's [0.8, 1.2] within two steps
    common = [*SMALL, "steps=2", "eval_before_rl=false", "problems_per_step=4", "reward=dense",
              "max_new_tokens=100", "lr=3e-3"]

    def final_weights(preset, minibatch_size):
        cfg = load_config(preset, overrides=[*common, f"minibatch_size={minibatch_size}"])
        run = tmp_path / f"{preset}-{minibatch_size}"
        train(cfg, run, progress=False)
        trains = _records(run, "train")
        assert [r["updates"] for r in trains] == [cfg.updates_per_step] * 2
        return trains, checkpoint.load_checkpoint(checkpoint.latest_checkpoint(run))["model"]

    def distance(a, b):
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    # one update per rollout batch: the ratio is 1 (fresh samples), and the two losses have the same gradient
    (g1, grpo_one), (c1, cispo_one) = final_weights("countdown-tiny-grpo", 0), final_weights("countdown-tiny-cispo", 0)
    assert max(r["ratio_max"] for r in g1 + c1) < 1.0001
    # four updates: the later minibatches are off-policy, PPO's clip drops tokens that CISPO keeps
    (g4, grpo_four), (_, cispo_four) = final_weights("countdown-tiny-grpo", 2), final_weights("countdown-tiny-cispo", 2)
    assert max(r["ratio_max"] for r in g4) > 1.2 and max(r["clip_frac"] for r in g4) > 0
    assert distance(grpo_four, cispo_four) > 100 * max(distance(grpo_one, cispo_one), 1e-7)


def test_every_tiny_preset_updates_four_times_per_rollout_batch():
    for preset in ("countdown-tiny-mcts", "countdown-tiny-bon", "countdown-tiny-grpo", "countdown-tiny-cispo",
                   "countdown-tiny-ppo"):
        cfg = load_config(preset)
        assert (cfg.epochs, cfg.updates_per_step) == (1, 4), preset


# ---- 5. statistics that compare methods


def test_paired_bootstrap_sees_a_shift_that_problem_difficulty_hides():
    rng = np.random.default_rng(1)
    difficulty = rng.uniform(0, 1, size=400)  # problems differ a lot
    a = np.clip(difficulty[None, :] + 0.02, 0, 1).repeat(3, axis=0)  # [3 seeds, 400 problems]: 2 points better
    b = difficulty[None, :].repeat(3, axis=0)
    diff, low, high = bootstrap_interval(a, b)
    assert diff == pytest.approx(float((a - b).mean())) and 0 < low <= diff <= high  # paired: significant
    # unpaired, the same shift is lost in the problems' spread
    se = math.hypot(a[0].std(ddof=1), b[0].std(ddof=1)) / math.sqrt(400)
    assert diff < 1.96 * se
    # one row alone: an interval around its mean
    mean, lo, hi = bootstrap_interval(b)
    assert lo < mean < hi and mean == pytest.approx(float(b.mean()))
    with pytest.raises(ValueError, match="same problems"):
        bootstrap_interval(a, b[:, :10])
