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

The static decode path (`decode="static"`, the default on CUDA): a fixed-shape decode step captured
in CUDA graphs, in engine/static_decode.py. Sampling (temperature, top-p, the draw) is
engine/sampling.py's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

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
from treedistill.engine.kv_buffer import KVBatch, KVShape
from treedistill.engine.prefix_cache import PrefixCache
from treedistill.engine.sampling import SAMPLERS, sample_next
from treedistill.engine.static_decode import Workspace, decode_static
from treedistill.errors import UsageError

__all__ = ["DECODE_MODES", "NativeEngine", "SAMPLERS", "SUPPORTED_MODEL_TYPES", "sample_next"]

# Decoder families whose layers are (norm, q/k/v/o projections with RoPE, norm, gated MLP): the layer
# loop below is exact for these. Others: use the HF engine.
SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
# auto: static + CUDA graphs on CUDA (without peft adapters), eager elsewhere.
DECODE_MODES = ("auto", "eager", "static")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


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
        self.shape = KVShape(
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
        self._workspaces: OrderedDict[tuple[int, int], Workspace] = OrderedDict()
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

    def _forward(self, batch: KVBatch, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
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
    ) -> tuple[KVBatch, torch.Tensor, torch.Tensor]:
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
        batch = KVBatch(kv, valid, torch.tensor([len(q) for q in seqs], device=self.device))
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
            decode_static(self, batch, src, *args)
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

    def _store_rows(self, batch: KVBatch, seqs: Sequence[Sequence[int]], rows: Sequence[int]) -> None:
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
