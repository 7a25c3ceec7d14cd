"""JSON Lines files: reading with errors that name the file and line, writing atomically, appending,
and cutting a run's log back to a resumed step."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from treedistill.errors import UsageError

__all__ = ["append_jsonl", "read_jsonl", "read_records", "truncate_jsonl", "writable_folder", "write_jsonl"]


def read_jsonl(path) -> list[tuple[int, dict]]:
    """Return [(line number, record)] for every non-blank line; each record must be a JSON object.

    Raises UsageError "FILE:LINE: ..." for a line that is not UTF-8, not JSON, nested too deeply or
    holding an integer of more than 4,300 digits (Python's limit), or not a JSON object; and
    "cannot read FILE" for a file that cannot be read.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror or err}") from None
    records = []
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UsageError(f"{path}:{line_no}: not UTF-8 (byte {err.start + 1} of the line)") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
        except RecursionError:
            raise UsageError(f"{path}:{line_no}: JSON nested too deeply") from None
        except ValueError as err:  # an integer of more than 4,300 digits
            raise UsageError(f"{path}:{line_no}: not usable JSON ({str(err).split(';')[0]})") from None
        if not isinstance(record, dict):
            raise UsageError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
        records.append((line_no, record))
    return records


def read_records(path, validate) -> list:
    """`validate(record)` for every record of the file, in order; a ValueError it raises becomes a
    UsageError "FILE:LINE: ..." (as do the errors of `read_jsonl`), and so does a file without records."""
    out = []
    for line_no, record in read_jsonl(path):
        try:
            out.append(validate(record))
        except ValueError as err:
            raise UsageError(f"{path}:{line_no}: {err}") from None
    if not out:
        raise UsageError(f"{path}: no records (the file is empty)")
    return out


def writable_folder(folder) -> Path:
    """`folder`, created if missing and checked writable by creating a file in it, or a UsageError
    saying why not (a file in the way, no permission, a read-only file system): before any compute."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UsageError(f"cannot write to {folder}: {err.strerror or err}") from None
    return folder


def write_jsonl(path, records) -> None:
    """Write one JSON object per line; the file appears complete or not at all (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a data file is meant to be read by others
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def append_jsonl(path: Path, records: list[dict]) -> None:
    """Append one JSON object per line (a run's samples.jsonl grows at each evaluation)."""
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def truncate_jsonl(path: Path, step: int | None) -> None:
    """Keep the records of steps <= step (None: none), so a resumed run rewrites what followed."""
    kept = []
    if step is not None and path.exists():
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue  # a line cut short by a kill (or damaged by hand)
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line + "\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
