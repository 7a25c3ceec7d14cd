"""The OS lock that holds a folder for one process (a run folder, a comparison's folder): a second
process is refused at once, told the holder's pid."""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

from treedistill.errors import UsageError

__all__ = ["hold", "open_lock"]


def open_lock(folder: Path, name: str) -> int:
    """The lock file `folder/name` opened for `hold` (the folder made if needed); OSError as raised."""
    folder.mkdir(parents=True, exist_ok=True)
    return os.open(folder / name, os.O_RDWR | os.O_CREAT, 0o644)


def hold(fd: int, *, busy: str, holder: str) -> None:
    """Take an exclusive lock on the open lock file `fd` (fcntl.flock: released when `fd` is closed or
    the process ends, however it ends) and write `holder`, followed by this process's pid, into it.
    Held by another process: a UsageError, `busy` with `{pid}` replaced by the holder's pid."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        found = re.search(rb"pid (\d+)", os.pread(fd, 200, 0))
        raise UsageError(busy.replace("{pid}", found[1].decode() if found else "?")) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{holder}, held while running by pid {os.getpid()}\n".encode(), 0)
