"""Kill-and-resume equivalence: a run SIGKILLed at a precise point and resumed with `--resume auto`
ends with the same metrics (wall-clock fields aside), the same samples and the same weights as an
uninterrupted run.

The kill is a test-only bootstrap, not a hook in the library: the child process wraps one function of
the real code (the progress update that ends a step, or the checkpoint's file writer) so that it
SIGKILLs its own process right after a chosen call, then runs the real CLI (`treedistill.cli.main`).
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from treedistill.checkpoint import latest_checkpoint, load_checkpoint
from treedistill.cli import main

ROOT = Path(__file__).resolve().parents[1]

# Child process: KILL_POINT=between-steps kills right after step KILL_AT ended (its metrics logged,
# no checkpoint of it yet); KILL_POINT=checkpoint-write kills inside the write of checkpoint KILL_AT,
# after its model file and before the optimizer file and the completion marker.
BOOTSTRAP = r"""
import os, signal, sys
import treedistill.checkpoint as checkpoint
import treedistill.metrics as metrics

point, at = os.environ["KILL_POINT"], int(os.environ["KILL_AT"])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "between-steps":
    update = metrics.Progress.update
    def update_then_die(self, n=1, **postfix):
        update(self, n, **postfix)
        if self.count == at:
            die()
    metrics.Progress.update = update_then_die
elif point == "checkpoint-write":
    write = checkpoint._write_entry
    def write_then_die(folder, name, value):
        write(folder, name, value)
        if name == "model" and folder.name.startswith(f".tmp-{at}-"):
            die()
    checkpoint._write_entry = write_then_die
else:
    raise SystemExit(f"unknown KILL_POINT {point}")

from treedistill.cli import main
sys.exit(main(sys.argv[1:]))
"""

SETTINGS = [
    "train_size=64", "test_size=8", "eval_problems=4", "eval_k=2", "eval_samples_logged=2", "max_new_tokens=24",
    "problems_per_step=3", "search.simulations=6", "search.parallel=2", "search.problems_at_once=2",
    "search.k_children=2", "search.step_max_tokens=8", "search.max_depth=3",
    "eval_every=2", "checkpoint_every=2", "keep_checkpoints=3",
]
STEPS = 4


def _args(run_dir, preset="countdown-tiny-mcts", steps=STEPS, extra=()):
    flags = [flag for item in (*SETTINGS, *extra) for flag in ("--set", item)]
    return ["train", "--preset", preset, "--steps", str(steps), *flags, "--run-dir", str(run_dir)]


def _comparable(run_dir):
    """metrics.jsonl and samples.jsonl lines without wall-clock fields (keys ending in _s)."""
    import json

    out = {}
    for name in ("metrics.jsonl", "samples.jsonl"):
        records = [json.loads(line) for line in (run_dir / name).read_text().splitlines()]
        out[name] = [{k: v for k, v in r.items() if not k.endswith("_s")} for r in records]
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(_args(run)) == 0
    return run


def _kill_and_resume(tmp_path, point, at, args=_args):
    run = tmp_path / "run"
    env = {**os.environ, "KILL_POINT": point, "KILL_AT": str(at), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-c", BOOTSTRAP, *args(run)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    return run


def _assert_same_run(run, reference, steps=STEPS):
    got, want = _comparable(run), _comparable(reference)
    assert got["metrics.jsonl"] == want["metrics.jsonl"]
    assert got["samples.jsonl"] == want["samples.jsonl"]
    a, b = load_checkpoint(latest_checkpoint(run)), load_checkpoint(latest_checkpoint(reference))
    assert a["loop"]["step"] == b["loop"]["step"] == steps
    for name in ("model", "value_head"):
        assert (a.get(name) is None) == (b.get(name) is None), name
        if a.get(name) is None:  # a method without a value head
            continue
        assert a[name].keys() == b[name].keys()
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name


@pytest.mark.slow
def test_killed_between_steps_and_resumed_matches_the_uninterrupted_run(tmp_path, uninterrupted):
    run = _kill_and_resume(tmp_path, "between-steps", 3)
    # step 3 was logged but never checkpointed: the newest complete checkpoint is step 2
    assert latest_checkpoint(run).name == "step-00000002"
    assert '"step": 3, "kind": "train"' in (run / "metrics.jsonl").read_text()
    assert main([*_args(run), "--resume", "auto"]) == 0
    _assert_same_run(run, uninterrupted)


@pytest.mark.slow
def test_killed_during_a_checkpoint_write_and_resumed_matches_the_uninterrupted_run(tmp_path, uninterrupted):
    run = _kill_and_resume(tmp_path, "checkpoint-write", 4)
    # the half-written checkpoint 4 is a temporary folder, never taken for a complete one
    leftovers = [p.name for p in (run / "checkpoints").iterdir()]
    assert any(name.startswith(".tmp-4-") for name in leftovers) and "step-00000004" not in leftovers
    assert latest_checkpoint(run).name == "step-00000002"
    assert main([*_args(run), "--resume", "auto"]) == 0
    assert not any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())
    _assert_same_run(run, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["countdown-tiny-grpo", "countdown-tiny-ppo", "countdown-tiny-mcts-tree"])
def test_every_method_killed_and_resumed_matches_the_uninterrupted_run(tmp_path, preset):
    # Their rollouts (sampled groups, PPO's value head, the tree rows) and updates differ from mcts's. 3 steps
    # with a checkpoint after each; killed inside the write of checkpoint 2 (step 2 logged): resumed from
    # step 1, steps 2 and 3 run again.
    def args(run_dir):
        return _args(run_dir, preset, steps=3, extra=("checkpoint_every=1", "eval_every=0", "eval_problems=2",
                                                      "problems_per_step=2", "group_size=4"))

    reference = tmp_path / "uninterrupted"
    assert main(args(reference)) == 0
    run = _kill_and_resume(tmp_path, "checkpoint-write", 2, args)
    assert latest_checkpoint(run).name == "step-00000001"
    assert '"step": 2, "kind": "train"' in (run / "metrics.jsonl").read_text()
    assert main([*args(run), "--resume", "auto"]) == 0
    _assert_same_run(run, reference, steps=3)
