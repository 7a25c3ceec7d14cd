"""Equal-compute comparisons: the plan (budgets, overrides), where a run folder stands, and an
end-to-end `treedistill compare` that reuses a finished run and continues one from its checkpoint."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from treedistill.cli import main
from treedistill.compare import STEPS_CAP, RunSpec, plan_runs, run_all, run_state, segment_budgets
from treedistill.config import load_config, to_yaml
from treedistill.errors import UsageError
from treedistill.metrics import ComputeCounters, MetricsLogger

# Sizes that make a step take well under a second on the tiny model.
SMALL = [
    "train_size=64", "test_size=8", "eval_problems=4", "eval_k=2", "eval_samples_logged=2",
    "max_new_tokens=24", "problems_per_step=2", "group_size=2", "bon_n=3", "minibatch_size=2",
    "search.simulations=4", "search.parallel=2", "search.problems_at_once=2", "search.k_children=2",
    "search.step_max_tokens=8", "search.max_depth=3",
]


def test_segment_budgets_by_hand():
    # 100 * i / 3 for i = 1, 2, 3 -> 33.3, 66.7, 100 -> rounded 33, 67, 100
    assert segment_budgets(100, 3) == (33, 67, 100)
    assert segment_budgets(60_000, 1) == (60_000,)
    assert segment_budgets(2, 4) == (1, 2)  # duplicates merged: 0.5 -> 1 (at least 1), 1, 1.5 -> 2, 2
    for budget, evaluations in [(0, 3), (10, 0)]:
        with pytest.raises(UsageError):
            segment_budgets(budget, evaluations)


def test_plan_lets_the_budget_end_every_run(tmp_path):
    specs = plan_runs({"GRPO": "countdown-tiny-grpo", "MCTS": "countdown-tiny-mcts"}, seeds=[0, 1],
                      budget=900, out_dir=tmp_path, evaluations=3)
    assert [(s.label, s.seed) for s in specs] == [("pre-RL", 0), ("GRPO", 0), ("GRPO", 1), ("MCTS", 0), ("MCTS", 1)]
    assert specs[0].run_dir == str(tmp_path / "pre-rl") and specs[0].pre_rl
    assert specs[2].run_dir == str(tmp_path / "countdown-tiny-grpo" / "seed-1")
    cfg = specs[4].config()
    assert (cfg.seed, cfg.steps, cfg.eval_every, cfg.budget_generated_tokens) == (1, STEPS_CAP, 0, 900)
    # evaluated when the run passes 300 and 600 tokens (and at its end); the model before RL once, apart
    assert (cfg.eval_at_tokens, cfg.eval_before_rl) == ((300, 600), False)
    # with a budget the schedule is in fractions of it: the linear decay of a reference preset ends
    # at the budget, not at a step count
    decay = plan_runs({"q": "countdown-qwen1.5b-mcts"}, seeds=[0], budget=10, out_dir=tmp_path)[1].config()
    assert decay.steps == STEPS_CAP and decay.has_budget and decay.lr_multiplier(5, 0.75) == 0.25
    # steps and eval_every given by the user win
    mine = plan_runs({"g": "countdown-tiny-grpo"}, seeds=[0], budget=10, out_dir=tmp_path,
                     overrides=["steps=7", "eval_every=2"])[1].config()
    assert (mine.steps, mine.eval_every) == (7, 2)


@pytest.mark.parametrize("presets, seeds, match", [
    ({"a": "countdown-tiny-grpo", "b": "countdown-tiny-grpo"}, [0], "once"),
    ({"a": "no-such-preset"}, [0], "unknown preset"),
    ({}, [0], "at least one preset"),
    ({"a": "countdown-tiny-grpo"}, [], "at least one seed"),
])
def test_plan_refuses_bad_input(tmp_path, presets, seeds, match):
    with pytest.raises(UsageError, match=match):
        plan_runs(presets, seeds=seeds, budget=10, out_dir=tmp_path)


def _fake_run(spec: RunSpec, tokens_per_step: int, steps: int, checkpoint: int, evals=(0,)):
    """A run folder as `train` leaves it: `steps` logged, a complete checkpoint at `checkpoint`."""
    counters = ComputeCounters(params=1000)
    with MetricsLogger(spec.run_dir) as logger:
        for step in range(steps + 1):
            if step:
                counters.add_rollout(generated_tokens=tokens_per_step)
                logger.log(step, {"kind": "train", **counters.as_dict()})
            if step in evals:
                logger.log(step, {"kind": "eval", "eval_accuracy": 0.1, "eval_stderr": 0.01, **counters.as_dict()})
    folder = Path(spec.run_dir) / "checkpoints" / f"step-{checkpoint:08d}"
    folder.mkdir(parents=True)
    (folder / "complete").write_text(json.dumps({"step": checkpoint, "entries": []}))


def test_run_state_reads_checkpoint_and_evaluations(tmp_path):
    spec = plan_runs({"g": "countdown-tiny-grpo"}, seeds=[0], budget=250, out_dir=tmp_path)[1]
    assert run_state(spec).checkpoint_step == 0 and not run_state(spec).done
    # 3 steps of 100 tokens logged, checkpoint at step 3 with its evaluation: done (300 >= 250)
    _fake_run(spec, 100, steps=3, checkpoint=3, evals=(0, 3))
    state = run_state(spec)
    assert (state.checkpoint_step, state.checkpoint_tokens, state.done) == (3, 300, True)
    # killed after logging step 4 of a longer budget: resumes from step 3, not done
    longer = plan_runs({"g": "countdown-tiny-grpo"}, seeds=[0], budget=500, out_dir=tmp_path)[1]
    with MetricsLogger(spec.run_dir, resume_step=3) as logger:
        logger.log(4, {"kind": "train", "rollout_generated_tokens": 400})
    state = run_state(longer)
    assert (state.checkpoint_step, state.checkpoint_tokens, state.done) == (3, 300, False)
    assert run_state(spec).done  # the shorter budget is still met by the checkpoint of step 3


def test_a_folder_of_another_config_is_refused(tmp_path):
    spec = plan_runs({"g": "countdown-tiny-grpo"}, seeds=[0], budget=250, out_dir=tmp_path)[1]
    other = load_config("countdown-tiny-grpo", overrides=["lr=0.1"])
    (tmp_path / "countdown-tiny-grpo" / "seed-0").mkdir(parents=True)
    (tmp_path / "countdown-tiny-grpo" / "seed-0" / "config.yaml").write_text(to_yaml(other))
    with pytest.raises(UsageError, match="different config .*lr"):
        run_all([spec])


@pytest.mark.slow
def test_compare_reuses_a_finished_run_and_continues_a_longer_budget(tmp_path, capsys):
    out = tmp_path / "cmp"
    flags = [flag for item in SMALL for flag in ("--set", item)]

    def compare(budget):
        code = main(["compare", "--presets", "countdown-tiny-grpo", "--seeds", "1", "--budget-generated-tokens",
                     str(budget), "--evaluations", "1", "--jobs", "1", "--out", str(out), *flags, "--json"])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return json.loads(captured.out.strip().splitlines()[-1])

    run, pre = out / "countdown-tiny-grpo" / "seed-0", out / "pre-rl"
    first = compare(1)  # one step reaches a budget of 1 token
    assert first["ran"] == [str(pre), str(run)] and first["reused"] == [] and first["failed"] == []
    assert (out / "report.md").is_file() and (out / "curves.png").is_file() and (out / "final.png").is_file()
    metrics = run / "metrics.jsonl"
    before, lines = metrics.stat().st_mtime_ns, metrics.read_text().splitlines()
    tokens = first["rows"][1]["generated_tokens"]
    assert [json.loads(x)["step"] for x in lines] == [1, 1]  # train 1, eval 1: the model before RL is in pre-rl/
    (initial,) = [json.loads(x) for x in (pre / "metrics.jsonl").read_text().splitlines()]
    assert (initial["step"], initial["kind"], len(initial["eval_per_problem"])) == (0, "eval", 4)
    assert first["rows"][0]["label"] == "pre-RL" and first["rows"][0]["mean"] == initial["eval_accuracy"]
    assert {d["versus"] for d in first["differences"]} == {"pre-RL"}  # one trained row: it is the best

    again = compare(1)  # finished: not run again
    assert again["ran"] == [] and again["reused"] == [str(pre), str(run)]
    assert metrics.stat().st_mtime_ns == before

    longer = compare(int(tokens) + 1)  # continues from the step-1 checkpoint: one more step
    assert longer["ran"] == [str(run)]
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [(r["step"], r["kind"]) for r in records] == [(1, "train"), (1, "eval"), (2, "train"), (2, "eval")]
    assert metrics.read_text().splitlines()[:2] == lines  # step 1 kept as it was, not re-run
    assert longer["rows"][1]["steps"] == 2


def test_demo_budget_follows_its_time_model():
    from treedistill.commands import demo

    # (0.75 x 15 min x 60 s - 320 s fixed) / 1.24 ms per token = 286,290 tokens -> 280,000
    assert demo.DEFAULT_BUDGET == demo.budget_for(15) == 280_000
    # (0.75 x 20 x 60 - 320) / 1.24e-3 = 467,741 -> 460,000
    assert demo.budget_for(20) == 460_000
    with pytest.raises(UsageError, match="too short"):
        demo.budget_for(7)  # 0.75 x 7 x 60 = 315 s < 320 s fixed


@pytest.mark.parametrize("argv, message", [
    (["demo", "--minutes", "5"], "too short"),
    (["demo", "--budget-generated-tokens", "0"], "must be >= 1"),
    (["compare", "--presets", "countdown-tiny-grpo", "--seeds", "0", "--budget-generated-tokens", "9"], "--seeds"),
    (["compare", "--presets", " , ", "--budget-generated-tokens", "9"], "at least one preset"),
    # refused at once, before a config is built (a billion seeds took minutes of building configs)
    (["compare", "--presets", "countdown-tiny-grpo", "--seeds", "1000000000", "--budget-generated-tokens", "9"],
     "--seeds must be in 1..1,000"),
    (["compare", "--presets", "countdown-tiny-grpo", "--evaluations", "1000000000", "--budget-generated-tokens",
      "9"], "evaluations must be in 1..1,000"),
])
def test_bad_demo_and_compare_arguments_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------
# A comparison running in another process (the real CLI): its folder is held, and a SIGKILL of it
# leaves no worker behind.


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:  # ended meanwhile
            continue
        if re.search(rf"^PPid:\s*{pid}$", text, re.M):
            found.append(int(status.parent.name))
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # ended meanwhile
        return b""


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()  # a zombie has ended
    except OSError:
        return False


@contextlib.contextmanager
def _compare_in_another_process(out: Path, log: Path):
    """(process, its spawned workers) of a `treedistill compare` into `out` with a budget it will not
    reach soon, once a worker runs; everything it started is killed at the end."""
    flags = [flag for item in SMALL for flag in ("--set", item)]
    argv = [sys.executable, "-m", "treedistill", "compare", "--presets", "countdown-tiny-grpo", "--seeds", "1",
            "--budget-generated-tokens", "10000000", "--evaluations", "1", "--jobs", "1", "--out", str(out), *flags]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    workers: list[int] = []
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    try:
        deadline = time.monotonic() + 180
        while not workers and time.monotonic() < deadline and proc.poll() is None:
            workers = [c for c in _children(proc.pid) if b"spawn_main" in _cmdline(c)]
            time.sleep(0.2)
        assert workers, log.read_text()[-2000:]
        yield proc, workers
    finally:
        for pid in [proc.pid, *workers]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_second_compare_into_a_held_folder_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "cmp"
    with _compare_in_another_process(out, tmp_path / "first.log") as (first, _):
        code = main(["compare", "--presets", "countdown-tiny-grpo", "--seeds", "1", "--budget-generated-tokens",
                     "1", "--evaluations", "1", "--jobs", "1", "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and f"in use by another comparison (pid {first.pid})" in err, err
        assert len(err.strip().splitlines()) == 1
        assert first.poll() is None  # the first goes on


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_compare_killed_with_sigkill_leaves_no_worker_behind(tmp_path):
    with _compare_in_another_process(tmp_path / "cmp", tmp_path / "log") as (proc, workers):
        started = _children(proc.pid)  # the workers and multiprocessing's resource tracker
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 15
        while any(map(_alive, started)) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [_cmdline(pid)[:100] for pid in started if _alive(pid)]
        assert set(workers) <= set(started) and not left, left


@pytest.mark.slow
def test_compare_at_equal_flops_stops_each_run_at_the_first_step_past_the_budget(tmp_path, capsys):
    out = tmp_path / "flops"
    flags = [flag for item in SMALL for flag in ("--set", item)]
    budget = 1.5e10
    assert main(["compare", "--presets", "countdown-tiny-grpo,countdown-tiny-mcts-tree", "--seeds", "1",
                 "--budget-flops", str(budget), "--evaluations", "2", "--out", str(out), *flags, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["budget_flops"] == budget and summary["budget_generated_tokens"] is None
    assert summary["evaluation_points"] == [int(budget / 2), int(budget)]
    for preset in ("countdown-tiny-grpo", "countdown-tiny-mcts-tree"):
        records = [json.loads(line) for line in (out / preset / "seed-0" / "metrics.jsonl").read_text().splitlines()]
        trains = [r for r in records if r["kind"] == "train"]
        flops = [r["total_flops"] for r in trains]
        assert len(trains) >= 2 and flops[-2] < budget <= flops[-1], (preset, flops)  # the first step past it
        # evaluated after the step that passed budget / 2, and at the end
        halfway = next(r["step"] for r in trains if r["total_flops"] >= budget / 2)
        assert [r["step"] for r in records if r["kind"] == "eval"] == [halfway, trains[-1]["step"]]
    report = (out / "report.md").read_text()
    assert f"Every run had the same budget of {budget:.3g} rollout + learning FLOPs" in report
    assert "at equal FLOPs" in report.split("## Result")[1].split("##")[0] and "at equal FLOPs" in summary["headline"]
    # the same command again: both runs reached the budget, nothing is trained twice
    assert main(["compare", "--presets", "countdown-tiny-grpo,countdown-tiny-mcts-tree", "--seeds", "1",
                 "--budget-flops", str(budget), "--evaluations", "2", "--out", str(out), *flags, "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["ran"] == [] and len(again["reused"]) == 3
    # a report made only from earlier runs does not claim this invocation's seconds as theirs
    assert "Every run (3) was made by an earlier invocation" in (out / "report.md").read_text()
