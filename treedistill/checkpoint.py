"""Atomic checkpoints: a checkpoint either exists complete or does not exist at all.

Layout: RUN_DIR/checkpoints/step-00000042/ holds one `<name>.pt` per entry of the saved state (model,
value head, optimizer, RNG states, data position, counters, config, ...) and a `complete` marker.

Writing goes to RUN_DIR/checkpoints/.tmp-<step>-<pid>/: every file is written and fsynced, the
`complete` marker is written LAST, the folder is fsynced, and only then renamed to step-<step:08d>/
(`os.rename` within one file system is atomic). A process killed at any moment therefore leaves
either the previous checkpoints untouched plus a stale `.tmp-*` folder, which `latest_checkpoint`
ignores and removes, or the new checkpoint complete. Old checkpoints are deleted marker first, so a
half-deleted folder is never taken for a complete one. A write that fails (a full disk) removes its
temporary folder. A checkpoint damaged after it was written (a truncated or emptied file, a broken
marker) is skipped by `load_latest`, which falls back to the newest one that loads and says so.

Entries are saved with `torch.save` and loaded with `torch.load(weights_only=True)`: values must be
tensors, numbers, strings, None and lists / tuples / dicts of those (state dicts are), never
arbitrary objects, so loading a checkpoint cannot execute code. `rng_state()` packs every random
generator's state in that form.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from treedistill.errors import UsageError

__all__ = [
    "FOLDER_MARKER",
    "MARKER",
    "atomic_folder",
    "check_replaceable",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest",
    "remove_stale_temporaries",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

MARKER = "complete"
# Written last into every folder `atomic_folder` writes: the files written, which alone may be replaced.
FOLDER_MARKER = ".treedistill-folder"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_ENTRY = re.compile(r"[A-Za-z0-9_.-]+")
_TMP_DIR = re.compile(r"^\.(?:tmp|old)-(\d+)-(\d+)$")
_PLAIN = (torch.Tensor, int, float, str, bool, type(None))


def _checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Write a whole folder or none of it: yields an empty temporary sibling to fill; when the block
    ends without an error, FOLDER_MARKER (the list of the files written) is added and the folder takes
    `folder`'s place in one rename (a folder already there is moved aside first and removed after). An
    error, or a kill at any moment, leaves `folder` as it was, and no folder this call created.

    Only an empty folder or one this function wrote (`check_replaceable`) is replaced, so that pointing
    an output at a folder of other files loses nothing. Temporary siblings left by a killed writer are
    removed first (`remove_stale_temporaries`).
    """
    folder = Path(folder)
    check_replaceable(folder)
    remove_stale_temporaries(folder)
    created = [p for p in (folder.parent, *folder.parent.parents) if not p.exists()]
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        written = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        (tmp / FOLDER_MARKER).write_text(json.dumps({"written_by": "treedistill", "files": written}, indent=1) + "\n")
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:  # innermost first; only folders this call made, and only when empty
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old)
    else:
        os.rename(tmp, folder)
    _fsync_dir(folder.parent)


def remove_stale_temporaries(folder: str | Path) -> None:
    """Remove what a writer of `folder` killed mid-way left beside it (`atomic_folder`'s
    `.NAME.tmp-PID` and `.NAME.old-PID` of processes no longer alive). An `.old-PID` is the previous
    folder, moved aside just before the new one took its place: it is put back when `folder` is missing."""
    folder = Path(folder)
    if not folder.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(folder.name)}\.(tmp|old)-(\d+)$")
    for path in folder.parent.iterdir():
        match = pattern.match(path.name)
        if not match or _pid_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not folder.exists():
            os.rename(path, folder)
        else:
            shutil.rmtree(path, ignore_errors=True)


# The files of a model folder that an earlier version wrote without FOLDER_MARKER (save_pretrained,
# tokenizer files, value head, treedistill.json, pretrain.json): such a folder may still be replaced.
_LEGACY_FILES = re.compile(r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens"
                           r"|vocab|adapter_config|treedistill|pretrain|model\.safetensors\.index)\.json|merges\.txt"
                           r"|chat_template\.jinja|tokenizer\.model|(model|adapter_model)(-\d+-of-\d+)?\.safetensors"
                           r"|(value_head/)?value_head\.safetensors")


def _foreign_files(folder: Path) -> list[str]:
    """The files in `folder` that `atomic_folder` did not write there (all of them when it holds no
    FOLDER_MARKER and is not an earlier version's model folder)."""
    present = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())
    try:
        written = json.loads((folder / FOLDER_MARKER).read_text())["files"]
        return [name for name in present if name != FOLDER_MARKER and name not in written]
    except FileNotFoundError:
        if (folder / "treedistill.json").is_file():
            return [name for name in present if not _LEGACY_FILES.fullmatch(name)]
    except (OSError, ValueError, TypeError, KeyError):
        pass  # a damaged marker proves nothing
    return present


def check_replaceable(folder: str | Path) -> None:
    """UsageError unless `atomic_folder` may replace `folder`: absent, an empty folder, or a folder that
    holds only the files that treedistill wrote there (FOLDER_MARKER lists them)."""
    folder = Path(folder)
    under = next((p for p in folder.parents if p.exists() and not p.is_dir()), None)
    if under is not None:
        raise UsageError(f"{folder} lies under {under}, which is a file, not a folder: choose another path")
    if not folder.exists() and not folder.is_symlink():
        return
    if not folder.is_dir():
        raise UsageError(f"{folder} exists and is not a folder: choose another path")
    try:
        foreign = _foreign_files(folder)
    except OSError as err:
        raise UsageError(f"{folder} cannot be read ({err.strerror})") from None
    if foreign:
        shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
        raise UsageError(f"{folder} holds files that treedistill did not write ({shown}); it is replaced only "
                         "when empty or written by treedistill: choose another path")


def _check_plain(value, where: str) -> None:
    """Only what `torch.load(weights_only=True)` reads back may be saved."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"checkpoint entry {where}: dict key {key!r} is not a str or int")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(f"checkpoint entry {where} holds a {type(value).__name__}; save tensors, numbers, "
                    f"strings and lists/dicts of those (e.g. a state_dict(), or rng_state())")


class _Writes:
    """A file that keeps the OSError of a failed write: torch.save swallows it and raises a RuntimeError
    ("enforce fail at inline_container.cc ... unexpected pos") that never says why (a full disk)."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def _write_entry(folder: Path, name: str, value) -> None:
    """Raises OSError naming the file when the write fails (ENOSPC for a full disk)."""
    path = folder / f"{name}.pt"
    with open(path, "wb") as f:
        writes = _Writes(f)
        try:
            torch.save(value, writes)
        except RuntimeError:
            if writes.error is None:
                raise
            raise OSError(writes.error.errno, writes.error.strerror, str(path)) from None
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run_dir: str | Path, step: int, state: dict, *, keep: int | None = None) -> Path:
    """Write `state` (name -> value) atomically as checkpoint `step`; keep the newest `keep`.

    Returns the checkpoint folder RUN_DIR/checkpoints/step-<step:08d>/."""
    assert step >= 0, f"checkpoint step must be >= 0, got {step}"
    for name, value in state.items():
        assert _ENTRY.fullmatch(name) and name != MARKER, f"bad checkpoint entry name {name!r}"
        _check_plain(value, name)
    root = _checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        for name, value in state.items():
            _write_entry(tmp, name, value)
        marker = {"step": step, "entries": sorted(state), "time": time.time()}
        with open(tmp / MARKER, "w") as f:
            json.dump(marker, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk or a failed write leaves no partial folder behind
        raise
    final = root / f"step-{step:08d}"
    if final.exists():
        # the same step saved again (e.g. after a resume): move the old one out of the way first;
        # in between, the previous checkpoints remain the newest complete ones
        old = root / f".old-{step}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        _remove(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    if keep is not None:
        assert keep >= 1, f"keep must be >= 1, got {keep}"
        for path in list_checkpoints(run_dir)[:-keep]:
            _remove(path)
    return final


def _remove(path: Path) -> None:
    """Delete a checkpoint folder, marker first, so an interrupted delete never looks complete."""
    marker = path / MARKER
    if marker.exists():
        marker.unlink()
    shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = _checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / MARKER).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest COMPLETE checkpoint of a run, or None. Removes the leftovers of interrupted writes
    and deletes (temporary folders of dead processes, step folders without a marker)."""
    root = _checkpoints_dir(run_dir)
    if not root.is_dir():
        return None
    for path in root.iterdir():
        tmp = _TMP_DIR.match(path.name)
        if tmp and not _pid_alive(int(tmp.group(2))):
            shutil.rmtree(path, ignore_errors=True)
        elif _STEP_DIR.match(path.name) and not (path / MARKER).is_file():
            shutil.rmtree(path, ignore_errors=True)
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *,
                    entries: tuple[str, ...] | None = None, mmap: bool = False) -> dict:
    """The state saved in a complete checkpoint folder (name -> value), plus "step". entries: load only
    those of these names that the checkpoint holds (None: all); mmap: memory-map the files
    (`torch.load(mmap=True)`: what is never touched, e.g. the optimizer state, is never read).

    Raises UsageError "PATH: why" when the folder has no marker, its marker is damaged, or an entry
    cannot be read back whole (truncated, empty or overwritten files)."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        raise UsageError(f"{path} is not a complete checkpoint (no '{MARKER}' marker)")
    try:
        info = json.loads(marker.read_bytes())
        listed, step = info["entries"], info["step"]
        if not (isinstance(listed, list) and all(isinstance(e, str) and _ENTRY.fullmatch(e) for e in listed)
                and type(step) is int):
            raise ValueError("unexpected content")
    except (OSError, ValueError, TypeError, KeyError, RecursionError) as err:
        raise UsageError(f"{path}: damaged '{MARKER}' marker ({type(err).__name__}: {err})") from None
    state = {}
    for name in [e for e in listed if entries is None or e in entries]:
        try:
            state[name] = torch.load(path / f"{name}.pt", map_location=map_location, weights_only=True, mmap=mmap)
        except Exception as err:  # noqa: BLE001 - a damaged file makes torch.load raise RuntimeError,
            # EOFError, KeyError, UnpicklingError, OSError...: each one means "this checkpoint is broken"
            why = str(err).strip().splitlines()[0].split(". ")[0][:200] if str(err).strip() else "file cut short"
            raise UsageError(f"{path}: {name}.pt cannot be read ({type(err).__name__}: {why})") from None
    state.setdefault("step", step)
    return state


def load_latest(run_dir: str | Path, *, warn=None, load=load_checkpoint) -> tuple[Path, dict] | None:
    """(folder, state) of the run's newest checkpoint that loads completely, or None when it has no
    complete checkpoint. A newer checkpoint that cannot be read back (a truncated or emptied file, a
    damaged marker) is skipped: `warn(message)` says which and why (default: a line on stderr).
    load: how a checkpoint is read (default `load_checkpoint`, every entry; it raises UsageError for a
    damaged one). Raises UsageError when checkpoints exist but none of them loads."""
    if warn is None:
        def warn(message):
            print(f"warning: {message}", file=sys.stderr)
    if latest_checkpoint(run_dir) is None:  # also removes the leftovers of interrupted writes
        return None
    reasons = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load(path)
        except UsageError as err:
            reasons.append(str(err))
            warn(f"skipping checkpoint {path.name}, it cannot be loaded: {err}")
    raise UsageError(f"no checkpoint of {run_dir} loads ({'; '.join(reasons)}); use another --run-dir")


def rng_state() -> dict:
    """The state of every random generator the loop draws from: python, numpy, torch CPU, CUDA."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state()` returned: the next draws repeat those that followed the save."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
