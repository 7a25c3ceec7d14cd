"""Reading a training configuration: YAML presets and files, `--set key=value` overrides, and the
resolved config written back as YAML.

The presets in `treedistill/presets/*.yaml` spell out every setting a method depends on, and a preset
may `inherit:` another so that two files differ only where the methods do. Values are coerced to the
fields' declared types (`_coerce`), and the config is checked when it is built (`fields.py`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path

import yaml

from treedistill.config.fields import TrainConfig
from treedistill.errors import UsageError, shown
from treedistill.search.contracts import RENAMED

__all__ = ["PRESET_DIR", "list_presets", "load_config", "to_yaml"]

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


def list_presets() -> list[str]:
    """Names of the shipped presets (files starting with `_` are shared bases, not presets)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A preset or config file as a dict, its `inherit:` chain merged in (the child wins)."""
    path = path.resolve()
    if path in seen:
        raise UsageError(f"config: inherit cycle through {' -> '.join(p.name for p in (*seen, path))}")
    try:
        data = yaml.safe_load(path.read_bytes()) or {}
    except OSError as err:
        raise UsageError(f"config: cannot read {path} ({err.strerror})") from None
    except RecursionError:
        raise UsageError(f"config: {path} is nested too deeply") from None
    except (yaml.YAMLError, ValueError) as err:  # ValueError: an integer of more than 4,300 digits
        raise UsageError(f"config: {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config: {path} must hold a mapping of settings, got {type(data).__name__}")
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent.strip() or "\0" in parent:
        raise UsageError(f"config: {path.name}: inherit must name a preset or a YAML file (got {shown(parent)})")
    parent_path = PRESET_DIR / f"{parent}.yaml"
    if not parent_path.is_file():
        parent_path = (path.parent / parent).resolve()
    if not parent_path.is_file():
        raise UsageError(f"config: {path.name} inherits {shown(parent)}, which is neither a preset "
                         f"({', '.join(list_presets())}) nor a file next to it")
    return _merge(_read_yaml(parent_path, (*seen, path)), data)


def _merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise UsageError(f"--set expects key=value (got {shown(text)})")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # not YAML, too many digits, nested too deeply
        value = raw
    return key.strip().split("."), value


def _coerce(value, annotation, key: str, base=None):
    """`value` (from YAML or --set) as the field's declared type, or a UsageError naming the key; a
    nested settings mapping overrides `base` (the field's default) where given."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in options:
                return None
        inner = [option for option in options if option is not type(None)]
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise UsageError(f"config: {key} must be a mapping of {', '.join(_field_names(annotation))}")
        return _build(annotation, value, prefix=f"{key}.", base=base)
    if origin is tuple:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # `--set eval_at_tokens=5000`: one entry
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"config: {key} must be a list (got {shown(value)})")
        return tuple(_coerce(item, typing.get_args(annotation)[0], key) for item in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise UsageError(f"config: {key} must be true or false (got {shown(value)})")
    if annotation is int:
        try:
            number = value
            if isinstance(value, str):  # digits exactly (a float would round them), else 1e6 and the like
                number = int(value) if value.strip().lstrip("+-").isdigit() else float(value)
            if isinstance(number, bool) or not isinstance(number, (int, float)) or number != int(number):
                raise ValueError
            return int(number)
        except (TypeError, ValueError, OverflowError):
            raise UsageError(f"config: {key} must be an integer (got {shown(value)})") from None
    if annotation is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError, OverflowError):
            raise UsageError(f"config: {key} must be a number (got {shown(value)})") from None
    if annotation is str:
        if isinstance(value, (dict, list)) or value is None:
            raise UsageError(f"config: {key} must be a string (got {shown(value)})")
        return str(value)
    raise TypeError(f"config field {key} has an unsupported type {annotation!r}")


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _build(cls, data: dict, prefix: str = "", base=None):
    """`cls` from a mapping of its fields (over `base`, an instance, when given)."""
    hints = typing.get_type_hints(cls)
    names = _field_names(cls)
    unknown = [key for key in data if key not in names]
    if unknown:
        key = unknown[0]
        if prefix == "search." and key in RENAMED:
            raise UsageError(f"config: {prefix}{key} is now called {prefix}{RENAMED[key]}")
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f"; did you mean {prefix}{close[0]}?" if close else ""
        name = key if isinstance(key, str) and key.isprintable() and len(key) <= 60 else shown(key)
        raise UsageError(f"config: unknown key {prefix}{name}{hint} (known: {', '.join(names)})")
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if dataclasses.is_dataclass(f.default)}
    defaults.update({f.name: f.default_factory() for f in dataclasses.fields(cls)
                     if f.default_factory is not dataclasses.MISSING})
    values = {key: _coerce(value, hints[key], f"{prefix}{key}", defaults.get(key)) for key, value in data.items()}
    return dataclasses.replace(base, **values) if base is not None else cls(**values)


def load_config(preset: str | None = None, path: str | Path | None = None,
                overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """Defaults, then a preset (treedistill/presets/NAME.yaml) or a YAML file, then `key=value`
    overrides (dotted keys reach nested settings: `search.simulations=64`), validated."""
    if preset is not None and path is not None:
        raise UsageError("give either a preset or a config file, not both")
    data: dict = {}
    if preset is not None:
        file = PRESET_DIR / f"{preset}.yaml"
        if preset.startswith("_") or not file.exists():
            raise UsageError(f"unknown preset {preset!r}; presets: {', '.join(list_presets())}")
        data = _read_yaml(file)
    elif path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise UsageError(f"config file not found: {file}")
        data = _read_yaml(file)
    for text in overrides:
        keys, value = _parse_override(text)
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            node[key] = dict(child) if isinstance(child, dict) else {}
            node = node[key]
        node[keys[-1]] = value
    return _build(TrainConfig, data)


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML that `load_config(path=...)` reads back to an equal config;
    the derived sizes follow as comments."""
    data = _plain(dataclasses.asdict(cfg))
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    derived = "".join(f"#   {key}: {value}\n" for key, value in cfg.derived().items())
    return text + "# derived:\n" + derived


def _plain(value):
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
