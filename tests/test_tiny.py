"""The embedded tiny model: byte-level tokenizer, chat template, config, save/load round trip."""

import pytest

torch = pytest.importorskip("torch")

from treedistill.models.tiny import (  # noqa: E402
    SPECIAL_TOKENS,
    TAG_TOKENS,
    build_config,
    build_model,
    build_tokenizer,
)

TEXT = "<step>13-9=4 (4 5 7)</step>  <answer>(13-9)*5+7</answer>\tné"


def test_special_tokens_are_single_ids_in_order():
    tok = build_tokenizer()
    # 256 byte tokens then the 7 added ones, in SPECIAL_TOKENS order.
    assert len(tok) == 263
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.encode(token, add_special_tokens=False) == [256 + i]
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 258
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 256


def test_bytes_are_their_own_ids_and_text_round_trips_with_spaces():
    tok = build_tokenizer()
    # " a  b": space is byte 32, 'a' is 97; two spaces stay two tokens.
    assert tok.encode(" a  b", add_special_tokens=False) == [32, 97, 32, 32, 98]
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert tok.decode(ids) == TEXT
    # 'é' is two UTF-8 bytes -> two tokens.
    assert len(tok.encode("é", add_special_tokens=False)) == 2


def test_tags_survive_skip_special_tokens_but_chat_tokens_do_not():
    tok = build_tokenizer()
    ids = tok.encode(TEXT + "<|im_end|>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == TEXT
    assert all(t in tok.decode(ids, skip_special_tokens=True) for t in TAG_TOKENS)


def test_chat_template_is_chatml_without_system_message():
    tok = build_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "3 5 7 -> 31"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\n3 5 7 -> 31<|im_end|>\n<|im_start|>assistant\n"


def test_config_size_and_overrides():
    cfg = build_config()
    assert cfg.vocab_size == 264 and cfg.vocab_size >= len(build_tokenizer())
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 512
    assert build_config(num_hidden_layers=2).num_hidden_layers == 2
    n = sum(p.numel() for p in build_model(0).parameters())
    assert 500_000 < n < 10_000_000


def test_save_and_load_through_the_project_tokenizer_helper(tmp_path):
    from transformers import AutoModelForCausalLM

    from treedistill.models.tokenizers import load_tokenizer

    model, tok = build_model(0, num_hidden_layers=1), build_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded_tok = load_tokenizer(tmp_path)
    ids = loaded_tok.encode(TEXT, add_special_tokens=False)
    assert ids == tok.encode(TEXT, add_special_tokens=False)
    assert loaded_tok.decode(ids) == TEXT
    assert loaded_tok.chat_template == tok.chat_template
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_same_seed_same_weights():
    a, b = build_model(3, num_hidden_layers=1), build_model(3, num_hidden_layers=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
