"""The training configuration: its fields and checks (`fields.py`), and how it is read from presets,
YAML files and `--set key=value` overrides (`files.py`)."""

from treedistill.config.fields import (
    LIMITS,
    MAX_COUNT,
    MAX_NUMBER,
    MAX_SEED,
    MAX_TEMPERATURE,
    MAX_TOKENS,
    ForkSettings,
    LoraSettings,
    SearchSettings,
    TrainConfig,
)
from treedistill.config.files import PRESET_DIR, list_presets, load_config, to_yaml

__all__ = ["LIMITS", "MAX_COUNT", "MAX_NUMBER", "MAX_SEED", "MAX_TEMPERATURE", "MAX_TOKENS", "PRESET_DIR",
           "ForkSettings", "LoraSettings", "SearchSettings", "TrainConfig", "list_presets", "load_config", "to_yaml"]
