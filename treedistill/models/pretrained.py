"""Read a Hugging Face model folder or hub id into (model, tokenizer, folder).

Its own module so that presets.py (whose builders read folders) and load.py (which looks presets up)
both import it at the top, without importing each other both ways.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
from safetensors import SafetensorError

from treedistill.errors import UsageError, cut, shown
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


# Sizes of a model's config.json that must be positive integers: a negative one builds no model
# ("Trying to create tensor with negative dimension") and zero ones a model with nothing in it.
_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "vocab_size", "max_position_embeddings")


def _first_line(err: Exception) -> str:
    return cut(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)


def _read_config(folder: Path):
    """The folder's config.json as a transformers config, its sizes checked (UsageError naming the file)."""
    from transformers import AutoConfig

    path = folder / "config.json"
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:  # ValueError: JSON, unknown model_type
        raise UsageError(f"{path} cannot be read: {_first_line(e)}") from None
    for name in _SIZES:
        value = getattr(config, name, None)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise UsageError(f"{path}: {name} must be a positive integer (got {shown(value)})")
    return config


def load_pretrained(name_or_path: str | Path, *, dtype: torch.dtype):
    """(model, tokenizer, folder) from a local folder or a hub id; the hub only when reachable.

    A hub id is first looked up in the local HF cache (local_files_only=True), so an offline machine
    fails in milliseconds instead of retrying for ~48 s.
    """
    from transformers import AutoModelForCausalLM

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        _check_folder(path)
        config = _read_config(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
        except SafetensorError as e:
            weights = next(path / f for f in _WEIGHT_FILES if (path / f).is_file())
            raise UsageError(f"{weights}: damaged model weights, cannot be read ({_first_line(e)})") from None
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # RuntimeError: e.g. shapes the weights do not fit
            raise UsageError(f"cannot load the model in {path}: {_first_line(e)}") from None
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
