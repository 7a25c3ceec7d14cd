"""The embedded tiny model: a small Qwen2-architecture causal LM with a byte-level tokenizer.

It flows through exactly the same loading, prompting, generation and reward code as a real Qwen
model: same architecture class, a ChatML chat template, and the step / answer tags as single tokens
(so a step boundary is one token, as `</step>` is one "word" for the search).

Tokenizer: byte-level BPE over the 256 byte symbols with NO merges, so any text round-trips exactly
(spaces included) and every byte is one token; the special tokens below are added as single tokens.
The GPT-2 byte-to-unicode alphabet (tokenizers' `ByteLevel`) is used without its split regex and
without a prefix space, so the text is not rewritten before it is cut into bytes.

Size: 4 layers of width 128, intermediate 512, 4 heads / 2 KV heads (1.02M parameters, tied
embeddings). A model of this size learns the Countdown trace format on 2 CPU cores and generates
~15k tokens/s at batch 32 (HF generate, measured on 2 cores with torch 2.13 CPU); wider or deeper
models cost time per step that a 20-minute pretraining budget cannot spare.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from treedistill.envs.base import ANSWER_CLOSE, ANSWER_OPEN, STEP_CLOSE, STEP_OPEN

__all__ = [
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "TAG_TOKENS",
    "build_config",
    "build_model",
    "build_tokenizer",
]

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
CHAT_TOKENS = (PAD_TOKEN, IM_START, EOS_TOKEN)
TAG_TOKENS = (STEP_OPEN, STEP_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
# Order fixes the ids: 256 byte symbols first, then these (ids 256..262).
SPECIAL_TOKENS = CHAT_TOKENS + TAG_TOKENS

# ChatML, as Qwen2.5 writes it, without Qwen's default system message.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Embedding rows are padded to a multiple of this (263 tokens -> 264 rows): aligned matmuls.
_VOCAB_MULTIPLE = 8


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: 256 byte tokens (ids 0..255) + SPECIAL_TOKENS (ids 256..262)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet), "byte alphabet mismatch"
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    # Added on the core first, in SPECIAL_TOKENS order, so their ids are 256.. in that order. The
    # chat tokens are special; the step / answer tags are added tokens that are NOT special (like
    # Qwen2.5's <tool_call>): still one id each and never split, but kept by skip_special_tokens.
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_TOKENS])
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    tok.chat_template = CHAT_TEMPLATE
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(256, 256 + len(SPECIAL_TOKENS))), f"special token ids moved: {ids}"
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of `ByteLevel`).

    Source: openai/gpt-2 encoder.py `bytes_to_unicode`; restated so the ids are the byte values.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = {}
    extra = 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def build_config(**overrides) -> Qwen2Config:
    """Qwen2Config of the tiny model; keyword overrides replace any field (e.g. num_hidden_layers=2)."""
    n_tokens = 256 + len(SPECIAL_TOKENS)
    vocab_size = -(-n_tokens // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=256 + SPECIAL_TOKENS.index(IM_START),
        eos_token_id=256 + SPECIAL_TOKENS.index(EOS_TOKEN),
        pad_token_id=256 + SPECIAL_TOKENS.index(PAD_TOKEN),
    )
    settings.update(overrides)
    return Qwen2Config(**settings)


def build_model(seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    """A freshly initialised tiny model (deterministic for a seed)."""
    import torch

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(build_config(**overrides))
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = model.config.pad_token_id
    return model
