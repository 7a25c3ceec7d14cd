"""Named data splits: where each environment's train and test problems come from.

Countdown: the project's own splits, generated once by
`treedistill data countdown --train 20000 --test 820 --seed 42 --out treedistill/data/countdown`
and shipped inside the package (disjoint on (sorted numbers, target)).
GSM8K: the real data set, read from `../shared/data/gsm8k/` beside the checkout or a user path.
"""

from __future__ import annotations

from pathlib import Path

from treedistill.errors import UsageError

DATA_DIR = Path(__file__).parent / "data"
REPO_ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "test")


def resolve_path(path: str | Path) -> Path:
    """A data path as given, or, when it is relative and missing from the working directory, relative
    to the checkout (presets name `../shared/data/...`, which sits beside the repository)."""
    path = Path(path).expanduser()
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        return REPO_ROOT / path
    return path


def _countdown(split: str, path: str | Path | None) -> list[dict]:
    from treedistill.envs.countdown import load_problems

    return load_problems(path or DATA_DIR / "countdown" / f"{split}.jsonl")


def _gsm8k(split: str, path: str | Path | None) -> list[dict]:
    from treedistill.envs.gsm8k import load_gsm8k

    return load_gsm8k(split, path=path)


LOADERS = {"countdown": _countdown, "gsm8k": _gsm8k}


def load_split(env_name: str, split: str = "test", path: str | Path | None = None) -> list[dict]:
    """Problems of `env_name`'s `split`, or of the JSONL file at `path` when given."""
    if env_name not in LOADERS:
        raise UsageError(f"unknown env {env_name!r}; known: {', '.join(LOADERS)}")
    if path is None and split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    return LOADERS[env_name](split, None if path is None else resolve_path(path))
