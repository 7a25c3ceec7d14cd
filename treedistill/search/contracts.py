"""The search's contracts: its one settings type and the small data that crosses its edge.

`SearchSettings` is THE set of search options, under the same names everywhere: the training config's
`search:` block (YAML, `--set search.x=`), the CLI flags (`--c-puct`, `--k-children`, ...) of
`treedistill search`, `eval --search mcts`, `testtime` and `bench search`, and the test-time sweep.
Each caller may start from its own defaults (training: `TRAINING_SEARCH`); the names are one set.
The core (`search.mcts`) reads the tree options; `k_children`, `temperature` and `step_max_tokens`
belong to the caller's `expand` (rollout/tree_search.py), `problems_at_once` to the caller's batching;
`rollout_lambda`, `merge` and `repeat_penalty` are the core's, and need the caller's `rollout` /
`step_key` / `answer` callables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from treedistill.errors import UsageError, shown

__all__ = ["INSPECT_SEARCH", "RENAMED", "TEST_TIME_SEARCH", "TRAINING_SEARCH", "Candidate", "LeafRollout",
           "NodeRequest", "SearchSettings", "SearchStats", "TreeStats"]

# Names the search options had before they were one type: a config key or field under the old name
# is refused with the new one.
RENAMED = {"c": "c_puct", "k": "k_children", "trees_per_call": "problems_at_once"}

SELECT_NAMES = ("puct", "uct", "gumbel")  # the keys of search.select.SELECT_RULES
PICKS = ("visits", "best")                # the keys of search.extract.ROOT_CHOICE's path rules
PRIORS = ("sum", "mean")                  # the keys of search.mcts.PRIOR_LOGITS
MERGES = ("tokens", "canonical")          # how identical sibling steps are recognised


@dataclass(frozen=True)
class SearchSettings:
    """Options of one search. Invalid values raise UsageError naming the field (`search.<name>`)."""

    # budget and batching
    simulations: int = 64        # simulations per problem (the reference ran ~1,600: 16 workers x 100)
    # Independent subtrees per problem (DVTS, Beeching et al. 2024, Hugging Face search-and-learn): S
    # trees of the same prompt searched in lock-step, `simulations` split among them (S - r trees get
    # simulations // S, the first r one more), the answer picked across them (search.extract.pick_tree).
    # 1: one tree per problem.
    subtrees: int = 1
    parallel: int = 16           # W: descents per tree per round (16 workers in the reference); 1 = sequential
    problems_at_once: int = 12   # trees searched in lock-step per search call (the caller's batching)
    # selection
    select: str = "puct"         # selection rule: "puct" | "uct" | "gumbel" (select.SELECT_RULES)
    c_puct: float = 0.5          # exploration constant of pUCT, and UCT's c (reference pUCT: 0.5)
    fpu: float = 0.0             # first-play value: Q of a child with no real visit (reference: 0)
    q_normalize: bool = False    # map Q (fpu included) to [0, 1] by the tree's min / max node value (pUCT, UCT)
    # Value lowered per in-flight visit (0: in-flight visits only count). 1.0 as in the reference, which
    # keeps W parallel descents apart (collisions and rounds measured: docs/log.md, "virtual loss").
    virtual_loss: float = 1.0
    max_depth: int | None = 16   # steps from the root; a node this deep is evaluated, never expanded; None = no limit
    prior: str = "sum"           # prior logit of a candidate step: "sum" | "mean" log-prob
    gumbel_k: int = 16           # Gumbel: root children considered by Sequential Halving (mctx: 16)
    gumbel_scale: float = 1.0    # Gumbel: noise scale (0: deterministic)
    value_scale: float = 0.1     # Gumbel completed-Q scale (mctx default)
    maxvisit_init: float = 50.0  # Gumbel completed-Q visit offset (mctx default)
    # expansion (the caller's `expand`)
    k_children: int = 4          # K: steps sampled per expansion (reference: 4)
    temperature: float = 0.8     # sampling temperature of expansions (reference: 0.8)
    step_max_tokens: int = 64    # a step ends at </step>, end of sequence, or this many tokens
    # Progressive widening (off at 0, the reference: each node is expanded once, K steps): an expanded
    # node is expanded again, K more steps, while the candidates sampled at it are fewer than
    # widen_c * N^widen_alpha. Never at a Gumbel root (Sequential Halving needs a fixed action set).
    widen_c: float = 0.0
    widen_alpha: float = 0.5
    # Deferred expansion: a new non-root leaf is only valued (its rollout, its value head); its steps
    # are sampled when a later descent comes back to it (that descent expands it and, as a widening,
    # backs nothing up), so a leaf no descent comes back to costs no steps. False: a new leaf is
    # expanded and valued at once (AlphaZero).
    defer_expansion: bool = False
    seed: int = 0                # Gumbel noise: tree i draws from Random(f"{seed}/{i}"); training and testtime set it per call
    # The path a tree answers with (search.extract): "visits", the most-visited path (reference,
    # training); "best", the valued terminal node of highest value (ties: more visits, then the
    # earlier node), the way best-of-N picks among its samples; visits when no terminal was valued.
    pick: str = "visits"
    # Leaf evaluation (AlphaGo, Silver et al. 2016): a new non-terminal leaf is valued
    # v = (1 - rollout_lambda) * V(leaf) + rollout_lambda * z, where z is the terminal value of ONE
    # policy rollout from the leaf to a finished line (the caller's `rollout`). 0 (default): the value
    # head alone, no rollout; 1: the rollout alone, the value head is not called for leaves. Every
    # rollout's finished line is an answer candidate of `pick` (search.extract).
    rollout_lambda: float = 0.0
    # Sibling steps merged into one child: "tokens" (default), identical token ids; "canonical", the
    # same canonical form under the caller's `step_key` (the environment's `canonical_step`, e.g.
    # Countdown's `4*5=20` == `5*4=20` == `4 * 5 = 20`).
    merge: str = "tokens"
    # Answer-level novelty: a finished line (a new terminal node, or a leaf's rollout) whose answer the
    # tree already holds (the caller's `answer`; None, no legal answer, never repeats) backs up its value
    # minus this penalty, on every visit, so the search spends its descents where new answers come from.
    # The line keeps its own value for `pick`. 0 (default): a repeated answer is valued as any other.
    repeat_penalty: float = 0.0
    # Value-screened roots (0: off): the prompt's first steps are sampled once, `screen` of them (ceil(screen
    # / K) root requests in one `expand` call), merged as siblings are, and ranked by the caller's `value`
    # (a terminal one by `reward`); the best `kept_first_steps` of them (screen_top, 0: S, at most S) are
    # dealt round the S subtrees, subtree s starting from the (s mod kept + 1)-th best as its root's only
    # child. A screened root is valued by its step's screened value (no rollout from the prompt) and counts
    # its step's share of the samples (ceil(screen / kept)) as sampled, so widening adds first steps to it
    # only once its visits call for more than that share. What a first step is worth then decides where
    # the rollouts go.
    screen: int = 0
    screen_top: int = 0

    @property
    def kept_first_steps(self) -> int:
        """How many of the screened first steps the subtrees start from: screen_top (0: S), at most S."""
        return min(self.screen_top or self.subtrees, self.subtrees)

    def __post_init__(self):
        problems = self.errors()
        if problems:
            raise UsageError("invalid search settings: " + "; ".join(problems))

    def errors(self) -> list[str]:
        """What is wrong with these settings, one message per field (empty when they are valid)."""
        out = []
        for name in ("c_puct", "fpu", "virtual_loss", "gumbel_scale", "value_scale", "maxvisit_init",
                     "temperature", "widen_c", "widen_alpha", "rollout_lambda", "repeat_penalty"):
            if not math.isfinite(getattr(self, name)):
                out.append(f"search.{name} must be a finite number (got {getattr(self, name)})")
        if out:
            return out
        for name in ("simulations", "subtrees", "parallel", "problems_at_once", "gumbel_k", "k_children",
                     "step_max_tokens"):
            if getattr(self, name) < 1:
                out.append(f"search.{name} must be >= 1 (got {getattr(self, name)})")
        if self.max_depth is not None and self.max_depth < 1:
            out.append(f"search.max_depth must be null or >= 1 (got {self.max_depth})")
        for name, value, allowed in (("select", self.select, SELECT_NAMES), ("pick", self.pick, PICKS),
                                     ("prior", self.prior, PRIORS), ("merge", self.merge, MERGES)):
            if value not in allowed:
                out.append(f"search.{name} must be one of {', '.join(allowed)} (got {shown(value)})")
        for name in ("c_puct", "virtual_loss", "gumbel_scale", "value_scale", "maxvisit_init", "widen_c",
                     "widen_alpha", "repeat_penalty", "screen", "screen_top"):
            if getattr(self, name) < 0:
                out.append(f"search.{name} must be >= 0 (got {getattr(self, name)})")
        if not self.temperature > 0:
            out.append(f"search.temperature must be > 0 (got {self.temperature})")
        if not 0 <= self.rollout_lambda <= 1:
            out.append(f"search.rollout_lambda must be in [0, 1] (got {self.rollout_lambda})")
        return out


# The named search settings: every default of a search lives here, and each caller starts from one of
# them (its CLI flags default to None and replace only the fields they name).
# Training (the config's `search:` block; method mcts and mcts-tree): the reference run's search,
# ~1,600 simulations as 16 workers x 100, 12 trees at once; max_depth None = bounded by the completion's
# token budget only.
TRAINING_SEARCH = SearchSettings(simulations=1600, parallel=16, problems_at_once=12, max_depth=None)
# Test time (`eval --search mcts`, `testtime`, whose simulations are fitted to each budget): rollout
# leaves, c 2, widening 1, the best valued answer, one sampled step per expansion, deferred to a leaf's
# second visit, trees two steps deep (the rest of a line is its rollout), 4 independent subtrees per
# problem, answers the problem's trees already found backed up 2 lower, 8 first steps screened by the
# model's value model where it has one, the best 2 dealt round the subtrees; chosen on training problems
# (docs/log.md).
TEST_TIME_SEARCH = SearchSettings(simulations=64, parallel=8, problems_at_once=32, c_puct=2.0, widen_c=1.0,
                                  pick="best", rollout_lambda=1.0, subtrees=4, repeat_penalty=2.0, k_children=1,
                                  max_depth=2, defer_expansion=True, screen=8, screen_top=2)
# One tree shown (`treedistill search`): training's selection and value-head leaves, the best answer.
INSPECT_SEARCH = SearchSettings(simulations=200, parallel=8, pick="best")


@dataclass(frozen=True)
class Candidate:
    """One sampled step proposed by `expand` for a node.

    tokens: the step's token ids [T], delimiter / end-of-sequence included.
    logprob: summed log-prob of `tokens` under the raw policy (temperature 1): the prior's logit.
    terminal: the step ended the completion (end-of-sequence): the node is scored by the
        environment reward and never expanded.
    finish: why the step ended, the engine's finish reason ("stop" | "eos" | "length").
    token_logprobs: per-token raw-policy log-probs of `tokens` recorded at generation time [T], or
        () when the caller does not track them; kept on the node so that an extracted path carries
        the behaviour log-probs the learner's importance ratios divide by.
    """

    tokens: tuple[int, ...]
    logprob: float
    terminal: bool = False
    finish: str = "stop"
    token_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True)
class LeafRollout:
    """One policy rollout from a non-terminal leaf to a finished line, returned by `rollout`.

    tokens: the rollout's token ids after the leaf's prefix [R] (end-of-sequence included).
    value: z, the finished line's terminal value (the caller's terminal rule: the environment's
        reward, or a verifier-free rule), mixed into the leaf value by `rollout_lambda`.
    token_logprobs: per-token raw-policy log-probs of `tokens` [R], or ().
    finish: the engine's finish reason ("eos" | "length" | "stop").
    """

    tokens: tuple[int, ...]
    value: float
    token_logprobs: tuple[float, ...] = ()
    finish: str = "eos"


@dataclass(frozen=True)
class NodeRequest:
    """One node handed to `expand`, `value` or `reward`.

    tree: index of the tree's prompt (the problem) in the searched batch; with `subtrees` > 1 the S
        trees of one prompt share it.
    node: node id inside that tree (one subtree's).
    prefix: prompt + every step on the root-to-node path, token ids [L + C].
    prompt_len: L, the prompt's tokens, so `prefix[prompt_len:]` is the completion so far [C].
    depth: number of steps from the root (root = 0).
    """

    tree: int
    node: int
    prefix: tuple[int, ...]
    prompt_len: int
    depth: int

    @property
    def completion(self) -> tuple[int, ...]:
        """The generated part of the prefix: the steps on the path, concatenated [C]."""
        return self.prefix[self.prompt_len:]


@dataclass
class TreeStats:
    """Compute accounting of one tree (accumulated during the search; the model's token counts are
    the engine's business)."""

    simulations: int = 0      # finished simulations (values backed up), root evaluation excluded
    expand_requests: int = 0  # nodes sent to `expand` (root included)
    value_requests: int = 0   # nodes sent to `value` (root included)
    reward_requests: int = 0  # terminal nodes sent to `reward`
    rollout_requests: int = 0 # leaves sent to `rollout` (rollout_lambda > 0)
    rollout_tokens: int = 0   # tokens of the rollouts `rollout` returned
    request_tokens: int = 0   # prefix tokens handed to `expand`, `value`, `rollout` (before any KV cache)
    step_tokens: int = 0      # tokens of the candidate steps `expand` returned (duplicates included)
    collisions: int = 0       # descents that ended on a leaf already reached in their round
    widenings: int = 0        # re-expansions of an expanded node (progressive widening)
    repeats: int = 0          # finished lines whose answer the tree already held (with repeat_penalty > 0)
    selections: int = 0       # edges walked by all descents (selection-rule calls)
    rounds: int = 0           # rounds in which this tree ran descents
    nodes: int = 1            # nodes in the tree (root included)
    max_depth: int = 0        # deepest node created, in steps


@dataclass
class SearchStats:
    """Accounting of one `search` call over all its trees."""

    rounds: int = 0
    expand_calls: int = 0      # batched `expand` calls (at most one per round, plus the roots')
    value_calls: int = 0       # batched `value` calls (none in a round that only widens)
    reward_calls: int = 0
    rollout_calls: int = 0
    wall_s: float = 0.0        # whole search
    callback_s: float = 0.0    # inside expand / value / reward / rollout

    @property
    def bookkeeping_s(self) -> float:
        """Time in the search itself: selection, tree updates, backup."""
        return self.wall_s - self.callback_s
