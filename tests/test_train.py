"""The training loop: smoke runs of every tiny preset through the CLI (and `--resume auto`), budgets,
refusals before compute, non-finite losses, the data stream, and stale-cache safety."""

import json
import math

import pytest
import torch

from treedistill.checkpoint import list_checkpoints, load_checkpoint
from treedistill.cli import main
from treedistill.config import TrainConfig, list_presets, load_config
from treedistill.learner import apply_update
from treedistill.methods import METHODS
from treedistill.metrics import read_metrics
from treedistill.runs import run_problems, take_problems

# Sizes that make a step take well under a second on the tiny model (the presets' own are minutes).
SMALL = [
    "train_size=64", "test_size=8", "eval_problems=4", "eval_k=2", "eval_samples_logged=2",
    "max_new_tokens=24", "problems_per_step=2", "group_size=2", "bon_n=3",
    "search.simulations=4", "search.parallel=2", "search.problems_at_once=2", "search.k_children=2",
    "search.step_max_tokens=8", "search.max_depth=3",
]
TINY_PRESETS = [name for name in list_presets() if name.startswith("countdown-tiny-")]


def _train(*args, capsys=None):
    flags = [flag for item in SMALL for flag in ("--set", item)]
    code = main(["train", *flags, *args, "--json"])  # the test's own flags come last and win
    out = capsys.readouterr() if capsys is not None else None
    return code, out


def _lines(run_dir, kind):
    return [r for r in read_metrics(run_dir) if r["kind"] == kind]


def _without_wall_clock(record):
    return {k: v for k, v in record.items() if not k.endswith("_s")}


def test_every_method_has_a_tiny_preset():
    assert sorted(TINY_PRESETS) == sorted(f"countdown-tiny-{m}" for m in ("mcts", "mcts-tree", "mcts-mc", "tree-fork",
                                                                        "grpo", "cispo", "bon", "ppo"))
    assert {load_config(preset=name).method for name in TINY_PRESETS} == set(METHODS)


@pytest.mark.slow
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tiny_preset_two_steps_then_resume_auto_continues(preset, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = load_config(preset=preset)
    method = cfg.method
    every_step = ("--set", "checkpoint_every=1")  # a checkpoint after each step: [1, 2] kept
    code, out = _train("--preset", preset, "--steps", "2", *every_step, "--run-dir", str(run), capsys=capsys)
    assert code == 0, out.err
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["stop_reason"] == "all 2 steps done"
    for name in ("config.yaml", "metrics.jsonl", "samples.jsonl", "report.md"):
        assert (run / name).is_file(), name
    assert [p.name for p in list_checkpoints(run)] == ["step-00000001", "step-00000002"]
    train = _lines(run, "train")
    assert [r["step"] for r in train] == [1, 2]
    assert [r["step"] for r in _lines(run, "eval")] == [0, 2]  # before RL and at the end
    for r in train:
        for key in ("loss", "policy_loss", "entropy", "clip_frac", "grad_norm", "lr", "reward_mean",
                    "reward_std", "rollout_generated_tokens", "rollout_prompt_tokens", "rollout_forward_calls",
                    "learn_train_tokens", "learn_forward_calls", "rollout_flops", "learn_flops", "wall_s"):
            assert key in r, (preset, key)
        # the KL to the frozen initial policy is computed (and paid for) where the loss has the term
        assert ("kl" in r) == (method in ("mcts", "mcts-tree", "tree-fork", "bon", "ppo")), preset
        # the share of the step's generated tokens that ends in a learned row: every sample of the
        # sampling methods, one of bon_n = 3 for best-of-N, a part of each searched tree for the search
        # methods, and for a tree method every line's steps, once per sample (all of a forking tree's)
        share = r["learned_token_share"]
        if method in ("grpo", "cispo", "ppo"):
            assert share == 1.0, (preset, share)
        else:
            assert 0 < share <= 1 if method in ("tree-fork", "mcts-tree") else 0 < share < 1, (preset, share)
    # compute only grows, and the learner trained on what the rollouts generated
    assert 0 < train[0]["rollout_generated_tokens"] < train[1]["rollout_generated_tokens"]
    assert 0 < train[0]["learn_flops"] < train[1]["learn_flops"]
    if method.startswith("mcts"):
        for key in ("search_simulations", "search_tree_nodes", "search_tree_depth", "search_root_value"):
            assert key in train[0], key
    # the value head is measured at every evaluation where there is one (value_probe.py)
    for r in _lines(run, "eval"):
        has_head = cfg.uses_value_head
        assert ("value_mse" in r and "value_mse_const" in r and "value_spearman" in r) == has_head, (preset, r)
    assert ("## Value head" in (run / "report.md").read_text()) == has_head
    assert "mean@2" in (run / "report.md").read_text()
    kinds = {json.loads(line)["kind"] for line in (run / "samples.jsonl").read_text().splitlines()}
    assert kinds == {"eval", "train"}

    # resume auto from step 1 (step 2's checkpoint set aside, as if the run died before writing it): step 2
    # is run again and must repeat the first run's step 2 (its log line and its weights)
    evals = _lines(run, "eval")
    first_step_2 = run / "step-2-as-first-run"
    (run / "checkpoints" / "step-00000002").rename(first_step_2)
    code, out = _train("--preset", preset, "--steps", "3", *every_step, "--run-dir", str(run), "--resume", "auto",
                       capsys=capsys)
    assert code == 0, out.err
    again = _lines(run, "train")
    assert [r["step"] for r in again] == [1, 2, 3]
    assert [_without_wall_clock(r) for r in again[:2]] == [_without_wall_clock(r) for r in train]
    # the log after the checkpoint is replaced: step 2 is no longer the end, so its evaluation goes, as in a
    # run of 3 steps from the start
    assert [_without_wall_clock(r) for r in _lines(run, "eval")[:1]] == [_without_wall_clock(evals[0])]
    redone, first = (load_checkpoint(path) for path in (run / "checkpoints" / "step-00000002", first_step_2))
    assert all(torch.equal(redone["model"][k], first["model"][k]) for k in first["model"])
    assert again[2]["rollout_generated_tokens"] > again[1]["rollout_generated_tokens"]
    assert [r["step"] for r in _lines(run, "eval")] == [0, 3]


@pytest.mark.slow
def test_generated_token_budget_ends_the_run_and_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    code, out = _train("--preset", "countdown-tiny-grpo", "--steps", "5", "--budget-generated-tokens", "1",
                       "--run-dir", str(run), capsys=capsys)
    assert code == 0, out.err
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert summary["steps"] == 1 and "generated-token budget reached" in summary["stop_reason"]
    assert "generated-token budget reached" in (run / "report.md").read_text()
    assert [r["step"] for r in _lines(run, "eval")] == [0, 1]  # the end of the run is evaluated
    # resuming a run that spent its budget does nothing more
    code, out = _train("--preset", "countdown-tiny-grpo", "--steps", "5", "--budget-generated-tokens", "1",
                       "--run-dir", str(run), capsys=capsys)
    assert code == 0 and [r["step"] for r in _lines(run, "train")] == [1]


def test_problems_for_step_by_hand():
    from treedistill.metrics import ComputeCounters
    from treedistill.runs import problems_for_step

    cfg = load_config("countdown-tiny-grpo", overrides=["problems_per_step=16", "budget_generated_tokens=10000"])
    spent = ComputeCounters()
    assert problems_for_step(cfg, spent, 0) == 16  # nothing seen yet: a whole step
    spent.rollout_generated_tokens = 8000  # 16 problems seen: 500 tokens each, room for 2000 -> 4
    assert problems_for_step(cfg, spent, 16) == 4
    spent.rollout_generated_tokens = 9990  # 10 tokens of room: still one problem (rounded up)
    assert problems_for_step(cfg, spent, 16) == 1
    spent.rollout_generated_tokens = 1000  # plenty of room: a whole step
    assert problems_for_step(cfg, spent, 16) == 16
    unlimited = load_config("countdown-tiny-grpo", overrides=["problems_per_step=16"])
    assert problems_for_step(unlimited, spent, 16) == 16


@pytest.mark.slow
def test_the_step_that_reaches_the_budget_takes_only_the_problems_it_has_room_for(tmp_path, capsys):
    # 4 problems x 2 samples of at most 24 tokens a step (<= 192 tokens); a budget of 250 leaves room
    # for about 2 more problems after the first step, not 4.
    run = tmp_path / "run"
    code, out = _train("--preset", "countdown-tiny-grpo", "--set", "problems_per_step=4", "--steps", "5",
                       "--budget-generated-tokens", "250", "--run-dir", str(run), capsys=capsys)
    assert code == 0, out.err
    first, second = _lines(run, "train")
    per_problem = first["rollout_generated_tokens"] / 4
    room = 250 - first["rollout_generated_tokens"]
    assert first["problems_seen"] == 4 and second["problems_seen"] == 4 + math.ceil(room / per_problem) < 8
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and 250 <= summary["rollout_generated_tokens"] < 250 + 2 * 48


@pytest.mark.parametrize("args, message", [
    (["--preset", "countdown-tiny-mcts", "--set", "method=grpo"], "method grpo needs advantage in group"),
    (["--preset", "countdown-tiny-grpo", "--set", "bogus=1"], "unknown key bogus"),
    (["--preset", "countdown-tiny-grpo", "--set", "minibatch_size=3"], "minibatch_size=3"),
    (["--preset", "countdown-tiny-grpo", "--budget-generated-tokens", "-5"], "budget_generated_tokens"),
    (["--preset", "countdown-tiny-grpo", "--set", "model=./no/such/model"], "no such path"),
    (["--preset", "no-such-preset"], "unknown preset"),
    (["--preset", "countdown-tiny-grpo", "--engine", "sglang"], "unknown --engine"),
    (["--preset", "countdown-tiny-grpo", "--set", "lr=inf"], "lr must be a finite number"),
    (["--preset", "countdown-tiny-grpo", "--set", "lr=1e400"], "lr must be a finite number"),
])
def test_invalid_configuration_fails_before_any_compute(args, message, tmp_path, capsys, monkeypatch):
    import treedistill.models.load as load

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the configuration was checked")

    monkeypatch.setattr(load, "load_policy", no_loading)
    run = tmp_path / "run"
    assert main(["train", *args, "--run-dir", str(run)]) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()


@pytest.mark.slow
def test_resume_refuses_a_changed_config_and_never_refuses_an_existing_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train("--preset", "countdown-tiny-grpo", "--steps", "1", "--run-dir", str(run), capsys=capsys)[0] == 0
    code, out = _train("--preset", "countdown-tiny-grpo", "--steps", "2", "--set", "lr=0.1", "--run-dir", str(run),
                       capsys=capsys)
    assert code == 2 and "differs from the checkpoint's in lr" in out.err
    code, out = _train("--preset", "countdown-tiny-grpo", "--run-dir", str(run), "--resume", "never", capsys=capsys)
    assert code == 2 and "already holds checkpoints" in out.err


def test_a_setting_added_after_a_run_was_saved_reads_as_its_default():
    """A run folder written before a setting existed is the same run as one with that setting at its
    default (top level and inside search), and a different one when the setting is not at its default."""
    import yaml

    from treedistill.config import to_yaml
    from treedistill.runs import changed_settings

    cfg = load_config(preset="countdown-tiny-mcts")
    saved = yaml.safe_load(to_yaml(cfg))
    del saved["tree_advantage_norm"], saved["search"]["merge"]
    assert changed_settings(saved, cfg) == []
    assert changed_settings(saved, load_config(preset="countdown-tiny-mcts", overrides=["search.merge=canonical"])) == ["search"]
    assert changed_settings(saved, load_config(preset="countdown-tiny-mcts", overrides=["lr=0.1"])) == ["lr"]
    # a setting removed since: the run resumes where it saved the behaviour that was kept, not otherwise
    assert changed_settings({**saved, "tree_leaf_weight": "one"}, cfg) == []
    assert changed_settings({**saved, "tree_leaf_weight": "inv_sqrt"}, cfg) == ["tree_leaf_weight"]


def test_a_nonfinite_update_is_skipped_and_a_finite_one_is_taken():
    layer = torch.nn.Linear(2, 1)
    params = list(layer.parameters())
    optimizer = torch.optim.AdamW(params, lr=0.1)
    cfg = TrainConfig(grad_clip=1.0)
    before = [p.detach().clone() for p in params]
    layer(torch.tensor([[math.nan, 1.0]])).sum().backward()
    update = apply_update(optimizer, params, {"policy_loss": math.nan, "loss": math.nan}, cfg)
    assert update["nonfinite"] == ["policy_loss", "loss", "grad_norm"]
    assert all(torch.equal(a, b) for a, b in zip(before, params))  # weights untouched
    assert all(p.grad is None for p in params) and not optimizer.state  # nothing accumulated, no Adam moments
    layer(torch.tensor([[1.0, 1.0]])).sum().backward()
    update = apply_update(optimizer, params, {"policy_loss": 0.5, "loss": 0.5}, cfg)
    assert update["nonfinite"] == [] and update["grad_norm"] == pytest.approx(math.sqrt(3))  # grads (1, 1, 1)
    assert not all(torch.equal(a, b) for a, b in zip(before, params))


def test_a_step_that_makes_a_weight_nonfinite_is_rolled_back_with_the_optimizer_state():
    layer = torch.nn.Linear(2, 1)
    params = list(layer.parameters())
    optimizer = torch.optim.AdamW(params, lr=0.1)
    cfg = TrainConfig(grad_clip=0.0)
    layer(torch.tensor([[1.0, 2.0]])).sum().backward()
    assert apply_update(optimizer, params, {"loss": 1.0}, cfg)["nonfinite"] == []  # Adam moments now exist
    with torch.no_grad():
        for p in params:
            p.fill_(-3e38)  # near float32's limit; gradients (x = 1, 2 and 1) point the update further down
    before = [p.detach().clone() for p in params]
    state = {i: {k: v.clone() for k, v in optimizer.state[p].items()} for i, p in enumerate(params)}
    for group in optimizer.param_groups:
        group["lr"] = 1e37  # finite loss, gradients and lr, but the step itself overflows float32
    layer(torch.tensor([[1.0, 2.0]])).sum().backward()
    update = apply_update(optimizer, params, {"loss": 1.0}, cfg)
    assert update["nonfinite"] == ["weights"] and math.isfinite(update["grad_norm"])
    assert all(torch.equal(a, b) for a, b in zip(before, params))  # the pre-step weights
    for i, p in enumerate(params):  # and the pre-step optimizer state (moments and step count)
        assert optimizer.state[p].keys() == state[i].keys()
        assert all(torch.equal(optimizer.state[p][k], state[i][k]) for k in state[i])
    assert all(p.grad is None for p in params)


@pytest.mark.slow
def test_three_nonfinite_updates_in_a_row_stop_the_run_naming_step_and_quantity(tmp_path, capsys):
    from treedistill.models.load import load_policy

    # a model whose value head answers NaN: every value loss (and advantage) is NaN, every update skipped
    policy = load_policy("tiny", device="cpu")
    with torch.no_grad():
        policy.value_head.net[-1].bias.fill_(math.nan)
    policy.save(tmp_path / "nan-model")
    run = tmp_path / "run"
    code, out = _train("--preset", "countdown-tiny-ppo", "--steps", "6", "--set", f"model={tmp_path / 'nan-model'}",
                       "--set", "fresh_value_head=false",
                       "--run-dir", str(run), capsys=capsys)
    assert code == 2
    assert "step 3: non-finite policy_loss, value_loss, loss, grad_norm in 3 updates in a row" in out.err
    train = _lines(run, "train")
    assert [(r["step"], r["skipped_updates"]) for r in train] == [(1, 1), (2, 2), (3, 3)]
    assert all("value_loss" in r["nonfinite"] for r in train)
    assert list_checkpoints(run) == []  # nothing after the failure was saved as a good state


def test_problem_stream_is_a_pure_function_of_the_position():
    problems = [{"i": i} for i in range(5)]
    whole = take_problems(problems, 7, 0, 12)
    assert take_problems(problems, 7, 0, 4) + take_problems(problems, 7, 4, 8) == whole
    # every epoch visits every problem once, in a fresh order
    assert sorted(p["i"] for p in whole[:5]) == sorted(p["i"] for p in whole[5:10]) == list(range(5))
    assert whole[:5] != whole[5:10] or whole[:5] != take_problems(problems, 8, 0, 5)
    assert take_problems(problems, 7, 3, 6) == whole[3:9]


def test_training_problems_equal_to_a_test_problem_are_dropped(tmp_path):
    from treedistill.envs.countdown import CountdownEnv

    train = tmp_path / "train.jsonl"
    test = tmp_path / "test.jsonl"
    train.write_text("\n".join(json.dumps(p) for p in [
        {"numbers": [7, 3, 5, 2], "target": 22},  # the test problem, numbers reordered
        {"numbers": [1, 2, 3, 4], "target": 24}]) + "\n")
    test.write_text(json.dumps({"numbers": [2, 3, 5, 7], "target": 22}) + "\n")
    cfg = TrainConfig(method="grpo", advantage="group", policy_loss="ppo", value_coef=0.0,
                      train_path=str(train), test_path=str(test))
    kept, held_out = run_problems(cfg, CountdownEnv())
    assert kept == [{"numbers": [1, 2, 3, 4], "target": 24}] and len(held_out) == 1


def test_engine_never_serves_keys_values_of_weights_before_an_update():
    from treedistill.engine.native import NativeEngine
    from treedistill.models.load import wrap_policy
    from treedistill.models.tiny import build_model, build_tokenizer

    policy = wrap_policy(build_model(0, num_hidden_layers=1, hidden_size=32, intermediate_size=64),
                         build_tokenizer(), name="t", device=torch.device("cpu"), dtype=torch.float32)
    engine = NativeEngine(policy)
    sequence = list(range(40, 70))
    before = engine.logprobs([sequence], [10])  # fills the prefix cache with these weights' keys/values
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=1e-2)
    policy.model(input_ids=torch.tensor([sequence])).logits.sum().backward()
    optimizer.step()
    after = engine.logprobs([sequence], [10])
    assert after == NativeEngine(policy).logprobs([sequence], [10])  # as a fresh engine, no stale cache
    # the guard: the update did move these log-probs, so a stale cache would have served other numbers
    assert max(abs(a - b) for a, b in zip(after[0], before[0])) > 1e-3


def test_fresh_value_head_replaces_the_saved_one_deterministically():
    from treedistill.learner import load_train_policy

    def head(**settings):
        cfg = TrainConfig(model="tiny", device="cpu", dtype="float32", **settings)
        return load_train_policy(cfg).value_head.state_dict()

    saved, fresh, again, other = head(), head(fresh_value_head=True), head(fresh_value_head=True), \
        head(fresh_value_head=True, seed=1)
    assert saved.keys() == fresh.keys()
    assert not all(torch.equal(saved[k], fresh[k]) for k in saved)  # not the saved head
    assert all(torch.equal(fresh[k], again[k]) for k in fresh)  # the same one for the same seed
    assert not all(torch.equal(fresh[k], other[k]) for k in fresh)
