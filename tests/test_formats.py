"""Text formats of completions (envs/formats.py): each step delimiter and answer format, the rewards and
their safety in each, the prompt asking for it, and the options reaching the environment from config
and from `eval`."""

import itertools
import json
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from treedistill.config import load_config
from treedistill.envs import get_env
from treedistill.envs.formats import ANSWER_FORMATS, MAX_BOXED_CHARS, STEP_ENDS, TextFormat, extract, render
from treedistill.envs.gsm8k import SYSTEM_PROMPT, solution_steps
from treedistill.errors import UsageError

PROBLEM = {"question": "Janet has 16 eggs, eats 3 and bakes 4, sells the rest at $2. Dollars?",
           "answer": "16 - 3 - 4 = <<16-3-4=9>>9\n9 * 2 = $<<9*2=18>>18\n#### 18"}
FORMATS = [TextFormat(step, answer) for step, answer in itertools.product(STEP_ENDS, ANSWER_FORMATS)]
SHARED_GSM8K = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k"


@pytest.mark.parametrize(
    "answer, completion, found",
    [
        ("tag", "<answer>1</answer> x <answer>18</answer>", "18"),
        ("tag", "<answer>18", None),
        ("hash", "9*2=18\n#### 18\n", "18"),
        ("hash", "#### 1\n#### $1,800 \nmore text", "$1,800"),
        ("hash", "no hashes, 18", None),
        ("boxed", "so \\boxed{18}.", "18"),
        ("boxed", "\\boxed{\\frac{1}{2}} and \\boxed{7", "\\frac{1}{2}"),  # an unclosed last box: the one before
        ("boxed", "\\boxed{" + "1" * (MAX_BOXED_CHARS + 1) + "}", None),  # braces closing too far away
        ("boxed", "\\boxed{}", ""),
        ("last_number", "16-3-4=9, then 9*2=18. The answer is 18.", "18."),
        ("last_number", "It costs $1,234.50 in total", "$1,234.50"),
        ("last_number", "a -7 b", "-7"),
        ("last_number", "no digits at all", None),
    ],
)
def test_extract(answer, completion, found):
    assert extract(completion, answer) == found


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_a_rendered_gold_solution_scores_correct_and_a_wrong_one_wrong(fmt):
    """Every format: the worked solution written in it scores +1 and is terminal where the format can end
    before end-of-sequence; the same steps with another final number score wrong (-0.9); nothing, -1."""
    env = get_env("gsm8k", step=fmt.step, answer=fmt.answer)
    assert env.step_end == STEP_ENDS[fmt.step]
    gold = env.solution(PROBLEM)
    assert gold == render(["16 - 3 - 4 = 9", "9 * 2 = $18"], "18", fmt)
    assert (env.score(PROBLEM, gold).dense, env.score(PROBLEM, gold).reason) == (1.0, "correct")
    assert env.answer_value({"question": "?"}, gold) == 18
    wrong = render(["16 - 3 - 4 = 9", "9 * 2 = $18"], "17", fmt)
    assert (env.score(PROBLEM, wrong).dense, env.score(PROBLEM, wrong).reason) == (-0.9, "wrong")
    assert env.score(PROBLEM, "").reason == "no_answer"
    assert env.is_terminal(gold + "\n") == (fmt.answer != "last_number")  # a last number is finished by EOS
    steps_only = gold[:gold.rindex(env.step_end) + len(env.step_end)]
    assert not env.is_terminal(steps_only) and not env.is_terminal(gold[:-1] if fmt.answer == "tag" else "#### 1")


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_the_prompt_asks_for_the_format_with_an_example_that_scores_correct(fmt):
    env = get_env("gsm8k", step=fmt.step, answer=fmt.answer)
    system = env.messages(PROBLEM)[0]["content"]
    example = render(("16-3-4=9 eggs are left each day.", "9*2=18 dollars."), "18", fmt)
    assert system.endswith(example)
    assert env.score({"question": "", "answer": "#### 18"}, example).reason == "correct"
    assert ("<step>" in system) == (fmt.step == "tags") and ("<answer>" in system) == (fmt.answer == "tag")


def test_the_default_format_keeps_the_prompts_of_the_step_and_answer_tags():
    assert get_env("gsm8k").messages(PROBLEM)[0]["content"] == SYSTEM_PROMPT == (
        "Solve the math word problem. Reason in one or more steps, putting each step inside "
        "<step>...</step>. Then write exactly one final answer inside <answer>...</answer> holding only "
        "the final number, without units.\n"
        "For example: <step>16-3-4=9 eggs are left each day.</step><step>9*2=18 dollars.</step>"
        "<answer>18</answer>")
    countdown = get_env("countdown")
    assert countdown.messages({"numbers": [1, 2], "target": 3})[0]["content"].endswith(
        "you could write:\n<step>5*3=15 (7 15)</step><step>15+7=22 (22)</step><answer>5*3+7</answer>")


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@given(text=st.text(max_size=300))
@settings(max_examples=60, deadline=None)
def test_random_strings_never_raise_in_any_format(fmt, text):
    env = get_env("gsm8k", step=fmt.step, answer=fmt.answer)
    for completion in (text, render([text], text, fmt), f"\\boxed{{{text}", f"#### {text}"):
        score = env.score(PROBLEM, completion)
        assert score.dense in (1.0, -0.9, -1.0)
        assert isinstance(env.is_terminal(completion), bool)


@pytest.mark.parametrize("answer", ANSWER_FORMATS)
def test_parsing_is_bounded_on_long_adversarial_completions(answer):
    """Long completions built to make a backtracking parser slow: each is parsed in well under a second."""
    env = get_env("gsm8k", answer=answer)
    for completion in ("\\boxed{" * 50_000, "{" * 200_000, "1," * 100_000 + "x", "#### " * 50_000,
                       "<answer>" * 50_000 + "</answer>", "-" * 200_000, "$." * 100_000):
        start = time.perf_counter()
        env.score(PROBLEM, completion)
        assert time.perf_counter() - start < 1.0, (answer, completion[:20])


def test_countdown_steps_as_lines_and_its_answer_only_in_the_tag():
    env = get_env("countdown", step="line")
    problem = {"numbers": [3, 5, 7, 9], "target": 22}
    solution = env.solution(problem)
    assert env.step_end == "\n" and "<step>" not in solution
    assert solution.count("\n") == len(solution_lines := solution.splitlines()) - 1 and len(solution_lines) >= 2
    assert env.score(problem, solution).reason == "correct"
    assert get_env("countdown").solution(problem).startswith("<step>")
    with pytest.raises(UsageError, match="answer must be one of tag"):
        get_env("countdown", answer="boxed")


def test_bad_options_are_usage_errors():
    with pytest.raises(UsageError, match="step must be one of tags, line, blank"):
        get_env("gsm8k", step="comma")
    with pytest.raises(UsageError, match="env_format.answer must be one of tag"):
        load_config("countdown-tiny-grpo", overrides=["env_format.answer=boxed"])
    with pytest.raises(UsageError, match="unknown key env_format.delimiter"):
        load_config("countdown-tiny-grpo", overrides=["env_format.delimiter=line"])


def test_config_reaches_the_environment():
    cfg = load_config("countdown-tiny-grpo", overrides=["env=gsm8k", "env_format.step=line",
                                                        "env_format.answer=hash"])
    env = get_env(cfg.env, **cfg.env_options)
    assert (env.step_end, env.format) == ("\n", TextFormat("line", "hash"))
    assert load_config("countdown-tiny-grpo").env_options == {"step": "tags", "answer": "tag"}


def test_solution_steps_drop_calculator_annotations():
    assert solution_steps(PROBLEM["answer"]) == ["16 - 3 - 4 = 9", "9 * 2 = $18"]
    assert solution_steps("#### 5") == []


@pytest.mark.skipif(not (SHARED_GSM8K / "train.jsonl").exists(), reason="no offline GSM8K copy here")
def test_every_training_solution_renders_to_a_correct_completion_in_every_format():
    problems = [json.loads(line) for line in (SHARED_GSM8K / "train.jsonl").read_text().splitlines()]
    for fmt in FORMATS:
        env = get_env("gsm8k", step=fmt.step, answer=fmt.answer)
        wrong = [p["question"][:40] for p in problems if env.score(p, env.solution(p)).sparse != 1.0]
        assert not wrong, (fmt, len(wrong), wrong[:3])


def test_eval_takes_the_format(capsys):
    from treedistill.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--env", "gsm8k", "--data", "x.jsonl", "--answer", "roman"])
    assert exit_.value.code == 2 and "--answer" in capsys.readouterr().err
