"""Named data splits: `load_split` asks the environment class (`Env.load_split`) for its problems.

Countdown: the project's own splits, generated once by
`treedistill data countdown --train 20000 --test 820 --seed 42 --out treedistill/data/countdown`
and shipped inside the package (disjoint on (sorted numbers, target)).
GSM8K: the real data set, read from a user's path (a file, or a folder holding train.jsonl and
test.jsonl), else from the Hugging Face hub through the optional `datasets` package (envs/gsm8k.py).
"""

from __future__ import annotations

from pathlib import Path

from treedistill.envs import ENVS
from treedistill.errors import UsageError

REPO_ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "test")


def resolve_path(path: str | Path) -> Path:
    """A data path as given, or, when it is relative and missing from the working directory, relative
    to the checkout, so that a relative path in a saved config reads the same file from any working
    directory."""
    path = Path(path).expanduser()
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        return REPO_ROOT / path
    return path


def load_split(env_name: str, split: str = "test", path: str | Path | None = None) -> list[dict]:
    """Problems of `env_name`'s `split`, or of the JSONL file at `path` when given."""
    if env_name not in ENVS:
        raise UsageError(f"unknown env {env_name!r}; known: {', '.join(ENVS)}")
    if path is None and split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    return ENVS[env_name].load_split(split, None if path is None else resolve_path(path))
