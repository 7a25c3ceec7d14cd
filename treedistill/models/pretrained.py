"""Read a Hugging Face model folder or hub id into (model, tokenizer, folder).

Its own module so that presets.py (whose builders read folders) and load.py (which looks presets up)
both import it at the top, without importing each other both ways.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from treedistill.errors import UsageError
from treedistill.models.tokenizers import load_tokenizer

__all__ = ["load_pretrained"]

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _check_folder(folder: Path) -> None:
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / f).is_file() for f in _WEIGHT_FILES):
        missing.append("model weights (model.safetensors)")
    if not (folder / "tokenizer.json").is_file():
        missing.append("tokenizer.json")
    if missing:
        raise UsageError(f"{folder} is not a model folder: missing {', '.join(missing)} "
                         "(expected config.json, model weights and tokenizer.json, as save_pretrained writes)")


def load_pretrained(name_or_path: str | Path, *, dtype: torch.dtype):
    """(model, tokenizer, folder) from a local folder or a hub id; the hub only when reachable.

    A hub id is first looked up in the local HF cache (local_files_only=True), so an offline machine
    fails in milliseconds instead of retrying for ~48 s.
    """
    from transformers import AutoModelForCausalLM

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        _check_folder(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError, KeyError) as e:
            raise UsageError(f"cannot load the model in {path}: {str(e).splitlines()[0]}") from e
        return model, load_tokenizer(path), path
    if path.exists():
        raise UsageError(f"{path} is a file; pass a model folder (config.json, model weights, tokenizer.json)")
    hub_id = str(name_or_path)
    how = (f"cannot reach the Hugging Face hub for {hub_id!r}: download it elsewhere "
           "(e.g. `huggingface-cli download ID --local-dir DIR`) and pass the local folder path instead")
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(hub_id, local_files_only=True))
    except (OSError, ValueError) as e:  # not cached (FileNotFoundError) or not a valid repo id (ValueError)
        if _offline() or not _hub_reachable():
            raise UsageError(how) from e
        try:
            folder = Path(snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"]))
        except (OSError, ValueError) as e2:  # HfHubHTTPError (not found, auth) and network errors are OSErrors
            raise UsageError(f"cannot download {hub_id!r}: {str(e2).splitlines()[0]}; "
                             "pass a local model folder instead") from e2
    return load_pretrained(folder, dtype=dtype)
