"""TrainConfig: presets, overrides with type coercion, validation before compute, YAML round trip."""

import dataclasses
import re
from pathlib import Path

import pytest

from treedistill.config import (
    TrainConfig,
    list_presets,
    load_config,
    to_yaml,
)
from treedistill.errors import UsageError

REPO = Path(__file__).resolve().parents[1]

EXPECTED_PRESETS = {
    "countdown-tiny-mcts", "countdown-tiny-grpo", "countdown-tiny-cispo", "countdown-tiny-bon",
    "countdown-tiny-ppo", "countdown-qwen1.5b-mcts", "countdown-qwen1.5b-cispo", "countdown-qwen1.5b-bon",
    "gsm8k-qwen1.5b-mcts", "gsm8k-qwen1.5b-grpo",
}


@pytest.fixture(autouse=True)
def repo_root(monkeypatch):
    # relative data paths resolve from the repository root
    monkeypatch.chdir(REPO)


# Offline copies of the reference's data sets, beside this machine's checkout (users do not have them).
SHARED_DATA = REPO / ".." / "shared" / "data"


def load_preset(name: str):
    """The preset as shipped: presets name no data file outside the package."""
    return load_config(preset=name)


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k" / "test.jsonl").exists(), reason="no offline GSM8K copy here")
def test_presets_take_local_data_paths():
    gsm8k, reference = SHARED_DATA / "gsm8k", SHARED_DATA / "countdown-reference" / "test.jsonl"
    cfg = load_config(preset="gsm8k-qwen1.5b-mcts",
                      overrides=[f"train_path={gsm8k / 'train.jsonl'}", f"test_path={gsm8k / 'test.jsonl'}"])
    assert (cfg.train_path, cfg.test_path) == (str(gsm8k / "train.jsonl"), str(gsm8k / "test.jsonl"))
    if reference.exists():
        assert load_config(preset="countdown-qwen1.5b-mcts", overrides=[f"test_path={reference}"]).test_path == str(reference)


def test_defaults_are_valid():
    cfg = TrainConfig()
    assert cfg.method == "mcts" and cfg.trajectories_per_step == 32


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_every_preset_loads_and_round_trips_through_yaml(name, tmp_path):
    assert EXPECTED_PRESETS <= set(list_presets())
    cfg = load_preset(name)
    file = tmp_path / "config.yaml"
    file.write_text(to_yaml(cfg))
    assert load_config(path=file) == cfg
    assert "# derived:" in file.read_text()


def test_reference_presets_hold_the_reference_settings():
    mcts = load_preset("countdown-qwen1.5b-mcts")
    s = mcts.search
    assert (s.k_children, s.temperature, s.c_puct, s.select) == (4, 0.8, 0.5, "puct")
    assert (s.parallel, s.virtual_loss, s.problems_at_once, s.simulations, s.step_max_tokens) == (16, 1.0, 12, 1600, 64)
    assert (mcts.lr, mcts.lr_schedule, mcts.decay_steps, mcts.grad_clip) == (5e-6, "linear-decay", 2048, 0.1)
    assert (mcts.trajectories_per_step, mcts.max_new_tokens) == (32, 512)
    assert (mcts.policy_loss, mcts.eps_low, 1 + mcts.eps_high) == ("cispo", None, 5.0)  # min(ratio, 5.0)
    assert (mcts.value_coef, mcts.kl_coef, mcts.advantage) == (1.0, 0.05, "reward_minus_value")
    assert (mcts.eval_k, mcts.eval_temperature) == (16, 0.2)
    cispo = load_preset("countdown-qwen1.5b-cispo")
    assert (cispo.group_size, cispo.lr, cispo.lr_schedule, cispo.warmup_steps, cispo.steps) == (
        16, 5e-6, "constant", 50, 2100)
    assert (cispo.advantage, cispo.value_coef, 1 + cispo.eps_high, cispo.uses_value_head) == ("group", 0.0, 5.0, False)
    bon = load_preset("countdown-qwen1.5b-bon")
    assert (bon.bon_n, bon.temperature, bon.policy_loss, bon.advantage) == (64, 0.8, "cispo", "reward_minus_value")
    assert load_preset("gsm8k-qwen1.5b-grpo").policy_loss == "ppo"


def test_overrides_coerce_to_field_types():
    cfg = load_config(preset="countdown-tiny-mcts", overrides=[
        "lr=1e-4", "steps=7", "search.simulations=16", "search.max_depth=null", "eps_low=0.2",
        "log_backends=jsonl,tensorboard", "lora.target_modules=[q_proj, v_proj]", "lora.r=4",
        "budget_generated_tokens=1e6", "model=./",
    ])
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.steps == 7 and cfg.search.simulations == 16 and cfg.search.max_depth is None
    assert cfg.search.parallel == 8  # untouched nested fields keep the preset's values
    assert cfg.eps_low == 0.2 and cfg.log_backends == ("jsonl", "tensorboard")
    assert cfg.lora.target_modules == ("q_proj", "v_proj") and cfg.lora.r == 4
    assert cfg.budget_generated_tokens == 1_000_000 and isinstance(cfg.budget_generated_tokens, int)


@pytest.mark.parametrize("overrides,message", [
    (["method=alphazero"], "method must be one of mcts, mcts-tree, tree-fork, bon, grpo, cispo, ppo"),
    (["learning_rate=1e-4"], "unknown key learning_rate"),
    (["search.simulation=8"], "did you mean search.simulations"),
    (["minibatch_size=12"], "minibatch_size=12 is not divisible by group_size=16"),
    (["minibatch_size=24"], "minibatch_size=24 is not divisible by group_size=16"),
    (["budget_generated_tokens=-5"], "budget_generated_tokens must be null or > 0"),
    (["budget_flops=-1e18"], "budget_flops must be null or > 0"),
    (["model="], "model must name a model preset or a local path"),
    (["model=./no/such/model"], "model: no such path"),
    (["steps=abc"], "steps must be an integer"),
    (["steps=2.5"], "steps must be an integer"),
    (["policy_loss=cispo"], "method grpo needs policy_loss in ppo"),
    (["value_coef=1.0"], "value_coef must be 0 with advantage=group"),
    (["advantage=gae"], "method grpo needs advantage in group"),
    (["search.select=random"], "search.select must be one of puct, uct"),
    (["train_path=missing.jsonl"], "train_path: no such file"),
    (["log_backends=jsonl,mlflow"], "log_backends entry must be one of jsonl, tensorboard, wandb"),
    (["lr"], "--set expects key=value"),
])
def test_invalid_settings_fail_before_compute_naming_the_field(overrides, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(preset="countdown-tiny-grpo", overrides=overrides)


def test_a_tree_method_without_a_value_head_values_every_leaf_by_a_rollout():
    mc = load_config(preset="countdown-tiny-mcts-mc")
    assert (mc.method, mc.value_coef, mc.search.rollout_lambda, mc.uses_value_head) == ("mcts-tree", 0.0, 1.0, False)
    assert load_config(preset="countdown-tiny-mcts-tree").uses_value_head
    with pytest.raises(UsageError, match="search.rollout_lambda must be 1 \\(got 0.5\\)"):
        load_config(preset="countdown-tiny-mcts-mc", overrides=["search.rollout_lambda=0.5"])
    # mcts's advantage reads the head: it cannot go without one
    with pytest.raises(UsageError, match="value_coef must be > 0 with advantage=reward_minus_value"):
        load_config(preset="countdown-tiny-mcts", overrides=["value_coef=0", "search.rollout_lambda=1"])


def test_unknown_preset_and_inherit_from_a_user_file(tmp_path):
    with pytest.raises(UsageError, match="unknown preset 'nope'; presets: .*countdown-qwen1.5b-bon"):
        load_config(preset="nope")
    with pytest.raises(UsageError, match="unknown preset"):
        load_config(preset="_countdown-tiny")  # shared bases are not presets
    user = tmp_path / "mine.yaml"
    user.write_text("inherit: countdown-tiny-mcts\nsteps: 3\nsearch:\n  simulations: 16\n")
    cfg = load_config(path=user)
    assert (cfg.method, cfg.steps, cfg.search.simulations, cfg.search.parallel) == ("mcts", 3, 16, 8)
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("inherit: b.yaml\n")
    b.write_text("inherit: a.yaml\n")
    with pytest.raises(UsageError, match="inherit cycle"):
        load_config(path=a)
    with pytest.raises(UsageError, match="config file not found"):
        load_config(path=tmp_path / "missing.yaml")


@pytest.mark.parametrize("override,message", [
    ("lr=inf", "lr must be a finite number (got inf)"),
    ("lr=1e400", "lr must be a finite number (got inf)"),
    ("lr=2", "lr must be at most 1.0"),
    ("temperature=inf", "temperature must be a finite number"),
    ("eval_temperature=inf", "eval_temperature must be a finite number"),
    ("search.temperature=nan", "search.temperature must be a finite number"),
    ("kl_coef=inf", "kl_coef must be a finite number"),
    ("budget_flops=inf", "budget_flops must be a finite number"),
    ("max_new_tokens=1000000000", "max_new_tokens must be at most 32768"),
    ("train_size=1000000000000", "train_size must be at most 10000000"),
    ("test_size=1e300", "test_size must be at most 10000000 (got an integer of 3"),
    ("data_seed=-1", "data_seed must be at least 0"),
    ("seed=4294967296", "seed must be at most 4294967295"),
    ("seed=" + "1" * 5000, "seed must be an integer"),
    ("lr=" + "[" * 5000, "lr must be a number"),
    ("problems_per_step=10000000", "problems_per_step x samples per problem must be at most 10000000"),
])
def test_every_number_is_finite_and_within_its_documented_bound(override, message):
    with pytest.raises(UsageError, match=re.escape(message)) as err:
        load_config(preset="countdown-tiny-grpo", overrides=[override])
    assert "\n" not in str(err.value) and len(str(err.value)) < 300


@pytest.mark.parametrize("text,message", [
    (b"steps: 3\nlr: \xff\xfe\n", "is not valid YAML"),
    (b"a: " + b"[" * 100_000, "nested too deeply"),
    (b"steps: " + b"1" * 5000 + b"\n", "is not valid YAML: Exceeds the limit"),
    (b"inherit: .\n", "which is neither a preset"),  # a folder
    (b"inherit: [1, 2]\n", "inherit must name a preset or a YAML file"),
])
def test_unreadable_config_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text)
    with pytest.raises(UsageError, match=message) as err:
        load_config(path=path)
    assert "\n" not in str(err.value)


def test_train_config_serves_as_loss_and_advantage_cfg():
    torch = pytest.importorskip("torch")
    from treedistill.algorithms import ADVANTAGES as ADVANTAGE_FNS

    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert {"policy_loss", "eps_low", "eps_high", "ppo_clip", "value_coef", "kl_coef", "group_size", "gamma",
            "lam"} <= train_fields
    cfg = load_config(preset="countdown-tiny-grpo", overrides=["group_size=8"])
    advantages, _ = ADVANTAGE_FNS[cfg.advantage](torch.tensor([1.0] + [0.0] * 7), None, torch.ones(8, 2), cfg)
    assert advantages.shape == (8, 2)


def test_lr_multiplier_hand_values():
    # warm-up 2 steps: (s + 1) / 2 -> 0.5, 1.0; then linear decay (10 - s) / (10 - 2) -> 1.0, 0.625, 0, 0
    cfg = load_config(overrides=["warmup_steps=2", "lr_decay_steps=10", "lr_schedule=linear-decay"])
    assert [cfg.lr_multiplier(s) for s in (0, 1, 2, 5, 10, 12)] == pytest.approx([0.5, 1.0, 1.0, 0.625, 0.0, 0.0])
    constant = load_config(overrides=["warmup_steps=50", "lr_schedule=constant"])
    assert constant.lr_multiplier(24) == pytest.approx(0.5) and constant.lr_multiplier(2000) == 1.0
