"""Models: the only package that knows Hugging Face model classes.

`load_policy` turns a preset name, a local folder or a hub id into a `Policy` (causal LM, tokenizer,
value head); `load_tokenizer` is the one way tokenizers are loaded.
"""

from treedistill.models.load import Policy, load_policy
from treedistill.models.presets import PRESETS
from treedistill.models.tokenizers import build_qwen25_tokenizer, cache_root, load_tokenizer
from treedistill.models.value_head import ValueHead, load_value_head, save_value_head

__all__ = [
    "PRESETS",
    "Policy",
    "ValueHead",
    "build_qwen25_tokenizer",
    "cache_root",
    "load_policy",
    "load_tokenizer",
    "load_value_head",
    "save_value_head",
]
