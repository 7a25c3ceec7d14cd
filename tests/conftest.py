"""Test settings: offline, one torch thread, GPU tests skipped without CUDA; small disks (tmpfs) for write failures."""

import os
import subprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)



class _Disks:
    """Folders on fresh tmpfs mounts: disks that really fill up or really are read-only."""

    def __init__(self, root):
        self.root, self.mounted = root, []

    def new(self, size: str):
        """A folder on a new tmpfs of `size` (e.g. "2m"); skips the test where mounts are not permitted."""
        folder = self.root / f"disk{len(self.mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        self.mounted.append(folder)
        return folder

    @staticmethod
    def remount(folder, options: str) -> None:
        """New mount options for a disk of `new`: "ro", "rw,size=64m"."""
        subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True)


@pytest.fixture
def disks(tmp_path):
    """`disks.new(size)`: a folder on its own small tmpfs, unmounted at the end of the test."""
    made = _Disks(tmp_path)
    yield made
    for folder in reversed(made.mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def make_read_only(monkeypatch):
    """`make_read_only(folder)`: the folder made read-only for the rest of the test (writable again after).
    Root writes into read-only folders, so there the file system is made to say no instead: the
    writability probe's temporary file in that folder raises EROFS."""
    import errno
    import tempfile
    from pathlib import Path

    folders = []
    real = tempfile.TemporaryFile

    def make(folder):
        folders.append(Path(folder))
        if os.geteuid() == 0 and len(folders) == 1:
            def read_only_fs(*args, dir=None, **kwargs):
                if dir is not None and Path(dir) in folders:
                    raise OSError(errno.EROFS, "Read-only file system", str(dir))
                return real(*args, dir=dir, **kwargs)

            monkeypatch.setattr(tempfile, "TemporaryFile", read_only_fs)
        Path(folder).chmod(0o500)

    yield make
    for folder in folders:
        folder.chmod(0o700)
