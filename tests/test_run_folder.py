"""Run folders that cannot be silently corrupted: the lock, the marker, writability, write failures,
resuming past a damaged checkpoint and the model's context, each ending in a correct run or one line
and exit 2 (the in-process CLI, tiny model)."""

import errno
import fcntl
import json
import os
import shutil

import pytest

from treedistill import checkpoint
from treedistill.cli import main
from treedistill.config import TrainConfig, to_yaml
from treedistill.metrics import read_metrics
from treedistill.runs import RUN_MARKER, claim_run_folder, is_run_folder

# A step in well under a second (the preset's own sizes take minutes); checkpoints after every step.
SMALL = ["train_size=64", "test_size=8", "eval_problems=4", "eval_k=2", "eval_samples_logged=1",
         "max_new_tokens=24", "problems_per_step=2", "group_size=2", "minibatch_size=0", "checkpoint_every=1"]


def train(run, *args):
    flags = [flag for item in SMALL for flag in ("--set", item)]
    return main(["train", "--preset", "countdown-tiny-grpo", *flags, "--run-dir", str(run), *args])


def one_line_error(capsys, code, *fragments):
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the refusal must come before it."""
    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the run folder was checked")

    monkeypatch.setattr("treedistill.learner.load_policy", no_loading)


def test_a_second_run_on_a_held_folder_is_refused_naming_the_holder(tmp_path, capsys, no_model):
    run = tmp_path / "run"
    with claim_run_folder(run):  # as a running `train` holds it (flock: another open file, as another process)
        assert (run / RUN_MARKER).is_file()
        one_line_error(capsys, train(run), "is in use by another run", f"(pid {os.getpid()})")
    with claim_run_folder(run):  # released at the end of the block: the next run may take it
        pass
    fd = os.open(run / RUN_MARKER, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody holds it any more
    os.close(fd)


def test_a_folder_of_other_files_is_refused_and_left_untouched(tmp_path, capsys, no_model):
    run = tmp_path / "theirs"
    run.mkdir()
    files = {"config.yaml": "title: my thesis\n", "metrics.jsonl": '{"loss": 1}\n', "report.md": "# mine\n",
             "samples.jsonl": "{}\n"}
    for name, text in files.items():
        (run / name).write_text(text)
    one_line_error(capsys, train(run), "holds files that are not a treedistill run's", "config.yaml")
    assert {p.name: p.read_text() for p in run.iterdir()} == files


def test_run_folders_of_earlier_versions_count_as_runs(tmp_path):
    by_checkpoint, by_config, by_metrics, other = (tmp_path / name for name in ("a", "b", "c", "d"))
    checkpoint.save_checkpoint(by_checkpoint, 1, {"x": 1})
    by_config.mkdir()
    (by_config / "config.yaml").write_text(to_yaml(TrainConfig()))
    by_metrics.mkdir()
    (by_metrics / "metrics.jsonl").write_text(json.dumps({"step": 0, "kind": "eval", "eval_accuracy": 0.1}) + "\n")
    other.mkdir()
    (other / "config.yaml").write_text("method: x\nmodel: y\nenv: z\nauthor: me\nyear: 2020\n")
    assert [is_run_folder(p) for p in (by_checkpoint, by_config, by_metrics, other)] == [True, True, True, False]
    for folder in (by_checkpoint, by_config, by_metrics, tmp_path / "empty"):
        with claim_run_folder(folder):
            assert (folder / RUN_MARKER).is_file()


def test_a_run_dir_that_is_or_lies_under_a_file_is_refused(tmp_path, capsys, no_model):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    one_line_error(capsys, train(a_file), "is a file, not a folder")
    one_line_error(capsys, train(a_file / "run"), "cannot be created or written")
    assert a_file.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("read_only", ["", "checkpoints"])
def test_a_read_only_run_or_checkpoints_folder_is_refused_before_compute(tmp_path, capsys, no_model, read_only,
                                                                         make_read_only):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / RUN_MARKER).touch()
    folder = run / read_only
    make_read_only(folder)
    one_line_error(capsys, train(run), "cannot", str(folder))
    assert sorted(p.name for p in run.iterdir()) == [RUN_MARKER, "checkpoints"]


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_partial_folder(tmp_path, capsys, monkeypatch):
    def disk_full(folder, name, value):
        (folder / f"{name}.pt").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / f"{name}.pt"))

    monkeypatch.setattr(checkpoint, "_write_entry", disk_full)
    run = tmp_path / "run"
    one_line_error(capsys, train(run, "--steps", "1"), "No space left on device", "model.pt")
    assert list((run / "checkpoints").iterdir()) == []  # no .tmp-... folder with a partial model.pt


@pytest.mark.slow
def test_resume_auto_falls_back_past_a_truncated_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "--steps", "2") == 0
    model = run / "checkpoints" / "step-00000002" / "model.pt"
    model.write_bytes(model.read_bytes()[:1000])
    capsys.readouterr()
    assert train(run, "--steps", "3") == 0  # the finished run's lock was released: it resumes
    err = capsys.readouterr().err
    assert "warning: skipping checkpoint step-00000002" in err and "model.pt cannot be read" in err
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"] == [1, 2, 3]  # step 2 redone from step 1
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step-00000002", "step-00000003"]


@pytest.mark.slow
def test_max_new_tokens_beyond_the_models_context_is_refused_before_compute(tmp_path, capsys):
    run = tmp_path / "run"
    one_line_error(capsys, train(run, "--steps", "1", "--set", "max_new_tokens=32768"),
                   "max_new_tokens=32768 does not fit", "context of 512 tokens")
    assert not run.exists()  # the folder it had made is removed again: nothing was written


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_disk_and_the_run_resumes_once_there_is_room(tmp_path, capsys, disks):
    disk = disks.new("6m")  # the model's entry (4 MB) fits, the optimizer's (8 MB) does not: torch.save fails
    run = disk / "run"
    one_line_error(capsys, train(run, "--steps", "1"), "No space left on device", f"the disk mounted at {disk}",
                   str(run / "checkpoints"))
    assert list((run / "checkpoints").iterdir()) == []  # no temporary folder with a partial entry
    disks.remount(disk, "size=64m")
    assert train(run, "--steps", "1") == 0
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step-00000001"]


@pytest.mark.slow
def test_a_final_folder_write_killed_part_way_leaves_nothing_after_the_resume(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    assert train(run, "--steps", "1") == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = run / f".final.tmp-{int(dead.stdout)}"  # what a kill while final/ was written leaves
    shutil.copytree(run / "final", stale)
    assert train(run, "--steps", "2") == 0
    assert not stale.exists()
    assert json.loads((run / "final" / "treedistill.json").read_text())["trained"]["step"] == 2
