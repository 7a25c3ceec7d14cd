"""Packed rows: rows that share token prefixes run through the model once per distinct prefix token.

The learner's rows [B, T] (`batch.py`) repeat prefixes: every row of one problem carries its prompt, and
an mcts-tree row carries the prompt plus every step above it (`rollout/tree_lines.py`). `pack_rows`
builds a token trie over the rows' real tokens (a node = a token together with all tokens before it) and
lays the nodes out depth-first in packed sequences [S, N]. Node q attends to node k iff k is an
ancestor of q or q itself, which in depth-first order is tin[k] <= tin[q] < tout[k] (TRL PR #7328's
tree mask; "Tree Training", arXiv:2511.00413); its position id is its depth, i.e. its column in every
row that holds it. A causal model's output at a token depends only on that token and the ones before
it, so each node's logits and hidden state equal those of every row position it stands for, and
`Packing.logprobs` / `entropy` / `rows` gather them back into the row layout: the loss code, its
token-mean normalisation (the trap of OpenRLHF PR #923 does not arise: the normaliser is computed on
the rows, as before) and therefore the gradients are those of the per-row forward, up to float
rounding (tests/test_packing.py).

A micro-batch's trie is cut into sequences of at most `max_tokens` nodes at subtree boundaries: a
subtree that does not fit where it would go starts a new sequence that repeats its ancestors (context
only; their outputs are not read there). Sequences are right-padded to the longest; a padding node
attends only to itself (so no softmax row is empty) and no real node attends to it.

Pure: tensors in, tensors out; no model. The model call is `Policy.forward_packed`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

__all__ = ["Packing", "pack_rows"]


@dataclass(frozen=True)
class Packing:
    """B rows [B, T] packed as S sequences of at most N trie nodes.

    input_ids: [S, N] long, each node's token in depth-first order (0 on padding).
    position_ids: [S, N] long, each node's depth = its column in the rows that hold it (0 on padding).
    attention: [S, N, N] bool, attention[s, q, k]: node q may attend to node k (k an ancestor of q, or q).
    valid: [S, N] bool, real nodes (not padding).
    index: [B, T] long, flat position s * N + n of the node holding row token (b, t); 0 on row padding.
    row_mask: [B, T] bool, the rows' real tokens (the attention mask the rows were packed from).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention: torch.Tensor
    valid: torch.Tensor
    index: torch.Tensor
    row_mask: torch.Tensor

    def __post_init__(self):
        S, N = self.input_ids.shape
        assert self.position_ids.shape == (S, N) and self.valid.shape == (S, N), (
            f"Packing: position_ids {tuple(self.position_ids.shape)} and valid {tuple(self.valid.shape)} "
            f"must be [S, N] = {(S, N)} like input_ids")
        assert self.attention.shape == (S, N, N), f"Packing.attention: expected {(S, N, N)}, got {tuple(self.attention.shape)}"
        assert self.index.shape == self.row_mask.shape, "Packing: index and row_mask must both be [B, T]"

    @property
    def tokens(self) -> int:
        """Positions the model computes for real nodes (what the learner's FLOPs charge)."""
        return int(self.valid.sum())

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """Per-node outputs [S, N, ...] -> per-row-token outputs [B, T, ...] (row padding: node 0's)."""
        S, N = self.input_ids.shape
        return x.reshape(S * N, *x.shape[2:])[self.index]  # [B, T, ...]

    def logprobs(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """`losses.token_logprobs` of the rows from the packed logits [S, N, V]: out[b, t] =
        log p(input_ids[b, t] | row b's tokens before t), read at the node of token t - 1; column 0 and
        row padding are 0. [B, T]"""
        S, N, V = logits.shape
        flat = _wide(logits.reshape(S * N, V))  # [S*N, V]
        prev = self.index[:, :-1]  # [B, T-1], the node whose output predicts token t
        chosen = flat[prev, input_ids[:, 1:]]  # [B, T-1]
        lse = torch.logsumexp(flat, dim=-1)[prev]  # [B, T-1]
        logprobs = torch.where(self.row_mask[:, 1:], chosen - lse, torch.zeros_like(chosen))  # [B, T-1]
        return torch.cat([torch.zeros_like(logprobs[:, :1]), logprobs], dim=1)  # [B, T]

    @torch.no_grad()
    def entropy(self, logits: torch.Tensor) -> torch.Tensor:
        """`losses.token_entropy` of the rows from the packed logits [S, N, V] (a metric: no gradient).
        [B, T]"""
        log_p = torch.log_softmax(_wide(logits), dim=-1)  # [S, N, V]
        per_node = -(log_p.exp() * log_p).sum(dim=-1)  # [S, N]
        entropy = torch.where(self.row_mask[:, 1:], self.rows(per_node)[:, :-1], 0.0)  # [B, T-1]
        return torch.cat([torch.zeros_like(entropy[:, :1]), entropy], dim=1)  # [B, T]


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (as losses.token_logprobs computes)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_tokens: int) -> Packing:
    """Right-padded rows [B, T] (real tokens where attention_mask is 1) -> their `Packing`, sequences of
    at most `max_tokens` nodes (every row must fit: T <= max_tokens)."""
    B, T = input_ids.shape
    assert attention_mask.shape == (B, T), f"pack_rows: attention_mask {tuple(attention_mask.shape)} != {(B, T)}"
    ids, lengths = input_ids.tolist(), attention_mask.sum(dim=1).tolist()
    assert max(lengths, default=0) <= max_tokens, (
        f"pack_rows: a row of {max(lengths)} tokens cannot fit sequences of max_tokens={max_tokens}")

    # the trie: nodes are created after their parents, so node order is topological
    token, parent, depth, children, roots = [], [], [], [], []
    child_of: dict[tuple[int, int], int] = {}
    row_nodes = []
    for b in range(B):
        p, nodes = -1, []
        for t in range(int(lengths[b])):
            n = child_of.get((p, ids[b][t]))
            if n is None:
                n = child_of[(p, ids[b][t])] = len(token)
                token.append(ids[b][t])
                parent.append(p)
                depth.append(t)
                children.append([])
                (children[p] if p >= 0 else roots).append(n)
            nodes.append(n)
            p = n
        row_nodes.append(nodes)

    # depth-first (pre-)order and subtree sizes: subtree(n) = order[rank[n] : rank[n] + size[n]]
    order, stack = [], list(reversed(roots))
    while stack:
        n = stack.pop()
        order.append(n)
        stack.extend(reversed(children[n]))
    rank = [0] * len(token)
    for i, n in enumerate(order):
        rank[n] = i
    size = [1] * len(token)
    for n in range(len(token) - 1, -1, -1):
        if parent[n] >= 0:
            size[parent[n]] += size[n]

    def layout(budget: int) -> list[set[int]]:
        """The sequences (node sets, each closed under ancestors) of at most `budget` nodes."""
        # chunks: the highest subtrees that fit together with their ancestors, in depth-first order
        chunks, stack = [], list(reversed(roots))
        while stack:
            n = stack.pop()
            if depth[n] + size[n] <= budget:
                chunks.append(n)
            else:  # a node whose subtree does not fit has children (every whole row fits)
                stack.extend(reversed(children[n]))
        # chunks added greedily while their new nodes (subtree + ancestors not yet there) fit
        sequences, members = [], set()
        for n in chunks:
            ancestors, a = [], parent[n]
            while a >= 0:
                ancestors.append(a)
                a = parent[a]
            if members and len(members) + size[n] + sum(a not in members for a in ancestors) > budget:
                sequences.append(members)
                members = set()
            members.update(ancestors)
            members.update(order[rank[n]:rank[n] + size[n]])
        return sequences + [members] if members else sequences

    # the smallest budget that needs no more sequences than max_tokens does: sequences are padded to the
    # longest, and padding is computed too (one group of 1,100 nodes: 2 x 550, not 1,024 + 76 padded)
    count = len(layout(max_tokens))
    lo, hi = max(lengths, default=1), max_tokens
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(layout(mid)) <= count else (mid + 1, hi)
    sequences = layout(hi)

    S, N = len(sequences), max((len(m) for m in sequences), default=1)
    packed_ids = torch.zeros((S, N), dtype=torch.long)  # [S, N]
    positions = torch.zeros((S, N), dtype=torch.long)  # [S, N]
    attention = torch.eye(N, dtype=torch.bool).repeat(S, 1, 1)  # [S, N, N], padding sees itself
    valid = torch.zeros((S, N), dtype=torch.bool)  # [S, N]
    where = []  # where[s][node] = its index in sequence s
    for s, members in enumerate(sequences):
        nodes = sorted(members, key=rank.__getitem__)  # depth-first order
        ranks = [rank[n] for n in nodes]
        L = len(nodes)
        # tout: the first later node outside n's subtree (members are closed under ancestors, so the
        # members of n's subtree follow n contiguously)
        tout = torch.tensor([bisect.bisect_left(ranks, rank[n] + size[n]) for n in nodes])  # [L]
        tin = torch.arange(L)  # [L]
        attention[s, :L, :L] = (tin[None, :] <= tin[:, None]) & (tin[:, None] < tout[None, :])  # [q, k]
        packed_ids[s, :L] = torch.tensor([token[n] for n in nodes])
        positions[s, :L] = torch.tensor([depth[n] for n in nodes])
        valid[s, :L] = True
        where.append({n: i for i, n in enumerate(nodes)})

    # each row reads the first sequence that holds its last token (all its ancestors are there too; a
    # row ending at a node whose subtree was split finds that node as an ancestor of a later chunk)
    holder: dict[int, int] = {}
    for s, members in enumerate(sequences):
        for n in members:
            holder.setdefault(n, s)
    index = torch.zeros((B, T), dtype=torch.long)  # [B, T]
    for b, nodes in enumerate(row_nodes):
        if nodes:
            s = holder[nodes[-1]]
            index[b, :len(nodes)] = torch.tensor([s * N + where[s][n] for n in nodes])
    device = input_ids.device
    return Packing(input_ids=packed_ids.to(device), position_ids=positions.to(device),
                   attention=attention.to(device), valid=valid.to(device), index=index.to(device),
                   row_mask=attention_mask.bool())
