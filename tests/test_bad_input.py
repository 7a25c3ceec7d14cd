"""Property tests: whatever the settings (--set overrides, YAML files) or problem records, the result
is a config / a correct run of the command, or ONE line of error and exit 2; never a traceback."""

import contextlib
import dataclasses
import io
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from treedistill.cli import main
from treedistill.config import LoraSettings, SearchSettings, TrainConfig, load_config
from treedistill.envs.countdown import load_problems
from treedistill.errors import UsageError
from treedistill.models.presets import TINY_FOLDER

KEYS = sorted([f.name for f in dataclasses.fields(TrainConfig)]
              + [f"search.{f.name}" for f in dataclasses.fields(SearchSettings)]
              + [f"lora.{f.name}" for f in dataclasses.fields(LoraSettings)])
NASTY = ["inf", "-inf", "nan", "1e400", "-1e400", "-1", "0", "1e308", "1e-400", "null", "true", "[]", "{}",
         "[1, [2]]", "{a: 1}", "1" * 5000, "[" * 3000, "a: b", "'", "", "0x10", "1_000", "2**32", "\x00", "é\n"]
VALUES = st.one_of(st.sampled_from(NASTY), st.integers().map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=12))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=12)
FEW = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_one_line(err: Exception) -> None:
    text = str(err)
    assert text and "\n" not in text and len(text) < 2000, repr(text[:300])


@FEW
@given(st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), VALUES), max_size=4))
def test_any_overrides_give_a_config_or_a_one_line_error(pairs):
    try:
        load_config(preset="countdown-tiny-grpo", overrides=[f"{key}={value}" for key, value in pairs])
    except UsageError as err:
        assert_one_line(err)


@FEW
@given(st.one_of(
    st.dictionaries(st.sampled_from(KEYS + ["inherit"]), JSON, max_size=5).map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=60),
    st.sampled_from([b"a: " + b"[" * 50_000, b"steps: " + b"9" * 5000, b"inherit: .", b"\xff\xfe: 1"])))
def test_any_config_file_gives_a_config_or_a_one_line_error(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_bytes(content)  # JSON is YAML: well-formed mappings of real keys reach the validation
        try:
            load_config(path=path)
        except UsageError as err:
            assert_one_line(err)


RECORD = st.dictionaries(st.sampled_from(["numbers", "input", "target", "completion"]) | st.text(max_size=4),
                         st.one_of(JSON, st.lists(st.integers(), min_size=1, max_size=7),
                                   st.integers(min_value=-10, max_value=10**7), st.text(max_size=30)),
                         max_size=5)


@FEW
@given(st.lists(st.one_of(RECORD.map(lambda r: json.dumps(r).encode()), st.binary(max_size=30), st.sampled_from([
    b"[" * 100_000, b'{"numbers": [1, 2], "target": ' + b"7" * 5000 + b"}", b'{"numbers": [1, 2], "target": 3\xff}'])),
    max_size=4))
def test_any_problem_records_give_a_result_or_a_one_line_error(lines):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "records.jsonl"
        path.write_bytes(b"\n".join(lines))
        try:
            load_problems(path)  # what train, eval and data check read before any model loads
        except UsageError as err:
            assert_one_line(err)
        for argv in (["score", "--data", str(path)], ["data", "check", "--train", str(path), "--test", str(path)]):
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(argv)
            assert code in (0, 2), (argv, code)
            if code == 2:
                assert len(err.getvalue().strip().splitlines()) == 1 and out.getvalue() == "", err.getvalue()


def _cli_error(capsys, argv) -> str:
    """The one error line of a CLI call that must fail with exit 2."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


DAMAGES = {
    "model.safetensors": lambda folder: (folder / "model.safetensors").write_bytes(b"\xff" * 64),
    "config.json": lambda folder: (folder / "config.json").write_text(
        json.dumps({**json.loads((folder / "config.json").read_text()), "hidden_size": -4})),
}
COMMANDS = {
    "eval": lambda m: ["eval", "--model", m, "--split", "test", "--limit", "1", "--k", "1"],
    "search": lambda m: ["search", "--model", m, "--numbers", "3", "5", "--target", "8", "--simulations", "2"],
    "testtime": lambda m: ["testtime", "--model", m, "--budgets", "64", "--limit", "1"],
    "train": lambda m: ["train", "--preset", "countdown-tiny-grpo", "--set", f"model={m}", "--steps", "1",
                        "--run-dir", str(Path(m).parent / "run")],
}


@pytest.mark.skipif(not (TINY_FOLDER / "config.json").is_file(), reason="the embedded tiny model is not shipped")
@pytest.mark.parametrize("damaged", DAMAGES)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_damaged_model_folder_is_one_line_naming_the_file(tmp_path, capsys, damaged, command):
    folder = tmp_path / "model"
    shutil.copytree(TINY_FOLDER, folder)
    DAMAGES[damaged](folder)
    line = _cli_error(capsys, COMMANDS[command](str(folder)))
    assert str(folder / damaged) in line, line


@pytest.mark.parametrize("model", ["x" * 10_000_000, "/" + "x" * 10_000_000, "./" + "x" * 300])
def test_a_huge_value_is_cut_in_the_error_line(tmp_path, capsys, model):
    config = tmp_path / "huge.yaml"
    config.write_text(f"inherit: countdown-tiny-grpo\nmodel: {model}\n")
    line = _cli_error(capsys, ["train", "--config", str(config), "--steps", "1", "--run-dir", str(tmp_path / "run")])
    assert len(line) < 1000 and "xxxx..." in line, line[:300]
