"""A key/value cache shared across a search tree: a radix tree keyed by token prefix.

Idea from SGLang's RadixAttention (Zheng et al., 2024, "SGLang: Efficient Execution of Structured
Language Model Programs"): keep the keys and values of every prefix already run through the model in a
compressed trie whose edges are token runs; a new request walks the trie to its longest cached prefix,
reuses those keys/values and computes only the rest; memory is bounded by evicting least-recently-used
LEAVES, so a prefix shared by many children (the tree's root prompt) outlives its cold descendants.

Where we depart from SGLang:
- Copy-on-read. A hit returns a copy of the cached keys/values (the engine writes them into its own
  batch buffer), so nothing in the trie is referenced by a running batch and eviction needs no
  reference counts. The price is one memory copy per reused prefix, which is bandwidth, not compute.
- Edges own their tensors (a split clones both halves), so the token count is the memory actually held.
- No paging: a segment is one tensor `[..., tokens, ...]` with the token axis given at construction.

The cache knows nothing of models: payloads are tensors whose `token_axis` indexes tokens
(the native engine stores `[layers, 2, kv_heads, tokens, head_dim]`).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["PrefixCache", "CacheHit", "CacheStats"]


@dataclass(frozen=True)
class CacheHit:
    """Longest cached prefix of a request.

    length: number of leading tokens whose keys/values were found (0 = miss).
    kv: the payload for those tokens (token axis = the cache's `token_axis`, size `length`), or None.
    """

    length: int
    kv: torch.Tensor | None


@dataclass
class CacheStats:
    """Cumulative counters of one cache (tokens)."""

    served_tokens: int = 0    # tokens returned by `match` (each one a token not recomputed)
    inserted_tokens: int = 0  # tokens newly stored by `insert`
    evicted_tokens: int = 0   # tokens dropped to stay within `max_tokens`


class _Node:
    __slots__ = ("tokens", "kv", "children", "parent", "last_used")

    def __init__(self, tokens: tuple[int, ...], kv: torch.Tensor | None, parent: _Node | None):
        self.tokens = tokens          # edge label: the token run from the parent to this node
        self.kv = kv                  # payload for `tokens` (None only at the root)
        self.children: dict[int, _Node] = {}  # first token of the child's edge -> child
        self.parent = parent
        self.last_used = 0


def _common_length(a: Sequence[int], a_start: int, a_end: int, b: tuple[int, ...]) -> int:
    """Length of the common prefix of a[a_start:a_end] and b."""
    n = min(a_end - a_start, len(b))
    i = 0
    while i < n and a[a_start + i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """Radix tree from token prefixes to their keys/values, bounded to `max_tokens` tokens.

    `match(tokens, limit)` -> longest cached prefix (at most `limit` tokens);
    `insert(tokens, kv_of)` stores the part of `tokens` not yet cached, asking `kv_of(start, end)` for the
    payload of tokens[start:end]; least-recently-used leaves are evicted past `max_tokens`;
    `clear()` releases everything (call it when a tree is done or the weights changed).
    """

    def __init__(self, max_tokens: int, *, token_axis: int = -2):
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        self.max_tokens = max_tokens
        self.token_axis = token_axis
        self.stats = CacheStats()
        self._root = _Node((), None, None)
        self._size = 0
        self._clock = 0

    @property
    def size(self) -> int:
        """Tokens held now."""
        return self._size

    def clear(self) -> None:
        self._root = _Node((), None, None)
        self._size = 0

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _slice(self, kv: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return kv.narrow(self.token_axis, start, end - start)

    def match(self, tokens: Sequence[int], limit: int | None = None) -> CacheHit:
        """Keys/values of the longest cached prefix of tokens[:limit] (a copy; touches the path)."""
        limit = len(tokens) if limit is None else min(limit, len(tokens))
        now = self._tick()
        node, pos, parts = self._root, 0, []
        while pos < limit:
            child = node.children.get(tokens[pos])
            if child is None:
                break
            n = _common_length(tokens, pos, limit, child.tokens)
            child.last_used = now
            parts.append(child.kv if n == len(child.tokens) else self._slice(child.kv, 0, n))
            pos += n
            if n < len(child.tokens):
                break
            node = child
        if pos == 0:
            return CacheHit(0, None)
        self.stats.served_tokens += pos
        kv = torch.cat(parts, dim=self.token_axis) if len(parts) > 1 else parts[0].clone()
        return CacheHit(pos, kv)

    def insert(self, tokens: Sequence[int], kv_of: Callable[[int, int], torch.Tensor]) -> int:
        """Store tokens' keys/values; only the uncached tail is asked of `kv_of`. Returns tokens added."""
        if self.max_tokens == 0 or not tokens:
            return 0
        now = self._tick()
        node, pos = self._root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            n = _common_length(tokens, pos, len(tokens), child.tokens)
            if n < len(child.tokens):
                child = self._split(child, n)
            child.last_used = now
            pos += n
            node = child
        added = len(tokens) - pos
        if added:
            kv = kv_of(pos, len(tokens))
            got = kv.shape[self.token_axis]
            if got != added:
                raise ValueError(f"kv_of({pos}, {len(tokens)}) returned {got} tokens, expected {added}")
            leaf = _Node(tuple(tokens[pos:]), kv, node)
            leaf.last_used = now
            node.children[tokens[pos]] = leaf
            self._size += added
            self.stats.inserted_tokens += added
        if self._size > self.max_tokens:
            self._evict(self.max_tokens)
        return added

    def _split(self, child: _Node, n: int) -> _Node:
        """Cut child's edge after n tokens; returns the new upper node (both halves own clones)."""
        upper = _Node(child.tokens[:n], self._slice(child.kv, 0, n).clone(), child.parent)
        upper.last_used = child.last_used
        upper.parent.children[child.tokens[0]] = upper
        child.kv = self._slice(child.kv, n, len(child.tokens)).clone()
        child.tokens = child.tokens[n:]
        child.parent = upper
        upper.children[child.tokens[0]] = child
        return upper

    def _evict(self, target: int) -> None:
        """Drop least-recently-used leaves until at most `target` tokens remain."""
        leaves = []
        stack = [self._root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self._root:
                leaves.append((node.last_used, id(node), node))
        heapq.heapify(leaves)
        while self._size > target and leaves:
            _, _, node = heapq.heappop(leaves)
            parent = node.parent
            del parent.children[node.tokens[0]]
            self._size -= len(node.tokens)
            self.stats.evicted_tokens += len(node.tokens)
            if parent is not self._root and not parent.children:
                heapq.heappush(leaves, (parent.last_used, id(parent), parent))
