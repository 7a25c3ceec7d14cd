"""Atomic checkpoints: interrupted writes are never returned, keep-last-k, exact RNG round trip."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from treedistill import checkpoint
from treedistill.checkpoint import (
    FOLDER_MARKER,
    MARKER,
    atomic_folder,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from treedistill.errors import UsageError

REPO = Path(__file__).resolve().parents[1]


def small_state(step):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(),
            "data": {"epoch": 0, "position": 17 * step}, "counters": {"generated_tokens": 1000 * step},
            "config": "method: mcts\n"}


def test_round_trip_of_model_optimizer_and_plain_entries(tmp_path):
    state = small_state(3)
    path = save_checkpoint(tmp_path, 3, state)
    assert path.name == "step-00000003" and (path / MARKER).is_file()
    loaded = load_checkpoint(path)
    assert loaded["step"] == 3 and loaded["data"] == {"epoch": 0, "position": 51}
    for key, value in state["model"].items():
        torch.testing.assert_close(loaded["model"][key], value, atol=0, rtol=0)
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert loaded["config"] == "method: mcts\n"


def test_unsafe_values_are_refused_at_save_time(tmp_path):
    with pytest.raises(TypeError, match="holds a ndarray"):
        save_checkpoint(tmp_path, 1, {"data": {"order": np.arange(3)}})
    assert latest_checkpoint(tmp_path) is None


def test_a_folder_without_marker_is_never_returned_and_stale_tmp_is_cleaned(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": torch.ones(2)})
    root = tmp_path / "checkpoints"
    # an interrupted write of a later step by a process that no longer exists
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = root / f".tmp-2-{int(dead.stdout)}"
    stale.mkdir()
    (stale / "x.pt").write_bytes(b"partial")
    # a later step folder whose delete (or copy by hand) left no marker
    (root / "step-00000005").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert not stale.exists() and not (root / "step-00000005").exists()
    with pytest.raises(UsageError, match="not a complete checkpoint"):
        load_checkpoint(root / ".tmp-2-1")


def test_keep_last_k_and_saving_a_step_again(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, {"step_value": torch.tensor(step)}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
    save_checkpoint(tmp_path, 5, {"step_value": torch.tensor(50)}, keep=2)
    assert load_checkpoint(latest_checkpoint(tmp_path))["step_value"].item() == 50
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]


def test_rng_round_trip_gives_identical_draws():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state: it must survive too
    saved = rng_state()

    def draws():
        return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.normal(),
                torch.rand(3).tolist(), torch.randint(0, 100, (4,)).tolist())

    first = draws()
    draws()  # move every generator on
    set_rng_state(saved)
    assert draws() == first


def test_rng_state_survives_a_checkpoint_file(tmp_path):
    torch.manual_seed(7)
    path = save_checkpoint(tmp_path, 1, {"rng": rng_state()})
    expected = torch.rand(5)
    torch.rand(5)
    set_rng_state(load_checkpoint(path)["rng"])
    assert torch.equal(torch.rand(5), expected)


WRITER = textwrap.dedent("""
    import sys, time
    import torch
    import treedistill.checkpoint as ckpt

    run_dir = sys.argv[1]
    ckpt.save_checkpoint(run_dir, 1, {"w": torch.zeros(4)})
    write = ckpt._write_entry

    def slow_write(folder, name, value):  # a slow disk: the kill lands in the middle of the write
        write(folder, name, value)
        print("wrote", name, flush=True)
        time.sleep(0.05)

    ckpt._write_entry = slow_write
    big = {f"shard{i:02d}": torch.randn(256, 1024) for i in range(40)}  # 40 MiB
    ckpt.save_checkpoint(run_dir, 2, big)
    print("done", flush=True)
""")


def test_sigkill_during_a_large_checkpoint_write_is_never_returned(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        written = 0
        deadline = time.time() + 60
        while written < 3 and time.time() < deadline:  # wait until step 2 is part-written
            line = proc.stdout.readline()
            assert line, "the writer exited before writing step 2"
            written += line.startswith("wrote")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    root = tmp_path / "checkpoints"
    tmp_dirs = [p for p in root.iterdir() if p.name.startswith(".tmp-2-")]
    assert len(tmp_dirs) == 1 and not (tmp_dirs[0] / MARKER).exists()  # killed mid-write indeed
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step-00000001"
    assert torch.equal(load_checkpoint(latest)["w"], torch.zeros(4))
    assert not tmp_dirs[0].exists()  # cleaned up
    # the run goes on: the same step is written again, completely this time
    save_checkpoint(tmp_path, 2, {"w": torch.ones(4)})
    assert latest_checkpoint(tmp_path).name == "step-00000002"


def test_atomic_folder_replaces_a_model_folder_whole_or_not_at_all(tmp_path):
    folder = tmp_path / "model"
    with atomic_folder(folder) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "stale.bin").write_text("old")
    assert sorted(p.name for p in folder.iterdir()) == [FOLDER_MARKER, "config.json", "stale.bin"]
    with pytest.raises(ValueError, match="half way"):
        with atomic_folder(folder) as tmp:
            (tmp / "config.json").write_text('{"new": 1}')
            raise ValueError("half way")
    # the error left the previous folder as it was and no temporary folder behind
    assert (folder / "config.json").read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with atomic_folder(folder) as tmp:
        (tmp / "config.json").write_text('{"new": 1}')
    assert sorted(p.name for p in folder.iterdir()) == [FOLDER_MARKER, "config.json"]  # nothing of the old folder is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_folder_refuses_a_folder_of_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="holds files that treedistill did not write"):
        with atomic_folder(tmp_path):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]



@pytest.mark.parametrize("damage", ["truncate", "empty", "marker"])
def test_load_latest_falls_back_past_a_damaged_newest_checkpoint_and_says_why(tmp_path, damage):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"model": {"w": torch.full((4096,), float(step))}})
    newest = tmp_path / "checkpoints" / "step-00000002"
    if damage == "truncate":
        data = (newest / "model.pt").read_bytes()
        (newest / "model.pt").write_bytes(data[:len(data) // 2])
    elif damage == "empty":
        (newest / "model.pt").write_bytes(b"")
    else:
        (newest / MARKER).write_text('{"step": 2, "entr')
    (tmp_path / "checkpoints" / ".tmp-3-999999999").mkdir()  # an interrupted write (no such pid)
    warnings = []
    path, state = checkpoint.load_latest(tmp_path, warn=warnings.append)
    assert path.name == "step-00000001" and state["model"]["w"][0].item() == 1.0
    assert len(warnings) == 1 and "step-00000002" in warnings[0]
    assert ("model.pt cannot be read" if damage != "marker" else "damaged 'complete' marker") in warnings[0]
    assert not (tmp_path / "checkpoints" / ".tmp-3-999999999").exists()
    with pytest.raises(UsageError, match="model.pt cannot be read|damaged"):
        load_checkpoint(newest)  # named directly: one line, no traceback


def test_load_latest_refuses_a_run_whose_every_checkpoint_is_damaged(tmp_path):
    assert checkpoint.load_latest(tmp_path) is None  # no checkpoints: start
    save_checkpoint(tmp_path, 1, {"x": torch.ones(2)})
    (tmp_path / "checkpoints" / "step-00000001" / "x.pt").write_bytes(b"")
    with pytest.raises(UsageError, match="no checkpoint of .* loads"):
        checkpoint.load_latest(tmp_path, warn=lambda message: None)


def test_a_failed_write_leaves_no_temporary_folder_and_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    save_checkpoint(tmp_path, 1, {"x": torch.ones(2)})

    def disk_full(folder, name, value):
        (folder / f"{name}.pt").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / f"{name}.pt"))

    monkeypatch.setattr(checkpoint, "_write_entry", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, 2, {"x": torch.ones(2)})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001"]


def test_a_model_folder_of_an_earlier_version_is_replaced_unless_it_holds_other_files(tmp_path):
    folder = tmp_path / "model"  # as written before FOLDER_MARKER existed
    (folder / "value_head").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "treedistill.json",
                 "value_head/value_head.safetensors"):
        (folder / name).write_text("{}")
    checkpoint.check_replaceable(folder)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="notes.txt"):
        checkpoint.check_replaceable(folder)


def test_stale_temporaries_of_a_killed_folder_write_are_removed_or_put_back(tmp_path):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    folder = tmp_path / "final"
    (tmp_path / f".final.tmp-{dead}").mkdir()      # killed while writing: removed
    (tmp_path / f".final.old-{dead}").mkdir()      # killed between its two renames: the previous folder
    (tmp_path / f".final.tmp-{os.getpid()}").mkdir()  # a live writer's: kept
    checkpoint.remove_stale_temporaries(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".final.tmp-{os.getpid()}", "final"]
