"""GSM8K: answer parsing, rewards, and loading."""

import json
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from treedistill.envs.base import reward_from_prompt
from treedistill.envs.gsm8k import GSM8KEnv, final_answer, load_gsm8k, parse_number
from treedistill.errors import UsageError

ENV = GSM8KEnv()
# An offline copy of GSM8K beside this machine's checkout (users do not have it; its tests skip).
SHARED_GSM8K = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k"
PROBLEM = {"question": "Janet has 16 eggs, eats 3 and bakes 4, sells the rest at $2. Dollars?",
           "answer": "16 - 3 - 4 = <<16-3-4=9>>9\n9 * 2 = $<<9*2=18>>18\n#### 18"}


@pytest.mark.parametrize(
    "text, value",
    [
        ("18", 18), (" 18 ", 18), ("18.0", 18), ("18.", 18), ("$18", 18), ("1,234", 1234),
        ("$1,234.50", Fraction(2469, 2)), ("-3", -3), ("+7", 7), ("0.125", Fraction(1, 8)),
        ("", None), ("eighteen", None), ("18 dollars", None), ("1e3", None), ("١٨", None),
        ("3/4", None), ("--3", None), ("9" * 100, None), (".5", None),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_final_answer():
    assert final_answer(PROBLEM["answer"]) == "18"
    assert final_answer("42") == "42"
    assert final_answer("a #### 1 #### 2") == "2"


@pytest.mark.parametrize(
    "completion, dense, sparse, reason",
    [
        ("<step>16-3-4=9</step><step>9*2=18</step><answer>18</answer>", 1.0, 1.0, "correct"),
        ("<answer>$18.00</answer>", 1.0, 1.0, "correct"),
        ("<answer>17</answer><answer>18</answer>", 1.0, 1.0, "correct"),  # the last tag counts
        ("<answer>18</answer><answer>17</answer>", -0.9, 0.0, "wrong"),
        ("<answer>18 dollars</answer>", -0.9, 0.0, "invalid:not_a_number"),
        ("<answer></answer>", -0.9, 0.0, "invalid:not_a_number"),
        ("The answer is 18.", -1.0, 0.0, "no_answer"),
        ("<answer>18", -1.0, 0.0, "no_answer"),
        ("", -1.0, 0.0, "no_answer"),
        (bytes(range(256)).decode("latin-1"), -1.0, 0.0, "no_answer"),
    ],
)
def test_rewards(completion, dense, sparse, reason):
    score = ENV.score(PROBLEM, completion)
    assert (score.dense, score.sparse, score.reason) == (dense, sparse, reason)


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_random_strings_never_raise(text):
    for completion in (text, f"<answer>{text}</answer>"):
        assert ENV.score(PROBLEM, completion).dense in (1.0, -0.9, -1.0)


def test_protocol():
    assert ENV.step_end == "</step>" and ENV.name == "gsm8k"
    assert not reward_from_prompt(ENV)  # the reward needs the reference answer
    assert ENV.is_terminal("<step>a</step><answer>3</answer>") and not ENV.is_terminal("<answer>3")
    system, user = ENV.messages(PROBLEM)
    assert "<step>" in system["content"] and "<answer>" in system["content"]
    assert user == {"role": "user", "content": PROBLEM["question"]}
    assert ENV.messages(PROBLEM, compact=True) == [user]
    assert ENV.key({"question": " a  b\n"}) == ENV.key({"question": "a b"})


def test_load_user_file_and_folder(tmp_path):
    (tmp_path / "test.jsonl").write_text(json.dumps(PROBLEM) + "\n")
    assert load_gsm8k("test", tmp_path) == [PROBLEM]
    assert load_gsm8k("test", tmp_path / "test.jsonl") == [PROBLEM]


@pytest.mark.parametrize("line", ["{", '{"question": "q"}', '{"question": "q", "answer": "#### x"}', "3"])
def test_malformed_file_names_file_and_line(tmp_path, line):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(PROBLEM) + "\n" + line + "\n")
    with pytest.raises(UsageError, match=r"g\.jsonl:2: "):
        load_gsm8k("test", path)


def test_no_path_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(UsageError, match=r"datasets.*--set test_path=PATH") as err:
        load_gsm8k("test")
    assert "\n" not in str(err.value)


def test_no_path_with_the_hub_unreachable_is_a_clear_error(monkeypatch):
    class Offline:  # `datasets` as it behaves without network access
        @staticmethod
        def load_dataset(*args, **kwargs):
            raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setitem(sys.modules, "datasets", Offline)
    with pytest.raises(UsageError, match=r"openai/gsm8k.*Couldn't reach.*--set train_path=PATH") as err:
        load_gsm8k("train")
    assert "\n" not in str(err.value)


@pytest.mark.skipif(not (SHARED_GSM8K / "test.jsonl").exists(), reason="no offline GSM8K copy here")
def test_real_data_loads_and_gold_answers_score_correct():
    test = load_gsm8k("test", SHARED_GSM8K)
    assert len(test) == 1319
    assert all(ENV.score(p, f"<answer>{final_answer(p['answer'])}</answer>").sparse == 1.0 for p in test)
    assert len(load_gsm8k("train", SHARED_GSM8K / "train.jsonl")) == 7473


def test_answer_value_is_the_parsed_final_number_without_the_answer_key():
    env = GSM8KEnv()
    problem = {"question": "How many?"}  # inputs only: answer_value never reads "answer"
    assert env.answer_value(problem, "<step>2+2</step><answer>$1,000.50</answer>") == Fraction(2001, 2)
    assert env.answer_value(problem, "<answer>four</answer>") is None
    assert env.answer_value(problem, "no tag") is None
