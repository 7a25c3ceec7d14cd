"""Errors the CLI turns into one clear line instead of a traceback, and the pieces of those lines."""

from __future__ import annotations

import errno
import os


class UsageError(ValueError):
    """Bad input from the user (flag, config, data file, model path): exit code 2, one line."""


def shown(value, width: int = 60) -> str:
    """A user's value for an error line: its repr, cut to `width` characters (an absurdly long integer
    by its size: its repr alone would take seconds to build)."""
    if isinstance(value, int) and abs(value) >= 10**30:
        return f"an integer of {len(format(value, 'x')) * 1.2:.0f} digits"
    return cut(repr(value), width)


def cut(text: str, width: int = 200) -> str:
    """`text` cut to `width` characters (a path, a library's message): an error line stays a line."""
    return text if len(text) <= width else text[:width] + "..."


def os_reason(err: OSError) -> str:
    """An OSError as "what: which file" (without Python's "[Errno N]"); a full disk also names the
    mount point of the file's disk."""
    if not (err.strerror and err.filename):
        return cut(str(err))
    what = err.strerror
    if err.errno == errno.ENOSPC:
        what += f" (the disk mounted at {mount_point(str(err.filename))})"
    return f"{what}: {cut(str(err.filename))}"


def mount_point(path: str) -> str:
    """The mount point of the disk that holds `path` (which need not exist yet)."""
    path = os.path.abspath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path
