"""Evaluation: statistics worked by hand, scoring through a scripted engine, the CLI and its refusals."""

import importlib.util
import json

import pytest
from tiny_prompt_policy import TinyPromptPolicy

from treedistill.cli import main
from treedistill.engine.base import FINISH_EOS, FINISH_LENGTH, Sample
from treedistill.errors import UsageError
from treedistill.evaluate import evaluate, summarize
from treedistill.search.contracts import TEST_TIME_SEARCH


def test_summary_statistics_by_hand():
    # 3 problems x 2 samples: per-problem means 0.5, 0, 1 -> mean@2 = 3/6 = 0.5;
    # sample variance of (0.5, 0, 1) = (0 + 0.25 + 0.25) / 2 = 0.25 -> stderr = 0.5 / sqrt(3) = 0.2887;
    # pass@2 = 2/3 (problems 1 and 3); format 5/6; dense mean (1 - 1 + ... ) / 6.
    sparse = [[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]
    well_formed = [[True, True], [False, True], [True, True]]
    dense = [[1.0, 0.5], [-1.0, -0.5], [1.0, 1.0]]
    r = summarize(sparse, well_formed, dense, k=2, temperature=0.2, generated_tokens=60, truncated=1, seconds=1.0)
    assert r.accuracy == pytest.approx(0.5)
    assert r.stderr == pytest.approx(0.5 / 3 ** 0.5)
    assert r.pass_at_k == pytest.approx(2 / 3)
    assert r.format_rate == pytest.approx(5 / 6)
    assert r.mean_dense == pytest.approx(2.0 / 6)
    assert (r.problems, r.samples, r.per_problem) == (3, 6, (0.5, 0.0, 1.0))
    d = r.to_dict()
    assert "per_problem" not in d and d["tokens_per_sample"] == 10.0


def test_single_problem_has_zero_stderr():
    r = summarize([[1.0, 0.0]], [[True, True]], [[1.0, 0.0]], k=2, temperature=0.2, generated_tokens=2,
                  truncated=0, seconds=0.0)
    assert r.stderr == 0.0 and r.accuracy == 0.5


class _ScriptedEngine:
    """Returns, for each prompt, completions looked up by the prompt's text: known answers."""

    def __init__(self, policy, script):
        self.policy, self.script, self.calls = policy, script, []

    def sample(self, prefixes, n=1, *, max_new_tokens, temperature=1.0, top_p=1.0, stop=(), seed=None):
        self.calls.append((len(prefixes), n, seed))
        out = []
        for prefix in prefixes:
            texts = self.script[self.policy.tokenizer.decode(prefix)]
            rows = []
            for j in range(n):
                ids = self.policy.tokenizer.encode(texts[j % len(texts)], add_special_tokens=False)
                finish = FINISH_LENGTH if len(ids) >= max_new_tokens else FINISH_EOS
                ids = ids[:max_new_tokens] + ([] if finish == FINISH_LENGTH else [self.policy.eos_token_ids[0]])
                rows.append(Sample(tuple(ids), (0.0,) * len(ids), (0.0,) * len(ids), finish))
            out.append(rows)
        return out


def test_evaluate_scores_what_the_engine_returns():
    from treedistill.envs.countdown import CountdownEnv

    env, policy = CountdownEnv(), TinyPromptPolicy()
    problems = [{"numbers": [3, 5, 7, 2], "target": 22}, {"numbers": [1, 2, 3, 4], "target": 24}]

    def prompt(p):
        return policy.tokenizer.decode(policy.prompt_ids(env.messages(p, compact=True)))

    script = {
        # 3*5+7 = 22 correct; 3+5 = 8 wrong but well formed.
        prompt(problems[0]): ["<step>3*5=15 (2 7 15)</step><answer>3*5+7</answer>", "<answer>3+5</answer>"],
        # No answer tag; 9 is not available (ill formed).
        prompt(problems[1]): ["<step>1+2=3 (3 3 4)</step>", "<answer>9*1</answer>"],
    }
    engine = _ScriptedEngine(policy, script)
    r = evaluate(engine, policy, env, problems, k=4, temperature=0.2, max_new_tokens=512, batch=4, seed=7)
    # batch 4 // k 4 = one problem per call, seeds 7 and 8.
    assert engine.calls == [(1, 4, 7), (1, 4, 8)]
    assert r.per_problem == (0.5, 0.0)
    assert r.accuracy == pytest.approx(0.25) and r.pass_at_k == pytest.approx(0.5)
    assert r.format_rate == pytest.approx(4 / 8)
    assert r.truncated == 0 and r.samples == 8
    # why the 6 failed samples failed: 2 wrong (3+5), 2 without an answer tag, 2 using a number not given
    assert (r.wrong, r.no_answer, r.unparsable) == (2, 2, 2)
    # A cap of 4 tokens cuts every answer (the shortest is 5: <answer> 3 + 5 </answer>): nothing is well formed, every sample is truncated.
    short = evaluate(_ScriptedEngine(policy, script), policy, env, problems, k=2, max_new_tokens=4, batch=64)
    assert short.format_rate == 0.0 and short.truncated == 4 and short.generated_tokens == 16
    assert (short.no_answer, short.unparsable, short.wrong) == (4, 0, 0)


def test_evaluate_refuses_bad_settings():
    with pytest.raises(ValueError):
        evaluate(None, TinyPromptPolicy(), None, [], k=0)
    with pytest.raises(ValueError):
        evaluate(None, TinyPromptPolicy(), None, [], k=1, temperature=-0.1)


@pytest.mark.parametrize("flags, message", [
    (["--k", "0"], "--k must be >= 1"),
    (["--temperature", "-0.5"], "--temperature must be >= 0"),
    (["--temperature", "nan"], "--temperature must be >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--limit", "0"], "--limit"),
    (["--batch", "0"], "--batch"),
    (["--engine", "sglang"], "unknown --engine"),
    pytest.param(["--engine", "vllm"], "needs the vllm package",
                 marks=pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")),
    (["--search", "mcts", "--simulations", "0"], "--simulations must be >= 1"),
    (["--search", "mcts", "--parallel", "0"], "--parallel must be >= 1"),
    (["--search", "mcts", "--search-temperature", "0"], "--search-temperature must be > 0"),
    (["--search", "mcts", "--widen-c", "-1"], "--widen-c must be >= 0"),
    (["--search", "mcts", "--select", "best"], "--select must be one of puct, uct, gumbel"),
    (["--search", "mcts", "--subtrees", "0"], "--subtrees must be >= 1"),
    (["--search", "mcts", "--repeat-penalty", "-1"], "--repeat-penalty must be >= 0"),
    (["--search", "mcts", "--repeat-penalty", "nan"], "--repeat-penalty must be a finite number"),
    (["--value-probe", "-1"], "--value-probe must be >= 0"),
    (["--value-probe", "4", "--value-probe-k", "0"], "--value-probe-k must be >= 1"),
])
def test_cli_refuses_bad_input_before_any_compute(flags, message, capsys, monkeypatch):
    import treedistill.models.load as load

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(load, "load_policy", no_loading)
    assert main(["eval", "--model", "tiny", "--split", "test", *flags]) == 2
    assert message in capsys.readouterr().err


def test_cli_needs_a_split_or_a_data_file(capsys):
    with pytest.raises(SystemExit) as err:
        main(["eval", "--model", "tiny"])
    assert err.value.code == 2


def test_cli_refuses_a_missing_data_file(tmp_path, capsys):
    assert main(["eval", "--model", "tiny", "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_eval_tiny_smoke(tmp_path, capsys):
    data = tmp_path / "problems.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in [
        {"numbers": [3, 5, 7, 2], "target": 22}, {"numbers": [13, 9, 5, 7], "target": 27},
        {"numbers": [4, 4, 6, 1], "target": 96}]) + "\n")
    assert main(["eval", "--model", "tiny", "--data", str(data), "--k", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["problems"] == 3 and out["samples"] == 6
    assert 0.0 <= out["accuracy"] <= 1.0 and out["format_rate"] >= 0.5


@pytest.mark.slow
def test_cli_eval_test_split_smoke(capsys):
    assert main(["eval", "--model", "tiny", "--split", "test", "--k", "2", "--limit", "10", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("accuracy", "stderr", "pass_at_k", "format_rate", "problems", "samples", "generated_tokens"):
        assert key in out
    assert out["problems"] == 10 and out["samples"] == 20 and out["generated_tokens"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("terminal, selectors", [(None, ["bon+verifier"]), ("legal", ["bon-majority", "bon-value"])])
def test_cli_eval_with_search(terminal, selectors, capsys):
    flags = ["--terminal", terminal] if terminal else []
    assert main(["eval", "--model", "tiny", "--split", "test", "--limit", "3", "--k", "2", "--search", "mcts",
                 "--simulations", "8", "--parallel", "4", "--problems-at-once", "2", *flags, "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["problems"], out["samples"]) == (3, 6)  # without search: 3 problems x 2 samples
    s = out["search"]
    # with search: one answer per problem; Countdown's reward reads only the prompt, so it is the default
    assert (s["problems"], s["samples"], s["simulations"], s["parallel"]) == (3, 3, 8, 4)
    assert s["terminal_value"] == (terminal or "reward")
    assert 0.0 <= s["accuracy"] <= 1.0 and s["tokens_per_problem"] == pytest.approx(s["generated_tokens"] / 3)
    assert s["tokens_per_problem"] > out["tokens_per_sample"]  # 8 simulations sample more than one completion
    # best-of-N at the search's tokens per problem, exactly (every problem samples until the budget)
    assert [b["method"] for b in s["best_of_n"]] == selectors
    for b in s["best_of_n"]:
        assert b["tokens_per_problem"] == round(s["tokens_per_problem"]) and b["n_mean"] > 1


def test_every_search_default_comes_from_one_named_setting():
    """CLI flags given nothing, the training config and the test-time sweep all read search/contracts.py."""
    import argparse

    from treedistill.commands import eval as eval_command
    from treedistill.commands import search as search_command
    from treedistill.commands import search_settings
    from treedistill.commands import testtime as testtime_command
    from treedistill.config import TrainConfig
    from treedistill.search.contracts import INSPECT_SEARCH, TEST_TIME_SEARCH, TRAINING_SEARCH
    from treedistill.testtime import SweepConfig

    def parsed(command, *argv):
        parser = argparse.ArgumentParser()
        command.add_arguments(parser)
        return parser.parse_args(list(argv))

    assert eval_command._search_settings(parsed(eval_command, "--split", "test")) == TEST_TIME_SEARCH
    assert search_settings(parsed(testtime_command), TEST_TIME_SEARCH) == TEST_TIME_SEARCH
    assert SweepConfig(budgets=(256,)).search == TEST_TIME_SEARCH
    inspect = parsed(search_command, "--numbers", "3", "4", "--target", "7")
    assert search_settings(inspect, INSPECT_SEARCH) == INSPECT_SEARCH
    assert TrainConfig().search == TRAINING_SEARCH
    # a flag replaces only its field, and a bad value is refused by the settings' own check, named as the flag
    given = search_settings(parsed(search_command, "--numbers", "3", "--target", "3", "--c-puct", "1.5"), INSPECT_SEARCH)
    assert given.c_puct == 1.5 and given.simulations == INSPECT_SEARCH.simulations
    with pytest.raises(UsageError, match="--c-puct must be >= 0"):
        search_settings(parsed(search_command, "--numbers", "3", "--target", "3", "--c-puct", "-1"), INSPECT_SEARCH)


def test_evaluate_spreads_a_large_k_over_calls_of_at_most_batch():
    """k > batch: one problem's samples over several engine calls (a call for 100,000 rows took all
    the memory of the machine); k <= batch: batch // k problems per call, as before."""
    from treedistill.engine import make_engine
    from treedistill.envs.countdown import CountdownEnv
    from treedistill.evaluate import _calls
    from treedistill.models import load_policy

    assert _calls(5, 2, 4) == [(0, 2, 2), (2, 2, 2), (4, 1, 2)]
    assert _calls(2, 5, 2) == [(0, 1, 2), (0, 1, 2), (0, 1, 1), (1, 1, 2), (1, 1, 2), (1, 1, 1)]
    policy = load_policy("tiny", device="cpu", value_head=False)
    engine = make_engine(policy, "hf")
    rows = []
    sample = engine.sample

    def recording(prefixes, n, **opts):
        rows.append(len(prefixes) * n)
        return sample(prefixes, n, **opts)

    engine.sample = recording
    problems = [{"numbers": [3, 5, 7, 2], "target": 22}, {"numbers": [1, 2, 3, 4], "target": 24}]
    r = evaluate(engine, policy, CountdownEnv(), problems, k=5, batch=2, max_new_tokens=48, seed=1)
    assert rows == [2, 2, 1, 2, 2, 1]
    assert r.samples == 10 and len(r.per_problem) == 2 and r.k == 5
    assert 0 < r.generated_tokens <= 10 * 48


@pytest.mark.slow
def test_cli_eval_value_probe_measures_the_saved_head(capsys):
    """--value-probe P: the probe training logs, on the first P problems, with the model's own head."""
    from treedistill.datasets import load_split
    from treedistill.engine import make_engine
    from treedistill.envs import get_env
    from treedistill.learner import derive_seed
    from treedistill.methods import TrainingReward
    from treedistill.models.load import load_policy
    from treedistill.value_probe import probe_value

    assert main(["eval", "--model", "tiny", "--split", "test", "--limit", "4", "--k", "1", "--value-probe", "3",
                 "--value-probe-k", "2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["value_probe"]
    assert got["value_probe_prefixes"] == 3 and got["value_mse"] >= 0 and got["value_mse_const"] >= 0
    policy = load_policy("tiny", device="cpu")
    env = get_env("countdown")
    want = probe_value(make_engine(policy, "native"), policy, TrainingReward(env, "sparse"),
                       load_split("countdown", "test")[:3], k=2, temperature=0.8, max_new_tokens=512,
                       step_max_tokens=40, seed=derive_seed(0, "value-probe", 0)).to_dict()
    for key in ("value_mse", "value_mse_const", "value_probe_target_mean", "value_probe_value_mean"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


def test_cli_eval_value_probe_refuses_a_model_without_a_saved_head(tmp_path, capsys):
    from treedistill.models.load import load_policy, write_model_files

    policy = load_policy("tiny", device="cpu", value_head=False)
    write_model_files(tmp_path, policy.model, policy.tokenizer, None, name="tiny", compact_prompt=True)
    assert main(["eval", "--model", str(tmp_path), "--split", "test", "--limit", "2", "--value-probe", "2"]) == 2
    assert "has no saved value head" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_eval_with_subtrees_and_repeat_penalty(capsys):
    assert main(["eval", "--model", "tiny", "--split", "test", "--limit", "3", "--k", "1", "--search", "mcts",
                 "--simulations", "6", "--subtrees", "2", "--repeat-penalty", "1", "--parallel", "2",
                 "--no-defer-expansion", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    s = out["search"]
    assert (s["subtrees"], s["repeat_penalty"], s["simulations"], s["samples"]) == (2, 1.0, 6, 3)
    assert s["defer_expansion"] is False and TEST_TIME_SEARCH.defer_expansion  # the flag turns the default off
    assert s["distinct_answers"] <= s["finished_answers"]
    # MCTS minus best-of-N, paired over the same 3 problems: the estimate is the difference of the rates
    b = s["best_of_n"][0]
    d = b["mcts_minus"]
    assert d["difference"] == pytest.approx(s["accuracy"] - b["accuracy"])
    assert d["low"] <= d["difference"] <= d["high"]


@pytest.mark.parametrize("flags, message", [
    (["--search", "mcts", "--seeds", "0"], "--seeds must be >= 1"),
    (["--seeds", "2"], "--seeds 2 repeats the search; it needs --search mcts"),
])
def test_cli_refuses_bad_seeds(flags, message, capsys):
    assert main(["eval", "--model", "tiny", "--split", "test", *flags]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_cli_eval_search_over_seeds_pools_the_runs_of_each_seed(tmp_path, capsys):
    # Six test problems the tiny model's best-of-N solves in about a third of its seeds, so the two
    # seeds' accuracies differ and the means are not 0.
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"numbers": n, "target": t}) + "\n" for n, t in [
        ([7, 4, 9, 8], 49), ([7, 12, 7, 3], 165), ([5, 11, 4, 11], 29), ([4, 4, 10, 8], 304),
        ([10, 12, 12, 11], 5), ([4, 5, 5, 8], 76)]))
    flags = ["eval", "--model", "tiny", "--data", str(data), "--k", "1", "--search", "mcts",
             "--simulations", "6", "--parallel", "2", "--json"]

    def run(*more):
        assert main([*flags, *more]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["search"]

    pooled = run("--seed", "5", "--seeds", "2")
    alone = [run("--seed", "5"), run("--seed", "6")]
    assert pooled["seeds"] == [5, 6] and alone[0]["seeds"] == [5] and "per_seed" not in alone[0]
    assert alone[0]["accuracy"] != alone[1]["accuracy"], "the seeds must differ for this test to check the means"
    # each seed's row is what a run with that --seed alone measures
    keys = ("accuracy", "generated_tokens", "finished_answers", "distinct_answers")
    for row, single in zip(pooled["per_seed"], alone):
        assert {k: row[k] for k in keys} == {k: single[k] for k in keys}
        assert row["best_of_n"][0]["distinct_answers"] == single["best_of_n"][0]["distinct_answers"]
    # the pooled row: means over the seeds, sums of the counts, the difference of the means
    for k in ("accuracy", "tokens_per_problem", "distinct_answers"):
        assert pooled[k] == pytest.approx((alone[0][k] + alone[1][k]) / 2)
    assert pooled["generated_tokens"] == alone[0]["generated_tokens"] + alone[1]["generated_tokens"]
    assert pooled["samples"] == 12
    b = pooled["best_of_n"][0]
    assert b["accuracy"] == pytest.approx((alone[0]["best_of_n"][0]["accuracy"]
                                           + alone[1]["best_of_n"][0]["accuracy"]) / 2)
    assert b["mcts_minus"]["difference"] == pytest.approx(pooled["accuracy"] - b["accuracy"])
    assert b["mcts_minus"]["low"] <= b["mcts_minus"]["difference"] <= b["mcts_minus"]["high"]
