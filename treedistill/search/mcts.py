"""Batched, parallel Monte-Carlo tree search over reasoning steps (AlphaZero-style; optional rollouts).

The search is handed three batched callables (five with the options that need them) and never sees
a model (the shape of mctx's `search`):
- `expand(requests) -> [[Candidate, ...], ...]`: K sampled steps for each node (the caller samples
  from the policy at its temperature, 0.8 in the reference, with its own maximum step length).
- `value(requests) -> [float, ...]`: the value head on each new NON-terminal leaf's prefix.
- `reward(requests) -> [float, ...]`: the environment's dense reward for each new terminal node.
- `rollout(requests) -> [LeafRollout, ...]` (only with `rollout_lambda` > 0): one policy rollout from
  each new non-terminal leaf to a finished line, with its terminal value z. The leaf's value is
  AlphaGo's mix (Silver et al. 2016, Nature 529, Methods, leaf evaluation:
  V(s_L) = (1 - lambda) * v_theta(s_L) + lambda * z_L); at lambda = 1 `value` is not called.
  The rollout is kept on the leaf (`tree.rollout`), so its finished line is an answer candidate.
- `step_key(tokens) -> hashable` (only with `merge="canonical"`): the canonical form of a step;
  sibling steps with the same (terminal, key) are merged as identical steps are.
- `answer(requests) -> [hashable | None, ...]` (only with `repeat_penalty` > 0): the answer a finished
  line holds (None: no answer); each request's prefix is the whole line (a new terminal node's
  path, or a leaf's path plus its rollout).
Terminal nodes go to `reward`, never to `value`, never to `expand`: keeping the environment and
the value head apart means no request carries a flag that changes its meaning. A terminal node's
reward is asked for once, when the node is created, and cached: every later visit backs it up.

One simulation (AlphaZero, Silver et al. 2018):
1. select: from the root follow the selection rule (`select.py`) while the node is expanded;
2. the leaf is then (a) terminal: its cached reward is the value; (b) at `max_depth` steps and
   already evaluated: its cached value-head value; (c) new: it is expanded (its K candidates become
   unvisited children with priors) and evaluated by the value head, and THAT value, the expanded
   leaf's own, is the simulation's value (a node at `max_depth` is only evaluated, never expanded);
3. backup: the value is added exactly once to every node of the path, root included (N += 1,
   W += v); single agent, no sign flips.
Before the first simulation every root is expanded and evaluated (as mctx's `root_fn`): the root's
evaluation counts as its first visit, so after S simulations N(root) = S + 1, and for every
expanded node N(v) = 1 + sum of its children's N (W likewise with its value-head value).

Where this departs from the reference and why:
- the reference counted a new leaf's value twice and expanded terminal children, valuing them with
  the value head on first visit; here the leaf value is backed up once and terminal nodes always
  carry the environment reward;
- identical sibling steps are merged into one child whose prior is the sum (the reference kept
  duplicate children, splitting their visits); with `merge="canonical"`, so are equivalent ones;
- parallel search is lock-step rounds instead of asynchronous workers, so it is deterministic.

Parallel search. Each round, up to `parallel` (W) descents run per tree before any callable is
called; each adds an in-flight (virtual) visit to every node of its path, so the following descents
diverge (and, with `virtual_loss`, see a lowered Q). Each node is reached by at most one counted
descent per round: a descent that ends on a node already reached in this round (a pending leaf, a
node being widened, or a terminal / evaluated max-depth leaf) is a collision: it is not a
simulation, calls nothing and backs nothing up, but keeps its in-flight visits until the end of the
round (so later descents of the round steer further away), then they are removed; a collision on a
terminal or evaluated max-depth leaf ends that tree's round (once the descents converge on leaves
that need no model call, more of them in the round would only repeat the walk). A descent that
ends on a terminal node or an evaluated max-depth node backs up that cached value at the END of the
round, keeping its in-flight visits until then like any other: backing it up at once would retire
its virtual loss at once, and with W > 1 the descents pushed off the pending leaves would pile onto
an already-valued (often known-bad) terminal, inflating its visits past those of better siblings.
Then ALL pending leaves of ALL trees (and the nodes to widen) go to ONE `expand` call, the pending
leaves to ONE `value` call, the new terminal children to ONE `reward` call, and the paths are
backed up. W = 1 is the classic sequential search.

Progressive widening (`widen_c` > 0; off by default, as in the reference). Without it each node is
expanded once with K sampled steps, so a tree is finite: once its lines end in terminal nodes, more
simulations only revisit them. With it, a descent that reaches an expanded node whose sampled
candidates number fewer than widen_c * N^widen_alpha stops there and the node is expanded again (K
more samples; new distinct steps become children, repeats merge into theirs; priors are the mean of
the batches' softmaxes). That descent is not a simulation: nothing is backed up, the new children
are valued when later descents select them (pUCT gives an unvisited child the first-play value).

Deferred expansion (`defer_expansion`; off by default, on at test time). Step 2(c) above expands a
new leaf and values it in the same round, so the steps sampled at a leaf that no later descent comes
back to are paid for and lie on no finished line. With it, a new non-root leaf is only valued (its
rollout, its value head); a later descent that ends on it (valued, not terminal, above `max_depth`)
expands it, and that descent, as a widening, backs nothing up. The root is expanded at once.

Independent subtrees (`subtrees` = S > 1; DVTS, Beeching et al. 2024, "Scaling test-time compute
with open models", Hugging Face search-and-learn). Each prompt gets S trees that share only the
prompt and, with `repeat_penalty`, the answers found (below): each has its own root expansion (K
steps, so S * K first steps), its own simulations (`simulations` split among them), its own Gumbel
stream, and they run in the same lock-step rounds (one `expand` call per round over all trees). The caller picks one answer across a prompt's trees
(`extract.pick_tree`). Requests of a prompt's subtrees carry the same `tree` (the prompt's index).
With subtrees, the searched compute stays the simulations'; only the root's cost is paid S times.

Value-screened roots (`screen` = M > 0; off by default, on at test time where the model ships a value
model). Without it a root's first steps are sampled one expansion at a time and each is valued only
when a descent reaches it, by its rollout: the first rollouts go wherever sampling put the first steps.
With it, M first steps per prompt are sampled at once (before the roots are valued), merged, valued by
`value` (terminal ones by `reward`) and ranked; the best t = `screen_top` (S when 0) are dealt round the
prompt's subtrees, subtree s getting the (s mod t + 1)-th best as its root's only child, so every rollout
goes beneath a first step the value ranked high. The screen is the root's evaluation: a screened root's
first visit backs up its step's screened value, and no rollout starts from the bare prompt. A screened
root counts its step's share of the M samples, ceil(M / t), as sampled: progressive widening adds
(unscreened) first steps to it only once widen_c * N^widen_alpha exceeds that share, that is at larger
budgets, where one first step per subtree could not spend them. The M steps and their values are the
root's cost, paid once per prompt.

Answer-level novelty (`repeat_penalty` > 0). A finished line holds an answer; a line whose answer
its prompt's trees already found adds no candidate for the checker to pick among. A prompt's
subtrees keep one set of the answers of their finished lines; a new line whose answer is already
there is marked `repeat`, and every simulation that ends on it (its rollout at once, a terminal node
on every visit) backs up its value minus `repeat_penalty`: descents are steered away from the steps
that lead back to known answers.
Lines are checked in a round's order (the new leaves' rollouts, then the new terminal nodes). The
line's own value (`tree.value`, a rollout's z) is kept: `pick` compares what the lines are worth.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace

from treedistill.search.contracts import (
    PRIORS,
    SELECT_NAMES,
    Candidate,
    LeafRollout,
    NodeRequest,
    SearchSettings,
    SearchStats,
    TreeStats,
)
from treedistill.search.select import SELECT_RULES, SelectFn
from treedistill.search.tree import ROOT, Tree

ExpandFn = Callable[[list[NodeRequest]], list[list[Candidate]]]
ValueFn = Callable[[list[NodeRequest]], list[float]]
RolloutFn = Callable[[list[NodeRequest]], list[LeafRollout]]
StepKeyFn = Callable[[tuple[int, ...]], Hashable]
AnswerFn = Callable[[list[NodeRequest]], list[Hashable | None]]

# A candidate step's prior logit: the summed log-prob (reference) or the mean per token, which does
# not favour short steps just for being short.
PRIOR_LOGITS: dict[str, Callable[[Candidate], float]] = {
    "sum": lambda c: c.logprob,
    "mean": lambda c: c.logprob / max(len(c.tokens), 1),
}
assert set(PRIOR_LOGITS) == set(PRIORS) and set(SELECT_RULES) == set(SELECT_NAMES), "contracts.py names the rules"


@dataclass(frozen=True)
class _Callables:
    """The caller's callables of one search (rollout / step_key / answer None when their option is off)."""

    expand: ExpandFn
    value: ValueFn
    reward: ValueFn
    rollout: RolloutFn | None
    step_key: StepKeyFn | None
    answer: AnswerFn | None = None


@dataclass
class SearchResult:
    """The searched trees, with `tree.stats`, prompt-major: the S = `subtrees` trees of prompt i are
    `trees[i * S:(i + 1) * S]` (tree i for prompt i when S = 1); and the call accounting."""

    trees: list[Tree]
    stats: SearchStats = field(default_factory=SearchStats)
    subtrees: int = 1

    def of_prompt(self, i: int) -> list[Tree]:
        """The S trees searched for prompt i."""
        return self.trees[i * self.subtrees:(i + 1) * self.subtrees]


def search(
    prompts: Sequence[Sequence[int]],
    expand: ExpandFn,
    value: ValueFn,
    reward: ValueFn,
    config: SearchSettings | None = None,
    *,
    rollout: RolloutFn | None = None,
    step_key: StepKeyFn | None = None,
    answer: AnswerFn | None = None,
    on_round: Callable[[int], None] | None = None,
) -> SearchResult:
    """Search `config.subtrees` trees per prompt (token ids), all trees in lock-step; see the module
    docstring. `rollout` is required when `config.rollout_lambda` > 0, `step_key` when `config.merge` is
    "canonical", `answer` when `config.repeat_penalty` > 0; each is ignored otherwise.
    `on_round(simulations)`, when given, is called after every round with the simulations finished so
    far, all trees together (a caller's progress line)."""
    cfg = config or SearchSettings()
    if any(isinstance(p, (int, str, bytes)) for p in prompts):
        raise ValueError("search: prompts must be a list of token-id sequences, one per tree")
    if cfg.rollout_lambda > 0 and rollout is None:
        raise ValueError(f"search: rollout_lambda={cfg.rollout_lambda} needs a `rollout` callable")
    if cfg.merge == "canonical" and step_key is None:
        raise ValueError("search: merge='canonical' needs a `step_key` callable")
    if cfg.repeat_penalty > 0 and answer is None:
        raise ValueError(f"search: repeat_penalty={cfg.repeat_penalty} needs an `answer` callable")
    callables = _Callables(expand, value, reward, rollout if cfg.rollout_lambda > 0 else None,
                           step_key if cfg.merge == "canonical" else None,
                           answer if cfg.repeat_penalty > 0 else None)
    stats = SearchStats()
    start = time.perf_counter()
    subtrees = cfg.subtrees
    trees = [Tree(p, index=i, subtree=s) for i, p in enumerate(prompts) for s in range(subtrees)]
    for i in range(len(prompts)):  # a prompt's subtrees hold one answer set (repeat_penalty)
        shared: set[Hashable] = set()
        for tree in trees[i * subtrees:(i + 1) * subtrees]:
            tree.answers = shared
    # Subtree s > 0 draws from its own stream; subtree 0 from the one-tree search's.
    rngs = {(t.index, t.subtree): random.Random(f"{cfg.seed}/{t.index}" + (f"/{t.subtree}" if t.subtree else ""))
            for t in trees}
    # Each tree's own settings: its share of the simulations (the stop rule's and Gumbel's schedule's).
    share, extra = divmod(cfg.simulations, subtrees)
    own = {n: replace(cfg, simulations=n) for n in {share, share + 1} if n > 0}
    tree_cfg = {id(t): own.get(share + (t.subtree < extra)) for t in trees}
    for tree in trees:
        tree.stats = TreeStats()
    select = SELECT_RULES[cfg.select]

    for tree in trees:
        tree.add_virtual([ROOT])
    if cfg.screen:
        _screen_roots(trees, subtrees, callables, cfg, rngs, stats)
    roots = [(tree, [ROOT]) for tree in trees if tree.value[ROOT] is None]
    _expand_evaluate_backup(roots, callables, cfg, rngs, stats)

    def unfinished(t: Tree) -> bool:
        return tree_cfg[id(t)] is not None and t.stats.simulations < tree_cfg[id(t)].simulations

    active = [t for t in trees if unfinished(t)]
    while active:
        stats.rounds += 1
        pending: list[tuple[Tree, list[int]]] = []   # new leaves: expand + evaluate
        widened: list[tuple[Tree, list[int]]] = []   # expanded nodes to widen: expand only
        known: list[tuple[Tree, list[int]]] = []     # leaves with a cached value: back it up
        collided: list[tuple[Tree, list[int]]] = []
        for tree in active:
            _descents(tree, select, tree_cfg[id(tree)], pending, widened, known, collided)
        _expand_evaluate_backup(pending, callables, cfg, rngs, stats, widened)
        for tree, path in known:
            tree.backup(path, _backed_value(tree, path[-1], cfg))
            tree.stats.simulations += 1
        for tree, path in collided:
            tree.add_virtual(path, -1)
        active = [t for t in active if unfinished(t)]
        if on_round is not None:
            on_round(sum(t.stats.simulations for t in trees))

    for tree in trees:
        tree.stats.nodes = len(tree)
    stats.wall_s = time.perf_counter() - start
    return SearchResult(trees, stats, subtrees)


def _backed_value(tree: Tree, node: int, cfg: SearchSettings) -> float:
    """The value a simulation ending at `node` backs up: its value, less `repeat_penalty` when its
    finished line repeats an answer the tree already held."""
    value = tree.value[node]
    return value - cfg.repeat_penalty if tree.repeat[node] else value


def _descents(tree: Tree, select: SelectFn, cfg: SearchSettings, pending: list, widened: list, known: list,
              collided: list) -> None:
    """One round of up to W descents in `tree`, each filed by where it ended. A node is reached by at
    most one counted descent per round, whatever it is (new leaf, node to widen, terminal or evaluated
    max-depth leaf): a later descent to it is a collision. Cached values are backed up at the end of
    the round, not at once, so the in-flight visits steer the round's other descents away from a
    known leaf just as from a pending one (otherwise every descent that the virtual loss pushes off
    the pending leaves piles onto the free, already-valued terminals). The tree's round ends early at
    a collision on a known leaf: the in-flight visits no longer spread the descents there, and the
    rest would mostly walk again to the same leaves, which need no model call anyway."""
    tree.stats.rounds += 1
    reached: set[int] = set()
    for _ in range(cfg.parallel):
        if tree.stats.simulations + len(reached) >= cfg.simulations:
            break
        path = _descend(tree, select, cfg)
        leaf = path[-1]
        if leaf in reached:
            collided.append((tree, path))
            tree.stats.collisions += 1
            if tree.value[leaf] is not None and not tree.expanded[leaf] and not _expandable(tree, leaf, cfg):
                break  # a known leaf again: the in-flight visits no longer spread the descents
            continue
        reached.add(leaf)
        if tree.expanded[leaf] or _expandable(tree, leaf, cfg):
            widened.append((tree, path))
        elif tree.value[leaf] is not None:
            known.append((tree, path))
        else:
            pending.append((tree, path))


def _expandable(tree: Tree, node: int, cfg: SearchSettings) -> bool:
    """With `defer_expansion`: a valued leaf that is neither terminal nor at `max_depth`, whose
    steps are sampled now that a descent came back to it."""
    return (cfg.defer_expansion and tree.value[node] is not None and not tree.expanded[node]
            and not tree.terminal[node] and (cfg.max_depth is None or tree.depth[node] < cfg.max_depth))


def widens(tree: Tree, node: int, cfg: SearchSettings) -> bool:
    """Progressive widening (Coulom 2007; Couetoux et al. 2011, for sampled actions): an expanded
    node gets K more sampled steps while its sampled candidates are fewer than widen_c * N^alpha.
    Counting samples, not distinct children, bounds the re-expansions of a node whose samples keep
    merging into the same few steps."""
    if cfg.widen_c <= 0 or (node == ROOT and cfg.select == "gumbel"):
        return False
    return tree.sampled[node] < cfg.widen_c * tree.visits[node] ** cfg.widen_alpha


def _descend(tree: Tree, select: SelectFn, cfg: SearchSettings) -> list[int]:
    """Follow the selection rule from the root while the node is expanded and is not due for
    widening; mark the path in flight. The in-flight visits are added after the walk, so a descent
    does not count itself (as W = 1)."""
    node, path = ROOT, [ROOT]
    widening = cfg.widen_c > 0
    while tree.expanded[node] and not (widening and widens(tree, node, cfg)):
        node = select(tree, node, cfg)
        path.append(node)
    tree.stats.selections += len(path) - 1
    tree.add_virtual(path)
    return path


def _timed(fn, requests, stats: SearchStats, what: str) -> list:
    """Call a user callable on a batch, time it, and check it answered once per request."""
    t0 = time.perf_counter()
    out = list(fn(requests))
    stats.callback_s += time.perf_counter() - t0
    if len(out) != len(requests):
        raise ValueError(f"search: {what} returned {len(out)} results for {len(requests)} requests")
    return out


def _finite(values: list, what: str) -> list[float]:
    out = [float(v) for v in values]
    for v in out:
        if not math.isfinite(v):
            raise ValueError(f"search: {what} returned a non-finite value {v}")
    return out


def _leaf_values(requests: list[NodeRequest], fns: _Callables, cfg: SearchSettings,
                 stats: SearchStats) -> tuple[list[float], list[LeafRollout | None]]:
    """The new leaves' values and rollouts: the value head V (one `value` call, skipped at
    lambda = 1), the rollouts' z (one `rollout` call, skipped at lambda = 0), mixed as AlphaGo's
    v = (1 - lambda) * V + lambda * z. At lambda = 0 the values are the value head's, unchanged."""
    lam = cfg.rollout_lambda
    head: list[float] = []
    rollouts: list[LeafRollout | None] = [None] * len(requests)
    if lam < 1:
        stats.value_calls += 1
        head = _finite(_timed(fns.value, requests, stats, "value"), "value")
    if lam == 0:
        return head, rollouts
    stats.rollout_calls += 1
    rollouts = _timed(fns.rollout, requests, stats, "rollout")
    for r in rollouts:
        if not isinstance(r, LeafRollout):
            raise ValueError(f"search: rollout must return LeafRollout objects, got {type(r).__name__}")
    z = _finite([r.value for r in rollouts], "rollout")
    if lam == 1:
        return z, rollouts
    return [(1 - lam) * v + lam * zi for v, zi in zip(head, z)], rollouts


def _expand_evaluate_backup(pending, fns: _Callables, cfg: SearchSettings, rngs, stats: SearchStats,
                            widened=()) -> None:
    """Expand the new leaves and the nodes to widen of a round (one call over all trees), value
    the new leaves (one `value` call and / or one `rollout` call), score the new terminal children
    (one call), then back up each new leaf's value along its path. A widening backs nothing up: it is not a simulation (its
    node's N does not grow, and its new children are valued when a later descent reaches them);
    its in-flight visits are removed."""
    if not pending and not widened:
        return
    requests = [tree.request(path[-1]) for tree, path in pending]
    to_expand = [(pending[i], requests[i]) for i, (tree, path) in enumerate(pending)
                 if (cfg.max_depth is None or tree.depth[path[-1]] < cfg.max_depth) and not tree.expanded[path[-1]]
                 and not (cfg.defer_expansion and path[-1] != ROOT)]
    to_expand += [(entry, entry[0].request(entry[1][-1])) for entry in widened]
    candidates: list[list[Candidate]] = []
    if to_expand:
        stats.expand_calls += 1
        candidates = _timed(fns.expand, [r for _, r in to_expand], stats, "expand")
    values: list[float] = []
    rollouts: list[LeafRollout | None] = []
    if requests:
        values, rollouts = _leaf_values(requests, fns, cfg, stats)

    new_terminal: list[tuple[Tree, int]] = []
    for ((tree, path), request), cands in zip(to_expand, candidates):
        tree.stats.expand_requests += 1
        tree.stats.request_tokens += len(request.prefix)
        tree.stats.step_tokens += sum(len(c.tokens) for c in cands)
        for child in _add_children(tree, path[-1], cands, cfg, rngs[tree.index, tree.subtree], fns.step_key):
            if tree.terminal[child]:
                new_terminal.append((tree, child))
    for tree, path in widened:
        tree.add_virtual(path, -1)
        tree.stats.widenings += int(tree.expansions[path[-1]] > 1)
    if new_terminal:
        stats.reward_calls += 1
        rewards = _finite(_timed(fns.reward, [t.request(n) for t, n in new_terminal], stats, "reward"),
                          "reward")
        for (tree, node), r in zip(new_terminal, rewards):
            tree.value[node] = r
            tree.stats.reward_requests += 1

    for (tree, path), request, v, roll in zip(pending, requests, values, rollouts):
        leaf = path[-1]
        tree.value[leaf] = v
        if cfg.rollout_lambda < 1:
            tree.stats.value_requests += 1
            tree.stats.request_tokens += len(request.prefix)
        if roll is not None:
            tree.rollout[leaf] = roll
            tree.stats.rollout_requests += 1
            tree.stats.rollout_tokens += len(roll.tokens)
            tree.stats.request_tokens += len(request.prefix)
    if fns.answer is not None:
        lines = [(tree, path[-1], NodeRequest(r.tree, r.node, r.prefix + roll.tokens, r.prompt_len, r.depth))
                 for (tree, path), r, roll in zip(pending, requests, rollouts) if roll is not None]
        lines += [(tree, node, tree.request(node)) for tree, node in new_terminal]
        _mark_repeats(lines, fns.answer, stats)
    for tree, path in pending:
        leaf = path[-1]
        tree.backup(path, _backed_value(tree, leaf, cfg))
        if leaf != ROOT:
            tree.stats.simulations += 1


def _screen_roots(trees: list[Tree], subtrees: int, fns: _Callables, cfg: SearchSettings, rngs,
                  stats: SearchStats) -> None:
    """Value-screened roots (`screen` = M > 0; the module docstring). For each prompt: ceil(M / K) root
    requests in one `expand` call over all prompts; their steps merged as siblings are (in a scratch tree
    per prompt, so the merge and the priors are `_add_children`'s); the non-terminal ones valued in one
    `value` call, the terminal ones scored in one `reward` call; ranked by value (ties: sampled more often,
    then sampled first). Subtree s of the prompt gets the (s mod t)-th of the t = min(kept_first_steps, n)
    best of the n ranked steps as its root's only child (prior 1); the root counts as expanded once, with
    its step's share of the samples, ceil(M / kept_first_steps), as sampled (what widening compares
    with), and as evaluated: its first visit backs up the step's screened value. The cost (requests, step
    tokens, values) is booked on the prompt's first subtree."""
    firsts = trees[::subtrees]
    per_root = -(-cfg.screen // cfg.k_children)
    stats.expand_calls += 1
    sampled = _timed(fns.expand, [t.request(ROOT) for t in firsts for _ in range(per_root)], stats, "expand")
    scratch = []
    for i, tree in enumerate(firsts):
        cands = [c for batch in sampled[i * per_root:(i + 1) * per_root] for c in batch]
        pool = Tree(tree.prompt, index=tree.index)
        pool.stats = TreeStats()
        _add_children(pool, ROOT, cands, cfg, random.Random(0), fns.step_key)
        scratch.append(pool)
        tree.stats.expand_requests += per_root
        tree.stats.request_tokens += per_root * len(tree.prompt)
        tree.stats.step_tokens += sum(len(c.tokens) for c in cands)
    open_steps = [(pool, child) for pool in scratch for child in pool.children[ROOT] if not pool.terminal[child]]
    ended = [(pool, child) for pool in scratch for child in pool.children[ROOT] if pool.terminal[child]]
    if open_steps:
        stats.value_calls += 1
        values = _finite(_timed(fns.value, [p.request(c) for p, c in open_steps], stats, "value"), "value")
        for (pool, child), v in zip(open_steps, values):
            pool.value[child] = v
        for pool, tree in zip(scratch, firsts):
            valued = [c for p, c in open_steps if p is pool]
            tree.stats.value_requests += len(valued)
            tree.stats.request_tokens += sum(len(pool.request(c).prefix) for c in valued)
    if ended:
        stats.reward_calls += 1
        rewards = _finite(_timed(fns.reward, [p.request(c) for p, c in ended], stats, "reward"), "reward")
        for (pool, child), r in zip(ended, rewards):
            pool.value[child] = r
            firsts[scratch.index(pool)].stats.reward_requests += 1
    kept: list[tuple[Tree, int]] = []
    top = cfg.kept_first_steps
    share = -(-per_root * cfg.k_children // top)  # the samples each kept step stands for
    for i, pool in enumerate(scratch):
        ranked = sorted(pool.children[ROOT], key=lambda c: (-pool.value[c], -pool.count[c], c))
        for s, tree in enumerate(trees[i * subtrees:(i + 1) * subtrees]):
            pick = ranked[s % min(top, len(ranked))]
            child = tree.add_node(ROOT, pool.tokens[pick], pool.logprob[pick], 1.0, terminal=pool.terminal[pick],
                                  finish=pool.finish[pick], token_logprobs=pool.token_logprobs[pick])
            tree.count[child] = pool.count[pick]
            tree.gumbel[child] = cfg.gumbel_scale * -math.log(rngs[tree.index, tree.subtree].expovariate(1.0) or 5e-324)
            if pool.terminal[pick]:
                tree.value[child] = pool.value[pick]
                kept.append((tree, child))
            tree.expanded[ROOT] = True
            tree.expansions[ROOT] = 1
            tree.sampled[ROOT] = share
            tree.stats.max_depth = 1
            tree.value[ROOT] = pool.value[pick]  # the root's evaluation: its step's screened value
            tree.backup([ROOT], pool.value[pick])
    if fns.answer is not None:
        _mark_repeats([(tree, node, tree.request(node)) for tree, node in kept], fns.answer, stats)


def _mark_repeats(lines: list[tuple[Tree, int, NodeRequest]], answer: AnswerFn, stats: SearchStats) -> None:
    """Ask `answer` for the answers of a round's new finished lines (one call), in order; a line whose
    answer its prompt's trees already hold is marked `repeat`, a new one is added to their answers."""
    if not lines:
        return
    keys = _timed(answer, [r for _, _, r in lines], stats, "answer")
    for (tree, node, _), key in zip(lines, keys):
        if key is None:
            continue
        if key in tree.answers:
            tree.repeat[node] = True
            tree.stats.repeats += 1
        else:
            tree.answers.add(key)


def _add_children(tree: Tree, node: int, cands: list[Candidate], cfg: SearchSettings,
                  rng: random.Random, step_key: StepKeyFn | None = None) -> list[int]:
    """Turn `node`'s sampled candidates into children: priors by softmax over their prior logits,
    identical steps merged into one child whose prior is the sum (identical: the same tokens; with
    `step_key`, the same terminal flag and key, the child keeping the first sample's tokens). When the node already has children
    (widening: its e-th expansion, e > 1), the prior is the mean over the e batches of each batch's
    softmax (old priors times (e - 1) / e, the new batch's shares times 1 / e), so it still sums to 1;
    a new sample identical to an existing child merges into it. Returns the NEW child ids."""
    if not cands:
        raise ValueError(f"search: expand returned no candidate for node {node} of tree {tree.index}")
    for c in cands:
        if not isinstance(c, Candidate):
            raise ValueError(f"search: expand must return Candidate objects, got {type(c).__name__}")
        if not c.terminal and not c.tokens:
            raise ValueError("search: expand returned an empty non-terminal step")
        if not math.isfinite(c.logprob):
            raise ValueError(f"search: expand returned a non-finite log-prob {c.logprob}")
        if c.token_logprobs and len(c.token_logprobs) != len(c.tokens):
            raise ValueError(f"search: expand returned {len(c.token_logprobs)} token log-probs for a "
                             f"step of {len(c.tokens)} tokens")
    logits = [PRIOR_LOGITS[cfg.prior](c) for c in cands]
    top = max(logits)
    exp = [math.exp(x - top) for x in logits]
    batch = tree.expansions[node] + 1
    z = sum(exp) * batch
    old = tree.children[node]
    for child in old:
        tree.prior[child] *= (batch - 1) / batch
    def key(tokens: tuple[int, ...], terminal: bool) -> Hashable:
        return tokens if step_key is None else (terminal, step_key(tokens))

    by_key: dict[Hashable, int] = {key(tree.tokens[child], tree.terminal[child]): child for child in old}
    new: list[int] = []
    for c, e in zip(cands, exp):
        tokens = tuple(int(t) for t in c.tokens)
        k = key(tokens, bool(c.terminal))
        if k in by_key:
            child = by_key[k]
            tree.prior[child] += e / z
            tree.count[child] += 1
        else:
            by_key[k] = tree.add_node(node, tokens, float(c.logprob), e / z,
                                      terminal=bool(c.terminal), finish=c.finish,
                                      token_logprobs=tuple(float(x) for x in c.token_logprobs))
            new.append(by_key[k])
    tree.expanded[node] = True
    tree.expansions[node] = batch
    tree.sampled[node] += len(cands)
    if node == ROOT:
        # Gumbel(0, 1) = -log(E), E ~ Exp(1); drawn for every rule so the random stream of a tree
        # does not depend on the rule. `or` guards the E = 0 draw (probability 2^-53).
        for child in new:
            tree.gumbel[child] = cfg.gumbel_scale * -math.log(rng.expovariate(1.0) or 5e-324)
    tree.stats.max_depth = max(tree.stats.max_depth, tree.depth[node] + 1)
    return new
