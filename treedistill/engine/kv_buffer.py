"""The preallocated key/value buffer of one batch of rows, shared by the native engine's decode paths."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["KVBatch", "KVShape"]


@dataclass(frozen=True)
class KVShape:
    """Attention shape read once from the model config."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int


class KVBatch:
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
