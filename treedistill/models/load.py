"""Load a policy (causal LM + tokenizer + value head) from a preset, a local folder or a hub id.

This file, presets.py and pretrained.py are the only places that know Hugging Face model classes;
the rest of the project talks to `Policy`.

Saving: `Policy.save` writes a folder that `AutoModelForCausalLM.from_pretrained` reads, plus
tokenizer files (with the chat template), `value_head/value_head.safetensors` and `treedistill.json`
(name, compact_prompt, and what the caller adds: a trained model's run and step). A LoRA policy is
saved with its adapter merged into a copy of the weights, so every such folder is a plain model
folder; pass `lora=` again to keep training with a fresh adapter.

A training run folder loads as its trained model: `RUN/final/` (FINAL_FOLDER, written at the end of
every run by `treedistill.export`).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from treedistill.algorithms.losses import token_logprobs
from treedistill.errors import UsageError, cut, shown
from treedistill.models.presets import PRESETS
from treedistill.models.pretrained import load_pretrained
from treedistill.models.value_head import ValueHead, load_value_head, save_value_head

__all__ = ["FINAL_FOLDER", "META_FILE", "Policy", "load_policy", "load_pretrained", "resolve_device", "resolve_dtype",
           "trained_model_folder", "wrap_policy", "write_model_files"]

META_FILE = "treedistill.json"
FINAL_FOLDER = "final"  # a run folder's trained model: RUN/final/
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
# Names of the token that closes a chat turn in common templates (ChatML, Llama 3, Gemma): generation
# stops there even when the tokenizer's eos is another token.
_CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None -> bfloat16 on CUDA, float32 elsewhere; strings as in `_DTYPES`."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    # Positions count real tokens only, so a left-padded row gets the same positions as unpadded
    # (as HF generate does); padding positions are clamped to 0 and masked anyway.
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)                      # [B, T]


@dataclass
class Policy:
    """A causal LM with its tokenizer and value head: what engines and trainers are handed.

    model: HF causal LM (possibly a peft model with a LoRA adapter).
    value_head: reads the final hidden state [B, T, H] -> [B, T]; None when not requested.
    compact_prompt: use the environment's compact prompt (the embedded tiny model).
    value_head_saved: the value head was read from the model folder (False: a fresh, untrained one).
    folder: the model folder it was read from (None: built in memory), where a value model may ship.
    """

    model: torch.nn.Module
    tokenizer: object
    value_head: ValueHead | None
    name: str
    compact_prompt: bool = False
    value_head_saved: bool = False
    folder: Path | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def context_length(self) -> int:
        """Longest sequence the model takes (prompt + completion), from its config."""
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 10**9)

    @property
    def num_parameters(self) -> int:
        """Parameters of the language model (tied embeddings once, value head excluded), for FLOP estimates."""
        seen = {p.data_ptr(): p.numel() for p in self.model.parameters()}
        return int(sum(seen.values()))

    @property
    def uses_lora(self) -> bool:
        return hasattr(self.model, "disable_adapter") and hasattr(self.model, "peft_config")

    @property
    def eos_token_ids(self) -> list[int]:
        """Token ids that end a completion: eos, the chat end token, generation_config's eos; de-duplicated."""
        ids: list[int] = []
        candidates = [self.tokenizer.eos_token_id]
        vocab = self.tokenizer.get_vocab()
        candidates += [vocab.get(t) for t in _CHAT_END_TOKENS]
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        candidates += gen_eos if isinstance(gen_eos, list) else [gen_eos]
        for i in candidates:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
        return ids

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.eos_token_ids[0])

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Chat template with the generation prompt, as token ids; refuses prompts the context cannot hold."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        if len(ids) >= self.context_length:
            raise UsageError(f"prompt is {len(ids)} tokens, too long for {self.name}'s context of "
                             f"{self.context_length} tokens (room is needed for at least one new token)")
        return ids

    def decode(self, ids) -> str:
        """Text of token ids, special tokens kept (stop and answer tags may be special tokens)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask [B, T] -> (logits [B, T, V], final hidden state [B, T, H]).

        The hidden state is the last entry of `output_hidden_states` (after the model's final norm):
        the tensor the value head reads, in training and in search alike.
        """
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=_position_ids(attention_mask), output_hidden_states=True,
                         use_cache=False)
        return out.logits, out.hidden_states[-1]                                    # [B, T, V], [B, T, H]

    def forward_packed(self, packing) -> tuple[torch.Tensor, torch.Tensor]:
        """A `algorithms.packing.Packing`'s sequences -> (logits [S, N, V], final hidden state [S, N, H]):
        its tree mask passed to transformers as a 4D mask, which the model uses as given
        (masking_utils._preprocess_mask_arguments returns a 4D mask as-is), with its explicit position ids.
        SDPA takes the boolean mask (True = attend); other attention implementations the additive one."""
        mask = packing.attention[:, None]                                           # [S, 1, N, N]
        if getattr(self.model.config, "_attn_implementation", "sdpa") != "sdpa":
            dtype = self.model.dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        out = self.model(input_ids=packing.input_ids, attention_mask=mask, position_ids=packing.position_ids,
                         output_hidden_states=True, use_cache=False)
        return out.logits, out.hidden_states[-1]                                    # [S, N, V], [S, N, H]

    @contextlib.contextmanager
    def reference(self) -> Iterator[Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None]:
        """With LoRA: yields ref(input_ids, attention_mask, packing=None) -> [B, T] token log-probs
        (`token_logprobs`: column 0 is 0; given a `Packing` of these rows, computed packed) through the
        DISABLED adapter (the base model), no gradient. Without LoRA: yields None (keep a frozen copy)."""
        if not self.uses_lora:
            yield None
            return

        def ref(input_ids: torch.Tensor, attention_mask: torch.Tensor, packing=None) -> torch.Tensor:
            with self.model.disable_adapter(), torch.no_grad():
                if packing is not None:  # the same rows, run packed (`algorithms.packing`)
                    return packing.logprobs(self.forward_packed(packing)[0], input_ids)  # [B, T]
                logits, _ = self.forward(input_ids, attention_mask)
            return token_logprobs(logits, input_ids)                                # [B, T]

        yield ref

    def save(self, folder: str | Path, *, meta: dict | None = None) -> Path:
        """Write a folder that `load_policy(folder)` reads back with identical outputs, whole or not
        at all (`checkpoint.atomic_folder`); `meta` adds entries to its META_FILE."""
        from treedistill.checkpoint import atomic_folder

        model = self.model
        if self.uses_lora:
            model = copy.deepcopy(model).merge_and_unload()
        with atomic_folder(folder) as tmp:
            write_model_files(tmp, model, self.tokenizer, self.value_head, name=self.name,
                              compact_prompt=self.compact_prompt, meta=meta)
        return Path(folder)


def write_model_files(folder: Path, model, tokenizer, value_head: ValueHead | None, *, name: str,
                      compact_prompt: bool, meta: dict | None = None) -> None:
    """The files `load_policy(folder)` reads: the model and tokenizer (save_pretrained), the value head
    when there is one, and META_FILE (the preset name; whether prompts are the compact messages; `meta`)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if value_head is not None:
        save_value_head(value_head, folder)
    meta = {"name": name, "compact_prompt": compact_prompt, **(meta or {})}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def trained_model_folder(path: Path) -> Path:
    """A run folder -> its trained model RUN/final/ (a training run's: config.yaml + checkpoints/; a
    warm-up's, `treedistill sft`: final/ alone); any other path unchanged."""
    if (path / "config.json").is_file():
        return path
    if (path / FINAL_FOLDER / "config.json").is_file():
        return path / FINAL_FOLDER
    if not ((path / "checkpoints").is_dir() or (path / "config.yaml").is_file()):
        return path
    if not (path / FINAL_FOLDER / "config.json").is_file():
        raise UsageError(f"{path} is a run folder without a trained model ({FINAL_FOLDER}/: the run has not "
                         f"finished, or predates it); write one with `treedistill export {path} "
                         f"--out {path / FINAL_FOLDER}`")
    return path / FINAL_FOLDER


def wrap_policy(model, tokenizer, *, name: str, device: torch.device, dtype: torch.dtype,
                folder: Path | None = None, value_head: bool = True, lora: dict | None = None,
                compact_prompt: bool = False, seed: int = 0) -> Policy:
    """Finish a loaded model: dtype/device, value head (saved one or fresh, seeded), optional LoRA."""
    model = model.to(device=device, dtype=dtype)
    model.eval()
    head = None
    saved = False
    if value_head:
        hidden = int(model.config.hidden_size)
        head = load_value_head(folder, hidden) if folder is not None else None
        saved = head is not None
        if head is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                head = ValueHead(hidden)
        head = head.to(device)
    if lora is not None:
        model = _attach_lora(model, lora)
    return Policy(model=model, tokenizer=tokenizer, value_head=head, name=name, compact_prompt=compact_prompt,
                  value_head_saved=saved, folder=folder)


_LORA_KEYS = {"r", "alpha", "target_modules", "dropout"}


def _attach_lora(model, lora: dict):
    if not isinstance(lora, dict) or not set(lora) <= _LORA_KEYS:
        raise UsageError(f"lora must be a dict with keys among {sorted(_LORA_KEYS)}, got {lora!r}")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise UsageError("LoRA needs peft: pip install peft") from e
    r = int(lora.get("r", 16))
    if r < 1:
        raise UsageError(f"lora r must be >= 1, got {r}")
    config = LoraConfig(r=r, lora_alpha=float(lora.get("alpha", 2 * r)),
                        target_modules=list(lora.get("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"])),
                        lora_dropout=float(lora.get("dropout", 0.0)), bias="none", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise UsageError(f"cannot attach LoRA: {str(e).splitlines()[0]}") from e


def load_policy(name_or_path: str | Path, *, dtype: str | torch.dtype | None = None,
                device: str | torch.device | None = None, value_head: bool = True,
                lora: dict | None = None) -> Policy:
    """A preset name (see presets.PRESETS), a local model folder, a training run folder (its
    FINAL_FOLDER) or a hub id -> Policy.

    dtype: None -> bfloat16 on CUDA, float32 on CPU. device: None -> CUDA when available.
    lora: {"r", "alpha", "target_modules", "dropout"} to train a LoRA adapter; None for full weights.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    key = str(name_or_path)
    if key in PRESETS:
        built = PRESETS[key](dtype=dt, device=dev)
        return wrap_policy(built.model, built.tokenizer, name=key, device=dev, dtype=dt, folder=built.folder,
                           value_head=value_head, lora=lora, compact_prompt=built.compact_prompt)
    path = Path(key).expanduser()
    try:
        exists = path.exists()
    except OSError:  # a name too long to be a path
        exists = False
    looks_like_hub_id = key.count("/") == 1 and not key.startswith((".", "/", "~")) and not exists
    if not exists and not looks_like_hub_id:
        raise UsageError(f"unknown model {shown(key)}: not a preset (known: {', '.join(sorted(PRESETS))}), "
                         "a model folder, or a hub id like Qwen/Qwen2.5-1.5B-Instruct")
    model, tokenizer, folder = load_pretrained(trained_model_folder(path) if path.is_dir() else key, dtype=dt)
    meta = {}
    if (folder / META_FILE).is_file():
        try:
            meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # ValueError: JSON, UTF-8
            raise UsageError(f"{folder / META_FILE} cannot be read ({cut(str(e))})") from None
        if not isinstance(meta, dict):
            raise UsageError(f"{folder / META_FILE} must hold a JSON object")
    return wrap_policy(model, tokenizer, name=str(meta.get("name", key)), device=dev, dtype=dt, folder=folder,
                       value_head=value_head, lora=lora, compact_prompt=bool(meta.get("compact_prompt", False)))
