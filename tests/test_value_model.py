"""`treedistill value-model` and the test-time search's screened roots on the real embedded model: a
small fit end to end, its folder read back, `eval --search mcts` ranking first steps with it, and the
refusals."""

import json

import pytest

from treedistill.cli import main
from treedistill.models.presets import TINY_FOLDER

pytestmark = pytest.mark.skipif(not (TINY_FOLDER / "config.json").is_file(), reason="the tiny checkpoint is absent")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vm") / "value_model"
    assert main(["value-model", "--model", "tiny", "--out", str(folder), "--problems", "64", "--held-out", "32",
                 "--epochs", "1", "--json"]) == 0
    return folder


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_the_fit_writes_a_value_model_that_reads_back_with_its_report(fitted):
    import torch

    from treedistill.engine import make_engine
    from treedistill.envs import get_env
    from treedistill.models.load import load_policy
    from treedistill.value_model import load_value_model

    meta = json.loads((fitted / "treedistill.json").read_text())["value_model"]
    assert meta["of"] == "tiny" and meta["label"] == "reachable" and meta["fit"]["problems"] == 64
    assert set(meta["held_out"]) == {"1", "2"} and meta["prefixes"] >= 64
    for r in meta["held_out"].values():
        assert r["prefixes"] > 0 and (r["auc"] is None or 0.0 <= r["auc"] <= 1.0)
    policy = load_policy("tiny", device="cpu")
    engine = load_value_model(fitted, policy)
    env = get_env("countdown")
    prompt = policy.prompt_ids(env.messages({"numbers": [3, 4, 5, 6], "target": 9}, compact=True))
    fitted_v = engine.value([prompt])[0]
    own_v = make_engine(policy, "native").value([prompt])[0]
    assert -1.0 <= fitted_v <= 1.0 and fitted_v != own_v  # its own head and trunk, not the policy's
    # the value model's weights are not the policy's
    vm = load_policy(fitted, device="cpu")
    differs = [not torch.equal(a, b) for a, b in zip(vm.model.state_dict().values(), policy.model.state_dict().values())]
    assert any(differs)


def test_eval_screens_first_steps_with_the_given_value_model(fitted, capsys):
    argv = ["eval", "--model", "tiny", "--split", "test", "--limit", "4", "--k", "1", "--search", "mcts",
            "--simulations", "6", "--json"]
    assert main([*argv, "--screen", "6", "--value-model", str(fitted)]) == 0
    out = capsys.readouterr().out
    assert f"first steps screened by the value model {fitted}" in out and "6 first steps screened" in out
    screened = json.loads(out.strip().splitlines()[-1])["search"]
    assert main([*argv, "--screen", "0"]) == 0
    plain = last_json(capsys)["search"]
    assert screened["screen"] == 6 and plain["screen"] == 0
    assert screened["tokens_per_problem"] != plain["tokens_per_problem"]


def test_without_a_value_model_the_default_screen_is_off_and_an_explicit_one_refused(capsys):
    argv = ["eval", "--model", "tiny", "--split", "test", "--limit", "2", "--k", "1", "--search", "mcts",
            "--simulations", "4", "--value-model", "none"]
    assert main([*argv, "--screen", "8"]) == 2
    assert "--screen 8 ranks first steps by a value model" in capsys.readouterr().err
    assert main([*argv, "--json"]) == 0
    out = capsys.readouterr().out
    assert "first steps not screened" in out and json.loads(out.strip().splitlines()[-1])["search"]["screen"] == 0


@pytest.mark.parametrize("argv, message", [
    (["--env", "gsm8k"], "solver"),
    (["--problems", "0"], "--problems"),
    (["--problems", "19990", "--held-out", "100"], "training split has"),
    (["--lr", "nan"], "--lr"),
])
def test_value_model_refuses_bad_arguments(argv, message, tmp_path, capsys):
    assert main(["value-model", "--out", str(tmp_path / "vm"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "vm").exists()


def test_a_folder_that_is_not_a_value_model_is_refused(tmp_path, capsys):
    assert main(["eval", "--model", "tiny", "--split", "test", "--limit", "2", "--k", "1", "--search", "mcts",
                 "--simulations", "4", "--screen", "4", "--value-model", str(tmp_path)]) == 2
    assert "no value model at" in capsys.readouterr().err


def test_a_held_out_set_too_small_for_an_auc_is_reported_undefined(tmp_path, capsys):
    assert main(["value-model", "--out", str(tmp_path / "vm"), "--problems", "64", "--held-out", "1",
                 "--epochs", "1", "--json"]) == 0
    out = capsys.readouterr().out
    assert "undefined" in out
    report = json.loads(out.strip().splitlines()[-1])
    assert all(r["auc"] is None for r in report["held_out"].values())
    assert (tmp_path / "vm" / "treedistill.json").is_file()
