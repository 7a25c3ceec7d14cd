"""The native engine's static decode path (`decode="static"`, the default on CUDA).

Eager decoding launches ~35 kernels per layer per token from Python: for the 28-layer 1.5B model that is
~1,000 launches, which bounds a step at tens of milliseconds whatever the batch. So on CUDA the decode
step runs on a preallocated workspace of fixed shape — rows bucketed to a power of two, key/value
columns to a power of two (multiples of 512 beyond 512) — whose inputs (token, position, column) are
tensors, and is captured once per shape in a CUDA graph and replayed. The column written is an index
tensor (`index_copy_`), the attention reads the whole capacity under the validity mask, and
grouped-query attention folds the query heads of one key/value head into the query axis (one query token
per row), so the kernels are the same at every step. Finished rows stay in the workspace (their slots
compute unused values) until the live rows fit the next smaller bucket, then move there; the recorded
tokens and log-probs live on the device and come back once per finished row. On CPU the same static step
runs without a graph (`decode="static"`), which is how the tests check it against the eager loop and HF
generate. A peft (LoRA) model decodes eagerly: its adapters can be switched off, and a captured graph
would not see that.

The functions here are the NativeEngine's (engine/native.py) static decode loop; the engine they are
given holds their state (its workspaces, kept least recently used first, and the CUDA graph pool).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from treedistill.engine.base import FINISH_EOS, FINISH_STOP, Sample
from treedistill.engine.kv_buffer import KVBatch, KVShape
from treedistill.engine.sampling import sample_next

__all__ = ["Workspace", "decode_static"]


def _bucket_rows(rows: int, most: int) -> int:
    """Rows of the workspace that holds `rows` live rows: the next power of two, at most `most`."""
    return min(1 << (rows - 1).bit_length(), most)


def _bucket_columns(columns: int) -> int:
    """Key/value columns of the workspace: the next power of two up to 512, then multiples of 512."""
    return max(64, 1 << (columns - 1).bit_length()) if columns <= 512 else -(-columns // 512) * 512


class Workspace(KVBatch):
    """A KVBatch of fixed shape for the static decode step: `rows` slots x `capacity` columns, plus the
    step's inputs as tensors (token, position per slot; the column written) and its output (float32
    logits per slot). Reused across calls of the same shape; `graph` is its captured CUDA graph."""

    def __init__(self, shape: KVShape, rows: int, capacity: int, vocab: int, dtype, device):
        kv = torch.zeros(shape.layers, 2, rows, shape.kv_heads, capacity, shape.head_dim, dtype=dtype, device=device)
        super().__init__(kv, torch.zeros(rows, capacity, dtype=torch.bool, device=device),
                         torch.zeros(rows, dtype=torch.long, device=device))
        self.rows, self.capacity = rows, capacity
        self.tok = torch.zeros(rows, dtype=torch.long, device=device)
        self.col = torch.zeros(1, dtype=torch.long, device=device)
        self.logits = torch.zeros(rows, vocab, dtype=torch.float32, device=device)
        self.graph = None

    def load(self, source: KVBatch, index: torch.Tensor) -> None:
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


def decode_static(engine, batch, src, logits, row_prefix, owners, results, max_new_tokens, temperature, top_p,
                  stop_tensor, stop_texts, generator):
    """Decode loop on a fixed-shape workspace (the module docstring): tokens and log-probs are recorded on
    the device; the host learns only which rows finished (nothing at all while no row can stop early).
    `engine` is the NativeEngine whose `_sample_chunk` calls this; the other arguments are its."""
    dev = engine.device
    ws = _workspace(engine, len(owners), batch.length + max_new_tokens)
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
        tok, slp, pl = sample_next(logits, temperature, top_p, generator, engine.draw)
        tokens[live_t, step] = tok
        logps[0, live_t, step] = slp
        logps[1, live_t, step] = pl
        engine.counters.generated_tokens += len(live)
        finished = _finished_static(engine, tok, live, texts, stop_tensor, stops, stop_texts,
                                    step == max_new_tokens - 1)
        if finished:
            ks = [k for k, _ in finished]
            rids = torch.tensor([live[k] for k in ks], device=dev)
            toks_l = tokens[rids, : step + 1].tolist()
            lps_l = logps[:, rids, : step + 1].tolist()
            for j, (k, finish) in enumerate(finished):
                owner, sample_j = owners[live[k]]
                results[owner][sample_j] = Sample(tuple(toks_l[j]), tuple(lps_l[0][j]), tuple(lps_l[1][j]), finish)
            engine._store_rows(ws, [row_prefix[live[k]] + toks_l[j][:-1] for j, k in enumerate(ks)],
                               slots[torch.tensor(ks, device=dev)].tolist())
            if len(finished) == len(live):
                break
            gone = set(ks)
            keep_t = torch.tensor([k for k in range(len(live)) if k not in gone], device=dev)
            live = [live[k] for k in keep_t.tolist()]
            live_t, slots, tok = live_t[keep_t], slots[keep_t], tok[keep_t]
            packed = False
            if _bucket_rows(len(live), engine.max_batch) < ws.rows:  # live rows fit a smaller workspace: move
                smaller = _workspace(engine, len(live), ws.capacity)
                smaller.load(ws, slots)
                ws, slots, packed = smaller, torch.arange(len(live), device=dev), True
        ws.tok.index_copy_(0, slots, tok)
        ws.col.fill_(ws.length)
        _run_static(engine, ws)
        ws.length += 1
        ws.next_pos += 1
        logits = ws.logits[: len(live)] if packed else ws.logits.index_select(0, slots)  # [B, V]


def _finished_static(engine, tok, live, texts, stop_tensor, stops: frozenset, stop_texts,
                     last: bool) -> list[tuple[int, str]]:
    """(position in `live`, finish) of the rows that end with `tok`; syncs with the device only when a
    row can end here."""
    if texts is None and not last:
        if not len(stop_tensor):
            return []
        hit = torch.isin(tok, stop_tensor)
        ks = hit.nonzero()[:, 0].tolist()
        return [(k, FINISH_EOS if t in engine.eos_ids else FINISH_STOP) for k, t in zip(ks, tok[ks].tolist())]
    finished = []
    for k, t in enumerate(tok.tolist()):
        generated = texts[live[k]] if texts is not None else []
        generated.append(t)
        finish = engine._finish_kind(t, generated, last, t in stops, stop_texts)
        if finish:
            finished.append((k, finish))
    return finished


def _workspace(engine, rows: int, columns: int) -> Workspace:
    """The workspace for `rows` live rows and `columns` key/value columns (bucketed), most recent last."""
    key = (_bucket_rows(rows, engine.max_batch), _bucket_columns(columns))
    ws = engine._workspaces.pop(key, None)
    if ws is None:
        while len(engine._workspaces) >= engine.max_workspaces:
            engine._workspaces.popitem(last=False)
        ws = Workspace(engine.shape, *key, vocab=engine.lm.lm_head.out_features, dtype=engine.dtype, device=engine.device)
    engine._workspaces[key] = ws
    return ws


def _run_static(engine, ws: Workspace) -> None:
    """One decode step of every slot: a CUDA graph replay (captured on first use), else eager."""
    engine.counters.forward_calls += 1
    if not engine.use_graphs:
        _static_step(engine, ws)
        return
    if ws.graph is None:
        # Warm up on a side stream (allocator and kernel choices settle), then capture; the warm-up
        # writes exactly what the replay below writes, so it changes nothing.
        stream = torch.cuda.Stream(device=engine.device)
        stream.wait_stream(torch.cuda.current_stream(engine.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                _static_step(engine, ws)
        torch.cuda.current_stream(engine.device).wait_stream(stream)
        if engine._graph_pool is None:
            engine._graph_pool = torch.cuda.graph_pool_handle()  # one memory pool for every shape's graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=engine._graph_pool):
            _static_step(engine, ws)
        ws.graph = graph
    ws.graph.replay()


def _static_step(engine, ws: Workspace) -> None:
    """ws.tok [B] at positions ws.next_pos [B], written at column ws.col -> ws.logits [B, V] (float32).

    Shapes never change with the step: attention reads all `capacity` columns under the validity mask,
    and the query heads sharing a key/value head are laid along the query axis (one token per row)."""
    inner, s = engine.lm.model, engine.shape
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
    ws.logits.copy_(engine.lm.lm_head(_rms_norm(inner.norm, h)[:, 0]))  # cast to float32 in the copy
