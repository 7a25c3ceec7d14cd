"""The fast generation path: our own decode loop on the transformers model's weights, with a key/value
cache shared across the search tree.

Why hand-written. vLLM and SGLang are the fast engines of the field, but they do not fit where this
project must run: CPU laptops and CI boxes without CUDA, inside one Python process (no server to
start, no second copy of the weights beside the one being trained). And no library shares a KV cache
with an MCTS tree: HF `generate` re-encodes every prefix, so expanding a node recomputes everything
its parent already computed (prompt tokens per generated token of 10 and more in search).

What it does (each part is checked against HF in tests/test_engine_native.py):
- Prefill once per distinct prefix, then copy its keys/values to the n sample rows.
- Prefixes of different lengths in one batch: each row is `[pad | cached prefix | pad | new suffix]`
  in one preallocated buffer, with a boolean key mask and explicit per-row positions (RoPE angles are
  those of the unpadded sequence, so padding changes no number beyond float summation order).
- Per-row stop at a stop string (one id compare when the string is one token, else a decode of the
  row's tail) or an end-of-sequence id; finished rows leave the batch (their buffer rows are dropped
  with one `index_select`), so they cost nothing afterwards.
- Sampling on the device: temperature, then top-p exactly as HF's `TopPLogitsWarper` (so a seeded
  draw matches `generate` while the batch has the same rows); temperature 0 is greedy.
- A radix prefix cache (engine/prefix_cache.py): a request reuses the keys/values of its longest
  cached prefix and computes only the rest; the keys/values of prefix + step are stored as each row
  finishes, so expanding a child later costs one token of prefill. `value` and `logprobs` use it too.

The forward pass. Calling the HF model's `forward` costs ~3.2 ms per decode step for the 0.9M-parameter
tiny model on one CPU thread, almost all of it Python (mask building, cache objects, output classes;
measured, transformers 5.24), against ~1 ms for the same arithmetic written out. So the layer loop is
written here, calling the model's OWN modules (projections, norms, MLP, rotary embedding) on its own
weights, for the Llama / Qwen2 family that every preset uses; nothing is copied or re-implemented
beyond attention plumbing, and tests compare its logits with the HF forward. It also keeps this file
free of the cache API, which changed between transformers 5.17 and 5.24.

The static decode path (`decode="static"`, the default on CUDA). Eager decoding launches ~35 kernels per
layer per token from Python: for the 28-layer 1.5B model that is ~1,000 launches, which bounds a step at
tens of milliseconds whatever the batch. So on CUDA the decode step runs on a preallocated workspace of
fixed shape — rows bucketed to a power of two, key/value columns to a power of two (multiples of 512
beyond 512) — whose inputs (token, position, column) are tensors, and is captured once per shape in a
CUDA graph and replayed. The column written is an index tensor (`index_copy_`), the attention reads the
whole capacity under the validity mask, and grouped-query attention folds the query heads of one
key/value head into the query axis (one query token per row), so the kernels are the same at every step.
Finished rows stay in the workspace (their slots compute unused values) until the live rows fit the next
smaller bucket, then move there; the recorded tokens and log-probs live on the device and come back once
per finished row. On CPU the same static step runs without a graph (`decode="static"`), which is how the
tests check it against the eager loop and HF generate. A peft (LoRA) model decodes eagerly: its adapters
can be switched off, and a captured graph would not see that.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from treedistill.engine.base import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    Counters,
    Sample,
    checked_sample_args,
)
from treedistill.engine.prefix_cache import PrefixCache
from treedistill.errors import UsageError

__all__ = ["DECODE_MODES", "NativeEngine", "SAMPLERS", "SUPPORTED_MODEL_TYPES", "sample_next"]

# Decoder families whose layers are (norm, q/k/v/o projections with RoPE, norm, gated MLP): the layer
# loop below is exact for these. Others: use the HF engine.
SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
# auto: static + CUDA graphs on CUDA (without peft adapters), eager elsewhere.
DECODE_MODES = ("auto", "eager", "static")


@dataclass(frozen=True)
class _Shape:
    """Attention shape read once from the model config."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int


class _Batch:
    """Preallocated key/value buffer of one batch of rows.

    kv: [layers, 2, B, kv_heads, capacity, head_dim]; valid: [B, capacity] True where a real token's
    keys/values sit; length: columns written so far (the same for every row); next_pos: [B] RoPE
    position of each row's next token.
    """

    def __init__(self, kv: torch.Tensor, valid: torch.Tensor, next_pos: torch.Tensor):
        self.kv = kv
        self.valid = valid
        self.next_pos = next_pos
        self.length = 0

    def select(self, index: torch.Tensor) -> None:
        """Keep only the rows in `index` (finished rows leave; n-way expansion repeats rows)."""
        self.kv = self.kv.index_select(2, index)
        self.valid = self.valid.index_select(0, index)
        self.next_pos = self.next_pos.index_select(0, index)

    def row_kv(self, row: int, start: int, end: int) -> torch.Tensor:
        """Keys/values of tokens start..end of one row's sequence: [layers, 2, kv_heads, end-start, head_dim]."""
        cols = self.valid[row, : self.length].nonzero().squeeze(1)[start:end]  # [end-start]
        return self.kv[:, :, row].index_select(3, cols)


def _bucket_rows(rows: int, most: int) -> int:
    """Rows of the workspace that holds `rows` live rows: the next power of two, at most `most`."""
    return min(1 << (rows - 1).bit_length(), most)


def _bucket_columns(columns: int) -> int:
    """Key/value columns of the workspace: the next power of two up to 512, then multiples of 512."""
    return max(64, 1 << (columns - 1).bit_length()) if columns <= 512 else -(-columns // 512) * 512


class _Workspace(_Batch):
    """A _Batch of fixed shape for the static decode step: `rows` slots x `capacity` columns, plus the
    step's inputs as tensors (token, position per slot; the column written) and its output (float32
    logits per slot). Reused across calls of the same shape; `graph` is its captured CUDA graph."""

    def __init__(self, shape: _Shape, rows: int, capacity: int, vocab: int, dtype, device):
        kv = torch.zeros(shape.layers, 2, rows, shape.kv_heads, capacity, shape.head_dim, dtype=dtype, device=device)
        super().__init__(kv, torch.zeros(rows, capacity, dtype=torch.bool, device=device),
                         torch.zeros(rows, dtype=torch.long, device=device))
        self.rows, self.capacity = rows, capacity
        self.tok = torch.zeros(rows, dtype=torch.long, device=device)
        self.col = torch.zeros(1, dtype=torch.long, device=device)
        self.logits = torch.zeros(rows, vocab, dtype=torch.float32, device=device)
        self.graph = None

    def load(self, source: _Batch, index: torch.Tensor) -> None:
        """Fill slots 0..len(index)-1 with rows `index` of `source` (columns 0..source.length); clear the rest."""
        n, t = len(index), source.length
        self.kv[:, :, :n, :, :t] = source.kv[:, :, :, :, :t].index_select(2, index)
        self.valid.zero_()
        self.valid[:n, :t] = source.valid[:, :t].index_select(0, index)
        self.next_pos.zero_()
        self.next_pos[:n] = source.next_pos.index_select(0, index)
        self.length = t

    def select(self, index: torch.Tensor) -> None:  # noqa: ARG002 - slots never move inside a workspace
        raise TypeError("a workspace keeps its shape: move live rows with load() into a smaller one")


def _rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm module `norm` applied as torch's fused `rms_norm` (one kernel on CUDA, where
    the module's float32 round trip is ~7 small ones), with the module's own weight and epsilon."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    return F.rms_norm(x, (x.shape[-1],), norm.weight, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def draw_multinomial(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs [B, V] -> tokens [B] with `torch.multinomial`, the draw HF generate makes (same stream for a
    seed). Its CPU kernel draws one exponential per vocabulary entry: ~55 ms for 8 rows of Qwen's 151,936
    entries on one thread, more than the whole forward pass of a small model."""
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


def draw_inverse_cdf(probs: torch.Tensor, generator: torch.Generator | None, block: int = 1024) -> torch.Tensor:
    """probs [B, V] -> tokens [B] by inverting the cumulative distribution with one uniform per row.

    The same distribution as multinomial, with another random stream. Two levels, because a cumulative
    sum over 151,936 entries is sequential (7 ms for 8 rows on one CPU thread): sum blocks of `block`
    entries, find the block the uniform falls in, then the entry inside that block.
    """
    b, v = probs.shape
    blocks = F.pad(probs, (0, (-v) % block)).view(b, -1, block)  # [B, NB, C]
    block_mass = blocks.sum(dim=-1)  # [B, NB]
    block_cum = block_mass.cumsum(dim=-1)  # [B, NB]
    u = torch.rand(b, 1, generator=generator, device=probs.device, dtype=probs.dtype) * block_cum[:, -1:]  # [B, 1]
    blk = torch.searchsorted(block_cum, u, right=True).clamp_(max=block_cum.shape[1] - 1)  # [B, 1]
    inner = blocks[torch.arange(b, device=probs.device), blk[:, 0]]  # [B, C]
    inner_cum = inner.cumsum(dim=-1) + (block_cum.gather(1, blk) - block_mass.gather(1, blk))  # [B, C]
    idx = torch.searchsorted(inner_cum, u, right=True)[:, 0]  # [B]
    # Float rounding can put u past the block's last entry: take the last entry with mass instead.
    last = (torch.arange(block, device=probs.device) * (inner > 0)).amax(dim=-1)  # [B]
    return blk[:, 0] * block + torch.minimum(idx, last)


# name -> draw(probs [B, V], generator) -> tokens [B]; one signature, chosen by NativeEngine(sampler=...).
SAMPLERS = {"inverse_cdf": draw_inverse_cdf, "multinomial": draw_multinomial}


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None, draw=draw_inverse_cdf
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B, V] (float32) -> (tokens [B], log-prob under the sampling distribution [B],
    log-prob under the raw policy [B]).

    Temperature then top-p, as HF's TemperatureLogitsWarper and TopPLogitsWarper (sort ascending, drop
    tokens whose cumulative probability is <= 1 - top_p, keep at least one), then `draw`.
    Temperature 0 is greedy, whose sampling log-prob is 0 (probability 1).
    """
    policy_logp = torch.log_softmax(logits, dim=-1)  # [B, V]
    if temperature == 0:
        tokens = logits.argmax(dim=-1)  # [B]
        return tokens, torch.zeros_like(tokens, dtype=logits.dtype), policy_logp.gather(1, tokens[:, None])[:, 0]
    scores = logits
    if temperature == 1.0 and top_p == 1.0:
        sample_logp = policy_logp  # the sampling distribution is the policy: one log-softmax serves both
    else:
        scores = logits / temperature  # [B, V]
        if top_p < 1.0:
            sorted_logits, sorted_idx = torch.sort(scores, descending=False)
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
            remove = cum <= (1 - top_p)
            remove[..., -1:] = False
            scores = scores.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))
        sample_logp = torch.log_softmax(scores, dim=-1)  # [B, V]
    tokens = draw(scores.softmax(dim=-1), generator)  # [B]: softmax of the scores, as HF, so draws agree
    return (tokens, sample_logp.gather(1, tokens[:, None])[:, 0], policy_logp.gather(1, tokens[:, None])[:, 0])


class NativeEngine:
    """Engine (engine/base.py) with our decode loop and a radix prefix cache.

    cache_tokens: tokens of keys/values the prefix cache may hold (0 = no cache: every prefix is
        re-encoded, as HF generate does). Call `clear_cache()` when a tree is done; the cache also
        empties itself when the model's weights change (an optimizer step).
    max_batch: most rows run at once (larger requests are cut into chunks).
    eos_token_ids: ids that end a sample (None = the policy's); () turns end-of-sequence off, which
        benchmarks use to force lengths.
    sampler: "inverse_cdf" (default, fast) or "multinomial" (HF generate's draw: a seeded run then
        reproduces `generate` token for token while the batch keeps the same rows).
    decode: "auto" (static with CUDA graphs on CUDA unless the model has peft adapters, else eager),
        "eager" (rows leave the batch as they finish), or "static" (the fixed-shape step; graphs on CUDA).
    workspaces: static workspaces (and their graphs) kept, least recently used dropped first.
    """

    def __init__(
        self,
        policy,
        *,
        cache_tokens: int = 1 << 18,
        max_batch: int = 256,
        eos_token_ids: Sequence[int] | None = None,
        sampler: str = "inverse_cdf",
        decode: str = "auto",
        workspaces: int = 8,
    ):
        model = policy.model
        # A LoRA (peft) model wraps the causal LM; its adapted projections are still called as modules.
        self.lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        model_type = getattr(model.config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UsageError(
                f"NativeEngine runs {SUPPORTED_MODEL_TYPES} models, not {model_type!r}; use the HF engine"
            )
        if getattr(model.config, "use_sliding_window", False):
            raise UsageError("NativeEngine does not implement sliding-window attention; use the HF engine")
        if sampler not in SAMPLERS:
            raise UsageError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
        self.draw = SAMPLERS[sampler]
        if decode not in DECODE_MODES:
            raise UsageError(f"unknown decode mode {decode!r}: choose one of {', '.join(DECODE_MODES)}")
        if max_batch < 1:
            raise UsageError(f"max_batch must be >= 1, got {max_batch}")
        self.policy = policy
        self.model = model.eval()
        self.tokenizer = policy.tokenizer
        self.value_head = policy.value_head
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        cfg = model.config
        attn0 = self.lm.model.layers[0].self_attn
        self.shape = _Shape(
            layers=len(self.lm.model.layers),
            heads=cfg.num_attention_heads,
            kv_heads=cfg.num_key_value_heads,
            head_dim=attn0.head_dim,
        )
        self.eos_ids = tuple(policy.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.max_batch = max_batch
        # Payload [layers, 2, kv_heads, tokens, head_dim]: tokens on axis 3.
        self.cache = PrefixCache(cache_tokens, token_axis=3)
        self.counters = Counters()
        self._stop_ids: dict[tuple[str, ...], tuple[tuple[int, ...], tuple[str, ...]]] = {}
        self._weights_version = self._version()
        peft = hasattr(model, "get_base_model")
        if decode == "auto":
            decode = "static" if self.device.type == "cuda" and not peft else "eager"
        self.decode = decode
        self.use_graphs = decode == "static" and self.device.type == "cuda" and not peft
        self.max_workspaces = max(1, workspaces)
        self._workspaces: OrderedDict[tuple[int, int], _Workspace] = OrderedDict()
        self._graph_pool = None

    # ------------------------------------------------------------------ public API (Engine protocol)

    def clear_cache(self) -> None:
        """Release every cached key/value (call when a search tree is done)."""
        self.cache.clear()

    def release_workspaces(self) -> None:
        """Free the static decode workspaces and their CUDA graphs (they are rebuilt on demand)."""
        self._workspaces.clear()

    @torch.inference_mode()
    def sample(
        self,
        prefixes: Sequence[Sequence[int]],
        n: int = 1,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[list[Sample]]:
        """n samples for each prefix: result[i][j] is sample j of prefixes[i]."""
        stop = checked_sample_args(n, max_new_tokens, temperature, top_p, stop)
        self._check_prefixes(prefixes)
        self._check_weights()
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
        stop_ids, stop_texts = self._stops(tuple(stop))
        # Identical prefixes share one prefill: group them, in first-seen order.
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(prefixes):
            groups.setdefault(tuple(p), []).append(i)
        results: list[list[Sample | None]] = [[None] * n for _ in prefixes]
        # Chunks of at most max_batch rows; a row is (prefix index, sample j). A prefix whose n samples
        # (times its copies) exceed max_batch is spread over several chunks.
        chunk: list[tuple[tuple[int, ...], list[tuple[int, int]]]] = []
        size = 0
        for key, owners in groups.items():
            rows = [(owner, j) for owner in owners for j in range(n)]
            for start in range(0, len(rows), self.max_batch):
                part = rows[start:start + self.max_batch]
                if chunk and size + len(part) > self.max_batch:
                    self._sample_chunk(chunk, results, max_new_tokens, temperature, top_p, stop_ids, stop_texts,
                                       generator)
                    chunk, size = [], 0
                chunk.append((key, part))
                size += len(part)
        if chunk:
            self._sample_chunk(chunk, results, max_new_tokens, temperature, top_p, stop_ids, stop_texts, generator)
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def value(self, prefixes: Sequence[Sequence[int]]) -> list[float]:
        """Value-head estimate at the last token of each prefix (the cached part is not recomputed)."""
        if self.value_head is None:
            raise UsageError("this policy has no value head (load it with value_head=True)")
        self._check_prefixes(prefixes)
        self._check_weights()
        out: list[float] = []
        for start in range(0, len(prefixes), self.max_batch):
            part = [list(p) for p in prefixes[start : start + self.max_batch]]
            batch, hidden, _ = self._prefill(part, [len(p) - 1 for p in part], scoring=True)
            self._store_rows(batch, part, range(len(part)))
            values = self.value_head(hidden[:, -1])  # [B]
            self.counters.values += len(part)
            out.extend(float(v) for v in values.float().cpu())
        return out

    @torch.inference_mode()
    def logprobs(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[float]]:
        """Raw-policy log-probs of sequences[i][starts[i]:] given what precedes, reusing cached prefixes."""
        if len(sequences) != len(starts):
            raise UsageError(f"{len(sequences)} sequences but {len(starts)} starts")
        self._check_prefixes(sequences)
        for seq, s in zip(sequences, starts):
            if not 1 <= s <= len(seq):
                raise UsageError(f"start {s} outside 1..{len(seq)} (the first token has no log-prob)")
        self._check_weights()
        out: list[list[float]] = []
        for lo in range(0, len(sequences), self.max_batch):
            seqs = [list(q) for q in sequences[lo : lo + self.max_batch]]
            sts = list(starts[lo : lo + self.max_batch])
            # Logits are needed from position start-1 on, so at most start-1 tokens come from the cache.
            batch, hidden, suffix = self._prefill(seqs, [s - 1 for s in sts], scoring=True)
            width = hidden.shape[1]
            for r, (seq, s) in enumerate(zip(seqs, sts)):
                count = len(seq) - s  # tokens scored
                if count == 0:
                    out.append([])
                    continue
                h = hidden[r, width - 1 - count : width - 1]  # [count, H]: positions start-1 .. len-2
                logp = torch.log_softmax(self.lm.lm_head(h).float(), dim=-1)  # [count, V]
                target = torch.tensor(seq[s:], device=self.device)
                out.append(logp.gather(1, target[:, None])[:, 0].tolist())
            del batch, suffix
        return out

    # ------------------------------------------------------------------ the forward pass

    def _forward(self, batch: _Batch, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run tokens [B, Q] at RoPE positions [B, Q] on top of batch's buffer; returns final hidden [B, Q, H].

        Writes the new keys/values at buffer columns length..length+Q (their `valid` bits must already be
        set by the caller) and advances `length`.
        """
        inner = self.lm.model
        s = self.shape
        b, q = tokens.shape
        t0, t1 = batch.length, batch.length + q
        h = inner.embed_tokens(tokens)  # [B, Q, H]
        cos, sin = inner.rotary_emb(h, positions)  # [B, Q, D]
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, Q, D]
        # Key mask: a real key at or before the query's column; a query may always see itself, so a
        # padding row never has an all-masked softmax (its output is garbage that no real row reads).
        cols = torch.arange(t1, device=self.device)
        qcols = torch.arange(t0, t1, device=self.device)
        mask = batch.valid[:, None, None, :t1] & (cols[None, :] <= qcols[:, None])[None, None]  # [B, 1, Q, T]
        mask = mask | (cols[None, :] == qcols[:, None])[None, None]
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)  # [B, Q, H]
            qh = attn.q_proj(x).view(b, q, s.heads, s.head_dim).transpose(1, 2)  # [B, Hq, Q, D]
            kh = attn.k_proj(x).view(b, q, s.kv_heads, s.head_dim).transpose(1, 2)  # [B, Hkv, Q, D]
            vh = attn.v_proj(x).view(b, q, s.kv_heads, s.head_dim).transpose(1, 2)  # [B, Hkv, Q, D]
            qh = qh * cos + _rotate_half(qh) * sin
            kh = kh * cos + _rotate_half(kh) * sin
            batch.kv[i, 0, :, :, t0:t1] = kh
            batch.kv[i, 1, :, :, t0:t1] = vh
            keys = batch.kv[i, 0, :, :, :t1]  # [B, Hkv, T, D]
            values = batch.kv[i, 1, :, :, :t1]
            o = F.scaled_dot_product_attention(
                qh, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=s.heads != s.kv_heads
            )  # [B, Hq, Q, D]
            h = h + attn.o_proj(o.transpose(1, 2).reshape(b, q, s.heads * s.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        batch.length = t1
        self.counters.forward_calls += 1
        return inner.norm(h)  # [B, Q, H]

    def _prefill(
        self, seqs: list[list[int]], limits: list[int], *, scoring: bool = False, extra: int = 0
    ) -> tuple[_Batch, torch.Tensor, torch.Tensor]:
        """Encode seqs, reusing at most limits[i] cached leading tokens of each.

        Returns the batch (buffer sized for `extra` more columns), the final hidden of the suffix
        [B, S, H] (left-padded: column -1 is every row's last token) and the suffix lengths [B].
        """
        hits = [self.cache.match(q, lim) for q, lim in zip(seqs, limits)]
        cached = max(hit.length for hit in hits)
        suffix_lens = [len(q) - hit.length for q, hit in zip(seqs, hits)]
        width = max(suffix_lens)
        s, b = self.shape, len(seqs)
        cap = cached + width + extra
        kv = torch.zeros(s.layers, 2, b, s.kv_heads, cap, s.head_dim, dtype=self.dtype, device=self.device)
        valid = torch.zeros(b, cap, dtype=torch.bool, device=self.device)
        tokens = torch.zeros(b, width, dtype=torch.long, device=self.device)
        positions = torch.zeros(b, width, dtype=torch.long, device=self.device)
        for r, (q, hit, n_new) in enumerate(zip(seqs, hits, suffix_lens)):
            if hit.length:
                kv[:, :, r, :, cached - hit.length : cached] = hit.kv
                valid[r, cached - hit.length : cached] = True
            valid[r, cached + width - n_new : cached + width] = True
            tokens[r, width - n_new :] = torch.tensor(q[hit.length :], device=self.device)
            positions[r, width - n_new :] = torch.arange(hit.length, len(q), device=self.device)
        batch = _Batch(kv, valid, torch.tensor([len(q) for q in seqs], device=self.device))
        batch.length = cached
        hidden = self._forward(batch, tokens, positions)  # [B, S, H]
        computed, reused = sum(suffix_lens), sum(hit.length for hit in hits)
        if scoring:
            self.counters.scored_tokens += computed
        else:
            self.counters.prompt_tokens += computed
        self.counters.cached_prompt_tokens += reused
        return batch, hidden, torch.tensor(suffix_lens)

    # ------------------------------------------------------------------ sampling

    def _sample_chunk(self, chunk, results, max_new_tokens, temperature, top_p, stop_ids, stop_texts, generator):
        """Sample the rows of `chunk`: (prefix ids, [(prefix index, sample j), ...]) per distinct prefix."""
        prefixes = [list(key) for key, _ in chunk]
        static = self.decode == "static"
        # The eager loop decodes in the prefill's buffer; the static one in a workspace of its own.
        batch, hidden, _ = self._prefill(prefixes, [len(p) - 1 for p in prefixes],
                                         extra=0 if static else max_new_tokens - 1)
        self._store_rows(batch, prefixes, range(len(prefixes)))
        # Row r samples for (owner prefix index, sample j); each distinct prefix's KV is copied to its rows.
        owners: list[tuple[int, int]] = []
        source: list[int] = []
        for g, (_, rows) in enumerate(chunk):
            owners += rows
            source += [g] * len(rows)
        src = torch.tensor(source, device=self.device)
        logits = self.lm.lm_head(hidden[:, -1]).float().index_select(0, src)  # [R, V]
        row_prefix = [prefixes[g] for g in source]
        stop_tensor = torch.tensor(stop_ids + self.eos_ids, device=self.device, dtype=torch.long)
        args = (logits, row_prefix, owners, results, max_new_tokens, temperature, top_p, stop_tensor, stop_texts,
                generator)
        if static:
            self._decode_static(batch, src, *args)
        else:
            batch.select(src)
            self._decode_eager(batch, *args)

    def _finish_kind(self, token: int, generated: list[int], last: bool, is_stop: bool, stop_texts) -> str | None:
        """How a row ends after sampling `token` (appended to `generated`), or None while it goes on."""
        if is_stop:
            return FINISH_EOS if token in self.eos_ids else FINISH_STOP
        if stop_texts and self._hit_stop_text(generated, stop_texts):
            return FINISH_STOP
        return FINISH_LENGTH if last else None

    def _decode_eager(self, batch, logits, row_prefix, owners, results, max_new_tokens, temperature, top_p,
                      stop_tensor, stop_texts, generator):
        """Decode loop on the prefill's buffer: finished rows leave the batch at once."""
        gen: list[list[int]] = [[] for _ in owners]
        lp: list[list[float]] = [[] for _ in owners]
        plp: list[list[float]] = [[] for _ in owners]
        active = list(range(len(owners)))  # batch row -> row id
        for step in range(max_new_tokens):
            tok, slp, pl = sample_next(logits, temperature, top_p, generator, self.draw)
            done_dev = torch.isin(tok, stop_tensor) if len(stop_tensor) else torch.zeros_like(tok, dtype=torch.bool)
            tok_l, slp_l, pl_l, done_l = tok.tolist(), slp.tolist(), pl.tolist(), done_dev.tolist()
            self.counters.generated_tokens += len(active)
            finished: list[tuple[int, str]] = []  # (batch row, finish)
            for r, rid in enumerate(active):
                gen[rid].append(tok_l[r])
                lp[rid].append(slp_l[r])
                plp[rid].append(pl_l[r])
                finish = self._finish_kind(tok_l[r], gen[rid], step == max_new_tokens - 1, done_l[r], stop_texts)
                if finish:
                    finished.append((r, finish))
            for r, finish in finished:
                rid = active[r]
                owner, j = owners[rid]
                results[owner][j] = Sample(tuple(gen[rid]), tuple(lp[rid]), tuple(plp[rid]), finish)
            # The finished rows' keys/values (prefix + step without its last token, never fed) go to the
            # prefix cache, so expanding that child later starts from them.
            if finished:
                done_rows = [r for r, _ in finished]
                self._store_rows(batch, [row_prefix[active[r]] + gen[active[r]][:-1] for r in done_rows], done_rows)
            if len(finished) == len(active):
                break
            if finished:
                gone = {r for r, _ in finished}
                keep = [r for r in range(len(active)) if r not in gone]
                keep_t = torch.tensor(keep, device=self.device)
                batch.select(keep_t)
                tok = tok.index_select(0, keep_t)
                active = [active[r] for r in keep]
            col = batch.length
            batch.valid[:, col] = True
            positions = batch.next_pos[:, None].clone()  # [B, 1]
            batch.next_pos += 1
            hidden = self._forward(batch, tok[:, None], positions)  # [B, 1, H]
            logits = self.lm.lm_head(hidden[:, -1]).float()  # [B, V]

    def _decode_static(self, batch, src, logits, row_prefix, owners, results, max_new_tokens, temperature, top_p,
                       stop_tensor, stop_texts, generator):
        """Decode loop on a fixed-shape workspace (module docstring): tokens and log-probs are recorded on
        the device; the host learns only which rows finished (nothing at all while no row can stop early)."""
        dev = self.device
        ws = self._workspace(len(owners), batch.length + max_new_tokens)
        ws.load(batch, src)
        del batch
        tokens = torch.zeros(len(owners), max_new_tokens, dtype=torch.long, device=dev)
        logps = torch.zeros(2, len(owners), max_new_tokens, dtype=torch.float32, device=dev)
        live = list(range(len(owners)))  # row ids, in the order of `slots` (their workspace rows)
        live_t = torch.arange(len(owners), device=dev)
        slots = live_t.clone()
        packed = True  # slots == 0..len(live)-1
        texts = [[] for _ in owners] if stop_texts else None  # host copies for the stop-text check
        stops = frozenset(stop_tensor.tolist())  # the stop ids on the host, once per chunk
        for step in range(max_new_tokens):
            tok, slp, pl = sample_next(logits, temperature, top_p, generator, self.draw)
            tokens[live_t, step] = tok
            logps[0, live_t, step] = slp
            logps[1, live_t, step] = pl
            self.counters.generated_tokens += len(live)
            finished = self._finished_static(tok, live, texts, stop_tensor, stops, stop_texts,
                                             step == max_new_tokens - 1)
            if finished:
                ks = [k for k, _ in finished]
                rids = torch.tensor([live[k] for k in ks], device=dev)
                toks_l = tokens[rids, : step + 1].tolist()
                lps_l = logps[:, rids, : step + 1].tolist()
                for j, (k, finish) in enumerate(finished):
                    owner, sample_j = owners[live[k]]
                    results[owner][sample_j] = Sample(tuple(toks_l[j]), tuple(lps_l[0][j]), tuple(lps_l[1][j]), finish)
                self._store_rows(ws, [row_prefix[live[k]] + toks_l[j][:-1] for j, k in enumerate(ks)],
                                 slots[torch.tensor(ks, device=dev)].tolist())
                if len(finished) == len(live):
                    break
                gone = set(ks)
                keep_t = torch.tensor([k for k in range(len(live)) if k not in gone], device=dev)
                live = [live[k] for k in keep_t.tolist()]
                live_t, slots, tok = live_t[keep_t], slots[keep_t], tok[keep_t]
                packed = False
                if _bucket_rows(len(live), self.max_batch) < ws.rows:  # live rows fit a smaller workspace: move
                    smaller = self._workspace(len(live), ws.capacity)
                    smaller.load(ws, slots)
                    ws, slots, packed = smaller, torch.arange(len(live), device=dev), True
            ws.tok.index_copy_(0, slots, tok)
            ws.col.fill_(ws.length)
            self._run_static(ws)
            ws.length += 1
            ws.next_pos += 1
            logits = ws.logits[: len(live)] if packed else ws.logits.index_select(0, slots)  # [B, V]

    def _finished_static(self, tok, live, texts, stop_tensor, stops: frozenset, stop_texts,
                         last: bool) -> list[tuple[int, str]]:
        """(position in `live`, finish) of the rows that end with `tok`; syncs with the device only when a
        row can end here."""
        if texts is None and not last:
            if not len(stop_tensor):
                return []
            hit = torch.isin(tok, stop_tensor)
            ks = hit.nonzero()[:, 0].tolist()
            return [(k, FINISH_EOS if t in self.eos_ids else FINISH_STOP) for k, t in zip(ks, tok[ks].tolist())]
        finished = []
        for k, t in enumerate(tok.tolist()):
            generated = texts[live[k]] if texts is not None else []
            generated.append(t)
            finish = self._finish_kind(t, generated, last, t in stops, stop_texts)
            if finish:
                finished.append((k, finish))
        return finished

    def _workspace(self, rows: int, columns: int) -> _Workspace:
        """The workspace for `rows` live rows and `columns` key/value columns (bucketed), most recent last."""
        key = (_bucket_rows(rows, self.max_batch), _bucket_columns(columns))
        ws = self._workspaces.pop(key, None)
        if ws is None:
            while len(self._workspaces) >= self.max_workspaces:
                self._workspaces.popitem(last=False)
            ws = _Workspace(self.shape, *key, vocab=self.lm.lm_head.out_features, dtype=self.dtype, device=self.device)
        self._workspaces[key] = ws
        return ws

    def _run_static(self, ws: _Workspace) -> None:
        """One decode step of every slot: a CUDA graph replay (captured on first use), else eager."""
        self.counters.forward_calls += 1
        if not self.use_graphs:
            self._static_step(ws)
            return
        if ws.graph is None:
            # Warm up on a side stream (allocator and kernel choices settle), then capture; the warm-up
            # writes exactly what the replay below writes, so it changes nothing.
            stream = torch.cuda.Stream(device=self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._static_step(ws)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()  # one memory pool for every shape's graph
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                self._static_step(ws)
            ws.graph = graph
        ws.graph.replay()

    def _static_step(self, ws: _Workspace) -> None:
        """ws.tok [B] at positions ws.next_pos [B], written at column ws.col -> ws.logits [B, V] (float32).

        Shapes never change with the step: attention reads all `capacity` columns under the validity mask,
        and the query heads sharing a key/value head are laid along the query axis (one token per row)."""
        inner, s = self.lm.model, self.shape
        b, group, half = ws.rows, s.heads // s.kv_heads, s.head_dim // 2
        ws.valid.index_fill_(1, ws.col, True)
        h = inner.embed_tokens(ws.tok[:, None])  # [B, 1, H]
        cos, sin = inner.rotary_emb(h, ws.next_pos[:, None])  # [B, 1, D]
        cos = cos[:, None]  # [B, 1, 1, D]
        # rotate_half(x) * sin == roll(x, half) * sin_signed: the sign is folded in once per step
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, None]  # [B, 1, 1, D]
        # additive mask, built once per step rather than converted from booleans in every layer
        bias = torch.zeros(ws.valid.shape, dtype=h.dtype, device=h.device).masked_fill_(~ws.valid, float("-inf"))
        bias = bias[:, None, None, :]  # [B, 1, 1, C]
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            x = _rms_norm(layer.input_layernorm, h)  # [B, 1, H]
            qh = attn.q_proj(x).view(b, 1, s.heads, s.head_dim).transpose(1, 2)  # [B, Hq, 1, D]
            kh = attn.k_proj(x).view(b, 1, s.kv_heads, s.head_dim).transpose(1, 2)  # [B, Hkv, 1, D]
            vh = attn.v_proj(x).view(b, 1, s.kv_heads, s.head_dim).transpose(1, 2)  # [B, Hkv, 1, D]
            qh = torch.addcmul(qh * cos, qh.roll(half, -1), sin)
            kh = torch.addcmul(kh * cos, kh.roll(half, -1), sin)
            ws.kv[i, 0].index_copy_(2, ws.col, kh)
            ws.kv[i, 1].index_copy_(2, ws.col, vh)
            o = F.scaled_dot_product_attention(
                qh.reshape(b, s.kv_heads, group, s.head_dim), ws.kv[i, 0], ws.kv[i, 1], attn_mask=bias,
                scale=attn.scaling,
            )  # [B, Hkv, G, D]: query head kv * G + g, as HF's repeat_kv
            h = h + attn.o_proj(o.reshape(b, 1, s.heads * s.head_dim))
            h = h + layer.mlp(_rms_norm(layer.post_attention_layernorm, h))
        ws.logits.copy_(self.lm.lm_head(_rms_norm(inner.norm, h)[:, 0]))  # cast to float32 in the copy

    def _store_rows(self, batch: _Batch, seqs: Sequence[Sequence[int]], rows: Sequence[int]) -> None:
        """Insert rows' keys/values into the prefix cache; seqs[k] is row rows[k]'s token sequence."""
        if self.cache.max_tokens == 0:
            return
        for seq, r in zip(seqs, rows):
            if seq:
                self.cache.insert(seq, lambda a, b, r=r: batch.row_kv(r, a, b))

    # ------------------------------------------------------------------ stops, checks

    def _stops(self, stop: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """Split stop strings into single-token ids (one compare on the device) and texts (decoded tail)."""
        if stop not in self._stop_ids:
            ids, texts = [], []
            for text in stop:
                if not text:
                    raise UsageError("stop strings must be non-empty")
                enc = self.tokenizer.encode(text, add_special_tokens=False)
                if len(enc) == 1 and self.tokenizer.decode(enc) == text:
                    ids.append(enc[0])
                else:
                    texts.append(text)
            self._stop_ids[stop] = (tuple(ids), tuple(texts))
        return self._stop_ids[stop]

    def _hit_stop_text(self, generated: list[int], texts: tuple[str, ...]) -> bool:
        # A new occurrence ends in the last token and spans at most len(bytes) tokens (a token is >= 1 byte).
        width = max(len(t.encode()) for t in texts) + 1
        tail = self.tokenizer.decode(generated[-width:])
        return any(t in tail for t in texts)

    def _check_prefixes(self, prefixes: Sequence[Sequence[int]]) -> None:
        vocab = self.model.config.vocab_size
        for p in prefixes:
            if len(p) == 0:
                raise UsageError("empty prefix: every prefix needs at least one token")
            if min(p) < 0 or max(p) >= vocab:
                raise UsageError(f"token id outside the vocabulary 0..{vocab - 1}")

    def _version(self) -> int:
        return sum(p._version for p in self.model.parameters())

    def _check_weights(self) -> None:
        """Cached keys/values belong to the weights that made them: drop them after an update."""
        version = self._version()
        if version != self._weights_version:
            self.cache.clear()
            self._weights_version = version
