"""Forking trees (method tree-fork): whole chains first, then new lines forked where the policy was least certain.

Per problem: `chains` (M) whole chains are sampled from the prompt; then, in rounds of `per_round`,
`forks` (N) more lines, each sampled from the prefix just before a step of highest uncertainty and
finished to the end. Every line is split into steps at the environment's step delimiter (`</step>`)
and hung in a `search.tree.Tree` (identical steps under one parent are one node, counted as the search
counts a step sampled again), so the credit of
mcts-tree (`rollout.tree_lines.tree_rows`, `search.credit`) applies to it unchanged: every line is a
finished one, and every generated token lies on a line that ends in a terminal node.

A step's uncertainty is its mean token entropy. The engine returns each sampled token's raw-policy
log-prob (`Sample.policy_logprobs`, temperature 1), not the distribution it was drawn from, so the
entropy is ESTIMATED: -log p(x_t) of a token drawn from the policy is an unbiased one-sample estimate
of that position's entropy H_t = E[-log p], and the step's score is the mean of -log p over its tokens.
Sampled at a temperature other than 1 it is a cross-entropy instead (biased, still ranking the
policy's uncertainty); the preset samples at temperature 1.

Sources and where we depart:
- TreeRL (Hou et al., ACL 2025), EPTree: M chains, then forks at the N TOKENS of highest entropy,
  T branches per fork, L rounds. We fork at STEPS (the search's unit, so the tree and its credit are
  mcts-tree's): the score is the step's mean token entropy, and a fork resamples the step itself,
  i.e. ONE new line from the step's parent (T = 1); a step is forked at most once.
- Tree-GRPO (2026): forks whole agent steps from sampled chains, as here; its credit is intra- and
  inter-tree group-relative, ours is mcts-tree's (`search/credit.py`).
- Steps are cut at the delimiter only, not at the search's `step_max_tokens`: a chain is sampled
  whole, so a long step stays one node.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from treedistill.rollout.tree_search import completion_budget
from treedistill.search.tree import ROOT, Tree

__all__ = ["ForkedTree", "fork_problems", "hang_line", "step_ends", "step_entropy"]

_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class ForkedTree:
    """One problem's tree, and what it cost.

    tree: the chains and forks as steps (terminal nodes = the ends of the lines).
    generated_tokens: tokens the engine generated for it (= chain_tokens + fork_tokens).
    forked: the forked steps' node ids, in order; forked_entropy: their scores (mean -log p).
    seconds: wall time of the whole `fork_problems` call (all trees together).
    """

    tree: Tree
    generated_tokens: int
    chain_tokens: int
    fork_tokens: int
    forked: tuple[int, ...]
    forked_entropy: tuple[float, ...]
    seconds: float


def step_ends(policy, tokens: Sequence[int], step_end: str) -> list[int]:
    """End offsets of the steps of `tokens` [T]: a step ends after the first token at which its decoded
    text holds `step_end`; what follows the last delimiter is the last step. [] for no tokens."""
    ends, start = [], 0
    for i in range(len(tokens)):
        if step_end in policy.decode(list(tokens[start:i + 1])):
            ends.append(i + 1)
            start = i + 1
    if start < len(tokens):
        ends.append(len(tokens))
    return ends


def hang_line(tree: Tree, parent: int, tokens: Sequence[int], logprobs: Sequence[float], finish: str,
              ends: Sequence[int]) -> list[int]:
    """Hang a finished line (tokens [T] sampled from `parent`'s prefix, raw-policy log-probs [T], cut at
    `ends`) under `parent` as one node per step, the last one terminal; a step equal to an existing
    child (token ids and terminal flag) is that child, its `count` raised by one. Returns the line's node ids."""
    assert len(tokens) == len(logprobs), f"{len(logprobs)} log-probs for {len(tokens)} tokens"
    assert not ends or ends[-1] == len(tokens), f"step ends {list(ends)} do not end the line of {len(tokens)}"
    nodes, node, start = [], parent, 0
    for end in ends:
        step, lps = tuple(tokens[start:end]), tuple(float(x) for x in logprobs[start:end])
        terminal = end == len(tokens)
        same = [c for c in tree.children[node] if tree.tokens[c] == step and tree.terminal[c] == terminal]
        if same:
            node = same[0]
            tree.count[node] += 1  # sampled again: one node, learned once per sample (rollout/tree_lines.py)
        else:
            node = tree.add_node(node, step, float(sum(lps)), 0.0, terminal=terminal,
                                 finish=finish if terminal else "stop", token_logprobs=lps)
        nodes.append(node)
        start = end
    return nodes


def step_entropy(tree: Tree, node: int) -> float:
    """The step's mean token entropy, estimated by the mean of -log p of its sampled tokens."""
    lps = tree.token_logprobs[node]
    assert lps, f"node {node} has no recorded log-probs"
    return -sum(lps) / len(lps)


def fork_problems(engine, policy, env, problems: Sequence[dict], *, chains: int, forks: int, per_round: int,
                  temperature: float, max_new_tokens: int, seed: int) -> list[ForkedTree]:
    """One forking tree per problem (see the module docstring), all problems in lock-step: the chains
    in one engine call per distinct token budget, then each round's forks in one call per distinct
    remaining budget. Lines are sampled at `temperature` with no stop string, each within its
    completion budget (`max_new_tokens`, and the model's context). Deterministic in `seed`."""
    assert chains >= 1 and forks >= 0 and per_round >= 1, (
        f"need chains >= 1, forks >= 0, per_round >= 1 (got {chains}, {forks}, {per_round})")
    start = time.perf_counter()
    calls = iter(range(1, 1 << 30))
    prompts = [tuple(policy.prompt_ids(env.messages(p, compact=policy.compact_prompt))) for p in problems]
    budgets = [completion_budget(policy, len(p), max_new_tokens) for p in prompts]
    trees = [Tree(p, index=i) for i, p in enumerate(prompts)]
    chain_tokens, fork_tokens = [0] * len(trees), [0] * len(trees)
    forked: list[list[int]] = [[] for _ in trees]
    scores: list[list[float]] = [[] for _ in trees]

    def sample(requests: list[tuple[int, int]], n: int, spent: list[int]) -> None:
        """Sample n lines from each (tree, node) and hang them there: one call per distinct room."""
        rooms: dict[int, list[tuple[int, int]]] = {}
        for i, node in requests:
            rooms.setdefault(budgets[i] - len(trees[i].completion(node)), []).append((i, node))
        for room, members in sorted(rooms.items()):
            prefixes = [prompts[i] + trees[i].completion(node) for i, node in members]
            outputs = engine.sample(prefixes, n=n, max_new_tokens=room, temperature=temperature,
                                    seed=(seed * _SEED_STRIDE + next(calls)) % (1 << 62))
            for (i, node), samples in zip(members, outputs):
                for s in samples:
                    spent[i] += len(s.tokens)
                    tokens, lps = tuple(s.tokens)[:room], tuple(s.policy_logprobs)[:room]
                    finish = s.finish if len(tokens) == len(s.tokens) else "length"
                    hang_line(trees[i], node, tokens, lps, finish, step_ends(policy, tokens, env.step_end))

    sample([(i, ROOT) for i in range(len(trees))], chains, chain_tokens)
    left = forks
    while left > 0:
        take = min(per_round, left)
        requests = []
        for i, tree in enumerate(trees):
            done = set(forked[i])
            candidates = [n for n in range(1, len(tree)) if n not in done and tree.tokens[n]]
            # highest estimated entropy first; the lower node id on ties (deterministic)
            for node in sorted(candidates, key=lambda n: (-step_entropy(tree, n), n))[:take]:
                forked[i].append(node)
                scores[i].append(step_entropy(tree, node))
                requests.append((i, tree.parent[node]))
        if not requests:
            break
        sample(requests, 1, fork_tokens)
        left -= take
    seconds = time.perf_counter() - start
    return [ForkedTree(tree, chain_tokens[i] + fork_tokens[i], chain_tokens[i], fork_tokens[i], tuple(forked[i]),
                       tuple(scores[i]), seconds) for i, tree in enumerate(trees)]
