"""JSON Lines files: reading with errors that name the file and line, writing atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from treedistill.errors import UsageError

__all__ = ["read_jsonl", "read_records", "write_jsonl"]


def read_jsonl(path) -> list[tuple[int, dict]]:
    """Return [(line number, record)] for every non-blank line; each record must be a JSON object.

    Raises UsageError "FILE:LINE: ..." for a line that is not a JSON object, and for a file that
    cannot be read or is not UTF-8.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read {path}: {err}") from None
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise UsageError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
        records.append((line_no, record))
    return records


def read_records(path, validate) -> list:
    """`validate(record)` for every record of the file, in order; a ValueError it raises becomes a
    UsageError "FILE:LINE: ..." (as do the errors of `read_jsonl`)."""
    out = []
    for line_no, record in read_jsonl(path):
        try:
            out.append(validate(record))
        except ValueError as err:
            raise UsageError(f"{path}:{line_no}: {err}") from None
    return out


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
