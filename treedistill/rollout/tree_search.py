"""Search rollouts: the step-level MCTS of `treedistill.search` driven by an Engine, one tree per
problem, and the trajectories the learner (or a test-time answer) takes from the searched trees.

The bridge (`SearchBridge`) turns (engine, policy, env, problems) into the search's three batched
callables, so the search core still never sees a model:
- expand: ONE `engine.sample` call for all requested prefixes, K samples each at the search
  temperature, stopped at the environment's step delimiter (`</step>`) or after `step_max_tokens`;
  each sample becomes a Candidate with its raw-policy per-token log-probs (the prior's logit is
  their sum, and they are the behaviour log-probs of the extracted path);
- value: ONE `engine.value` call (the value head at the last token of each prefix; with a
  `value_engine`, a value model's, `treedistill.value_model`, which the test-time search's screened
  roots read); or, with
  `leaf_value="solver"` (a diagnostic, off by default, never in a preset), the environment's solver
  instead of the head (`LEAF_VALUES`);
- reward: the value of a new TERMINAL node, chosen from `TERMINAL_VALUES`: "reward" (default,
  training and the reference) is the environment's DENSE reward of the decoded completion (end token
  dropped); "value" is the value head at the completion's last token, so the search never consults
  the environment's verdict (test-time comparisons where no method may use the ground truth);
  "legal" is the value head where the completion holds a legal answer and -1 (the bottom of the
  value scale, the environment's no-answer reward) where it does not: no answer, or one that does not
  parse or uses numbers the problem does not give. Legality reads the problem's inputs only (the
  numbers the prompt states, never the target), the same filter best-of-N's selectors apply.
- rollout (only with `search.rollout_lambda` > 0): per new non-terminal leaf ONE sample from its
  prefix to the end of the line (no stop string, at the search temperature, the remaining token
  budget; one engine call per distinct remaining budget, and the native engine reuses the KV of the
  shared prefix), whose finished line is valued by the SAME terminal rule as a terminal node (the
  reward when the verifier is allowed, else "value" / "legal"): that is the rollout's z. Its tokens
  are generated tokens: they go into the engine's counters and this tree's `generated` account.
- step_key (only with `search.merge="canonical"`): the environment's `canonical_step` of a decoded
  step (identity when the environment has none), so equivalent sibling steps merge.
- answer (only with `search.repeat_penalty` > 0): the legal answer value of a finished line
  (`env.answer_value`, the problem's inputs only, never the target; None without one), so the search
  knows which lines repeat an answer its tree already found.

When is a step terminal. At end-of-sequence; or when the completion so far plus the step holds a
closed answer (`env.is_terminal`), so a line ends at `</answer>` even before the model emits its end
token; or when the completion reached its token budget. A step cut at `step_max_tokens` ("length")
is not terminal: the next step continues it.

Token budget per completion. A completion holds at most `max_new_tokens` tokens (and never more than
the model's context minus the prompt), so a line cannot grow without bound: a step that would pass
the budget is cut at it and its node is terminal, scored by the environment (without an answer that
is the no-answer reward, -1.0 on Countdown). All requests of a round share ONE sample call with
max_new_tokens = step_max_tokens, so a step is cut after sampling; the engine counted the cut tokens
as generated, and so does this module's per-tree account. The search's own `max_depth` bounds the
steps: a node that deep is valued by the value head, never expanded.

Extraction and completion. The path is `treedistill.search.extract`'s (most visits; Gumbel's root
action with `select="gumbel"`). A path that stops before a terminal node (too few simulations, or
`max_depth`) is completed by sampling the policy from its end (no stop string, at the search
temperature, the remaining token budget), or, when its last node has a rollout, finished by that
rollout (already generated and counted: no new sample), and marked: `Trajectory.search_tokens` is the length of the
search's part, so a truncated path is never trained on as if complete. Completions with the same
remaining budget share one sample call.

Compute accounting. Per tree: tokens generated for it (steps before any cut, plus its completion
sample) and tokens returned to it. Per batch: the engine's counter deltas (generated tokens,
prefill, cache hits, forward calls) and the wall time split into search bookkeeping and model calls.
Sum over trees of the per-tree generated tokens equals the engine's generated-token delta.
Independent subtrees (`search.subtrees` = S > 1): the S trees of a problem are searched in the same
call; the answer comes from the tree `search.extract.pick_tree` picks, and a problem's accounting
(tokens, nodes, simulations, finished answers) is over all its trees.

Finished answers: the lines of the problem's trees (terminal nodes, rollouts, and the completion sample) that
hold a legal answer (`env.answer_value`, inputs only), `finished_answers`, and how many distinct
answer values they hold, `distinct_answers`, so a caller can report generated tokens per finished answer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from treedistill.envs.base import Env, Score, canonical_step, inputs_only
from treedistill.errors import UsageError
from treedistill.metrics import counter_delta
from treedistill.rollout.trajectory import Trajectory
from treedistill.search import (
    ROOT,
    Candidate,
    Extraction,
    LeafRollout,
    NodeRequest,
    SearchSettings,
    Tree,
    extract,
    pick_tree,
)
from treedistill.search import search as run_search

__all__ = ["LEAF_VALUES", "TERMINAL_VALUES", "BatchCompute", "SearchBridge", "SearchOutcome", "completion_budget",
           "search_problems"]

# Seeds of successive engine calls: base seed times a large prime plus the call's index, so two runs
# with different seeds share no call seed for the first million calls.
_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class BatchCompute:
    """Compute of one `search_problems` call, all trees together.

    engine: deltas of the engine's counters (generated_tokens, prompt_tokens, cached_prompt_tokens,
        scored_tokens, forward_calls) over the whole call, completions included.
    wall_s: the whole call; search_s: inside `search`; model_s: inside the expand / value /
        reward callables; bookkeeping_s = search_s - model_s (selection, tree updates, backup);
        completion_s: sampling the completions of incomplete paths.
    rounds / expand_calls / value_calls / reward_calls / rollout_calls: the search's batched calls;
    completion_calls: engine calls that completed incomplete paths.
    """

    trees: int
    engine: dict
    wall_s: float
    search_s: float
    model_s: float
    bookkeeping_s: float
    completion_s: float
    rounds: int
    expand_calls: int
    value_calls: int
    reward_calls: int
    completion_calls: int
    rollout_calls: int = 0

    @property
    def bookkeeping_share(self) -> float:
        """Share of the search's wall time spent in the tree rather than in the model."""
        return self.bookkeeping_s / self.search_s if self.search_s > 0 else 0.0


@dataclass(frozen=True)
class SearchOutcome:
    """What one problem's search yields.

    trajectory: prompt [P], completion [T] = extracted path's steps [S] + policy completion [T - S],
        behaviour log-probs [T], the reward (`Score.reward`) and the sparse one, search_tokens = S, stats.
    text: the decoded completion (end token dropped); score: env.score of it.
    extraction: the path and, for every node of it, the children's visits / Q / priors.
    tree: the searched tree (for display).
    generated_tokens: tokens generated for this tree (every sampled step before any cut at the
        budget, every rollout, plus the completion sample); returned_tokens: step and rollout tokens
        handed to the search (duplicates included) plus the completion's tokens.
    completion_finish: the completion sample's (or the finishing rollout's) finish reason ("" when
        the path was complete).
    batch: the compute of the whole batch this tree was searched in (shared by its outcomes).
    trees: every tree searched for this problem (`search.subtrees` of them; `tree` is the one the
        answer came from).
    """

    trajectory: Trajectory
    text: str
    score: Score
    extraction: Extraction
    tree: Tree
    generated_tokens: int
    returned_tokens: int
    completion_finish: str
    batch: BatchCompute = field(compare=False)
    trees: tuple[Tree, ...] = field(default=(), compare=False)

    @property
    def completed_by_policy(self) -> bool:
        return not self.extraction.complete


def completion_budget(policy, prompt_len: int, max_new_tokens: int) -> int:
    """Tokens a completion may hold: max_new_tokens, within the model's context after the prompt."""
    room = policy.context_length - prompt_len
    if room < 1:
        raise UsageError(f"prompt of {prompt_len} tokens leaves no room in {policy.name}'s context of "
                         f"{policy.context_length} tokens")
    return min(max_new_tokens, room)


class SearchBridge:
    """The search's expand / value / reward callables over an engine, for a list of problems.

    prompts[i] is problems[i]'s prompt (token ids); budgets[i] its completion token budget.
    `generated[i]` / `returned[i]` accumulate the tokens generated for / returned to tree i;
    `root_generated[i]` the part spent on its root's first expansion and its root's rollout
    (test-time calibration uses it; widening the root later counts as search).
    """

    def __init__(self, engine, policy, env: Env, problems: Sequence[dict], prompts: Sequence[Sequence[int]],
                 *, k: int = 4, temperature: float = 0.8, step_max_tokens: int = 64,
                 max_new_tokens: int = 512, seed: int = 0, terminal_value: str = "reward",
                 leaf_value: str = "head", value_engine=None):
        if terminal_value not in TERMINAL_VALUES:
            raise UsageError(f"terminal value must be one of {', '.join(TERMINAL_VALUES)}, got {terminal_value!r}")
        if leaf_value not in LEAF_VALUES:
            raise UsageError(f"leaf value must be one of {', '.join(LEAF_VALUES)}, got {leaf_value!r}")
        if leaf_value == "solver" and getattr(env, "reachable", None) is None:
            raise UsageError(f"leaf value 'solver' needs an environment with a solver (Countdown); "
                             f"{getattr(env, 'name', type(env).__name__)} has none")
        if k < 1 or step_max_tokens < 1 or max_new_tokens < 1:
            raise UsageError(f"need k, step_max_tokens and max_new_tokens >= 1, got {k}, {step_max_tokens}, "
                             f"{max_new_tokens}")
        if not temperature > 0:
            raise UsageError(f"search temperature must be > 0 (K samples per node), got {temperature}")
        self.engine, self.policy, self.env = engine, policy, env
        self.problems = list(problems)
        self.prompts = [tuple(p) for p in prompts]
        self.k, self.temperature, self.step_max_tokens = k, temperature, step_max_tokens
        self.budgets = [completion_budget(policy, len(p), max_new_tokens) for p in self.prompts]
        self.seed = seed
        self.terminal_value = terminal_value
        self.leaf_value = leaf_value
        self.value_engine = value_engine
        self.calls = 0
        self.eos = frozenset(policy.eos_token_ids)
        self.generated = [0] * len(self.prompts)
        self.returned = [0] * len(self.prompts)
        self.root_generated = [0] * len(self.prompts)
        self.root_expanded = [False] * len(self.prompts)

    def next_seed(self) -> int:
        """Seed of the next engine call: deterministic in (seed, call index)."""
        self.calls += 1
        return (self.seed * _SEED_STRIDE + self.calls) % (1 << 62)

    def text(self, completion: Sequence[int]) -> str:
        """Decoded completion, a final end token dropped (it is not part of the answer text)."""
        tokens = list(completion)
        if tokens and tokens[-1] in self.eos:
            tokens.pop()
        return self.policy.decode(tokens)

    def expand(self, requests: list[NodeRequest]) -> list[list[Candidate]]:
        outputs = self.engine.sample([r.prefix for r in requests], n=self.k, max_new_tokens=self.step_max_tokens,
                                     temperature=self.temperature, stop=[self.env.step_end], seed=self.next_seed())
        out = [[self._candidate(r, s) for s in samples] for r, samples in zip(requests, outputs)]
        for r in requests:
            if r.node == ROOT:
                self.root_expanded[r.tree] = True
        return out

    def _candidate(self, request: NodeRequest, sample) -> Candidate:
        tree = request.tree
        done = request.completion
        room = self.budgets[tree] - len(done)
        self.generated[tree] += len(sample.tokens)
        if request.node == ROOT and not self.root_expanded[tree]:  # the first root expansion only
            self.root_generated[tree] += len(sample.tokens)
        tokens, logprobs, finish = tuple(sample.tokens), tuple(sample.policy_logprobs), sample.finish
        if len(tokens) > room:
            tokens, logprobs, finish = tokens[:room], logprobs[:room], "length"
        self.returned[tree] += len(tokens)
        terminal = (finish == "eos" or len(tokens) >= room
                    or self.env.is_terminal(self.text(done + tokens)))
        return Candidate(tokens, float(sum(logprobs)), terminal=terminal, finish=finish,
                         token_logprobs=logprobs)

    def value(self, requests: list[NodeRequest]) -> list[float]:
        return LEAF_VALUES[self.leaf_value](self, requests)

    def rollout(self, requests: list[NodeRequest]) -> list[LeafRollout]:
        """One policy sample from each leaf to the end of its line (one call per distinct remaining
        budget), valued by the terminal rule in use (`reward`)."""
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(self.budgets[r.tree] - len(r.completion), []).append(i)
        samples: list = [None] * len(requests)
        for room, members in sorted(groups.items()):
            out = self.engine.sample([requests[i].prefix for i in members], n=1, max_new_tokens=room,
                                     temperature=self.temperature, seed=self.next_seed())
            for i, s in zip(members, out):
                samples[i] = s[0]
        finished = []
        for r, s in zip(requests, samples):
            self.generated[r.tree] += len(s.tokens)
            self.returned[r.tree] += len(s.tokens)
            if r.node == ROOT:
                self.root_generated[r.tree] += len(s.tokens)
            finished.append(NodeRequest(r.tree, r.node, r.prefix + tuple(s.tokens), r.prompt_len, r.depth))
        values = self.reward(finished)
        return [LeafRollout(tuple(s.tokens), float(v), tuple(s.policy_logprobs), s.finish)
                for s, v in zip(samples, values)]

    def step_key(self, tokens: tuple[int, ...]) -> str:
        """The canonical form of a step (the environment's `canonical_step`; identity without one)."""
        return canonical_step(self.env, self.policy.decode(list(tokens)))

    def answer(self, requests: list[NodeRequest]) -> list:
        """The legal answer value of each request's line (`env.answer_value`, inputs only), None without one."""
        return [self.env.answer_value(inputs_only(self.problems[r.tree]), self.text(r.completion)) for r in requests]

    def finished_answers(self, tree: Tree, tail: Sequence[int] | None) -> list:
        """The legal answer values (`env.answer_value`, the problem's inputs only: never the target)
        of the tree's finished lines: terminal nodes, rollouts, and the extracted path's completion
        `tail` (None when no completion was sampled); one per line that holds a legal answer."""
        problem = inputs_only(self.problems[tree.index])
        lines = []
        for node in range(len(tree)):
            if tree.terminal[node]:
                lines.append(tree.completion(node))
            elif tree.rollout[node] is not None:
                lines.append(tree.completion(node) + tree.rollout[node].tokens)
        if tail is not None:
            lines.append(tuple(tail))
        values = [self.env.answer_value(problem, self.text(line)) for line in lines]
        return [v for v in values if v is not None]

    def reward(self, requests: list[NodeRequest]) -> list[float]:
        return TERMINAL_VALUES[self.terminal_value](self, requests)

    def complete(self, extractions: Sequence[Extraction]) -> tuple[list, int]:
        """Sample the rest of every incomplete path without a rollout (one call per distinct remaining
        budget). Returns ([Sample or None per extraction], engine calls)."""
        groups: dict[int, list[int]] = {}
        for i, ex in enumerate(extractions):
            if not ex.complete and ex.rollout is None:
                groups.setdefault(self.budgets[ex.tree] - len(ex.tokens), []).append(i)
        out: list = [None] * len(extractions)
        for room, members in sorted(groups.items()):
            prefixes = [self.prompts[extractions[i].tree] + extractions[i].tokens for i in members]
            samples = self.engine.sample(prefixes, n=1, max_new_tokens=room, temperature=self.temperature,
                                         seed=self.next_seed())
            for i, s in zip(members, samples):
                out[i] = s[0]
                self.generated[extractions[i].tree] += len(s[0].tokens)
                self.returned[extractions[i].tree] += len(s[0].tokens)
        return out, len(groups)


def _env_reward(bridge: SearchBridge, requests: list[NodeRequest]) -> list[float]:
    return [bridge.env.score(bridge.problems[r.tree], bridge.text(r.completion)).reward for r in requests]


def _value_head(bridge: SearchBridge, requests: list[NodeRequest]) -> list[float]:
    return (bridge.value_engine or bridge.engine).value([r.prefix for r in requests])


def _legal_value(bridge: SearchBridge, requests: list[NodeRequest]) -> list[float]:
    values = bridge.engine.value([r.prefix for r in requests])
    legal = [bridge.env.answer_value(inputs_only(bridge.problems[r.tree]), bridge.text(r.completion)) is not None
             for r in requests]
    return [float(v) if ok else NO_LEGAL_ANSWER for v, ok in zip(values, legal)]


# The value of a terminal node without a legal answer under the "legal" rule: the bottom of the
# value head's tanh range, and the environment's no-answer reward.
NO_LEGAL_ANSWER = -1.0

def _solver_value(bridge: SearchBridge, requests: list[NodeRequest]) -> list[float]:
    reachable = bridge.env.reachable
    return [SOLVER_VALUES[reachable(bridge.problems[r.tree], bridge.text(r.completion))] for r in requests]


# The solver's leaf values: a perfect value on the sparse reward's scale. Under the sparse reward a line
# scores 1 (right) or 0 (wrong, or no answer), so 1 where the target can still be reached from the
# prefix's numbers (a perfect continuation scores 1) and 0 where it cannot (every continuation scores
# 0, the reward's bottom): the same scale as the terminal rewards the search backs up beside them. The
# config allows it with the sparse search reward only (under the dense one an unreachable target can
# still earn up to 1 - 2|t - p| / t, so 0/1 would not be its scale).
SOLVER_VALUES = {True: 1.0, False: 0.0}

# How a non-terminal leaf is valued: the value head (default), or the environment's exact solver
# (`env.reachable`, Countdown; reads the target: a diagnostic ceiling of a perfect value, never a preset).
LEAF_VALUES = {"head": _value_head, "solver": _solver_value}

# How a new terminal node is valued: the environment's reward (`Score.reward`; uses the target), the value
# head (no verifier), or the value head with illegal answers at -1 (no verifier: inputs only).
TERMINAL_VALUES = {"reward": _env_reward, "value": _value_head, "legal": _legal_value}


def search_problems(engine, policy, env: Env, problems: Sequence[dict], *, search: SearchSettings | None = None,
                    max_new_tokens: int = 512, seed: int = 0, terminal_value: str = "reward",
                    leaf_value: str = "head", value_engine=None, on_round=None) -> list[SearchOutcome]:
    """Search every problem's tree in lock-step (one `search` call), extract each tree's path,
    complete the incomplete ones with the policy, and score them; one SearchOutcome per problem.

    `search`: the tree options and the expansion's (`k_children` steps at `temperature`, at most
    `step_max_tokens` each); `problems_at_once` is the caller's business (all `problems` form one batch).
    The search's own seed (Gumbel noise) is `search.seed`; `seed` seeds the engine's samples.
    terminal_value: "reward" (environment), "value" (value head) or "legal" (value head, -1 without a
    legal answer) for terminal nodes, see TERMINAL_VALUES; leaf_value: "head" (the value head) or
    "solver" (the environment's exact solver, a diagnostic) for non-terminal leaves, see LEAF_VALUES;
    value_engine: an engine over a value model (`value_model.load_value_model`) that "head" reads
    instead of the policy's own head (terminal values stay the policy's); the returned
    trajectory is scored by the environment either way. on_round: the search's progress callback
    (`search.mcts.search`).
    """
    if not problems:
        raise UsageError("no problems to search")
    cfg = search or SearchSettings()
    start = time.perf_counter()
    before = engine.counters.snapshot()
    prompts = [policy.prompt_ids(env.messages(p, compact=policy.compact_prompt)) for p in problems]
    bridge = SearchBridge(engine, policy, env, problems, prompts, k=cfg.k_children, temperature=cfg.temperature,
                          step_max_tokens=cfg.step_max_tokens, max_new_tokens=max_new_tokens, seed=seed,
                          terminal_value=terminal_value, leaf_value=leaf_value, value_engine=value_engine)
    result = run_search(prompts, bridge.expand, bridge.value, bridge.reward, cfg, rollout=bridge.rollout,
                        step_key=bridge.step_key, answer=bridge.answer, on_round=on_round)
    groups = [result.of_prompt(i) for i in range(len(problems))]
    chosen = [pick_tree(trees, cfg) for trees in groups]
    extractions = [extract(tree, cfg) for tree in chosen]
    t0 = time.perf_counter()
    completions, completion_calls = bridge.complete(extractions)
    completion_s = time.perf_counter() - t0
    stats = result.stats
    batch = BatchCompute(
        trees=len(problems), engine=counter_delta(before, engine.counters.snapshot()),
        wall_s=time.perf_counter() - start, search_s=stats.wall_s, model_s=stats.callback_s,
        bookkeeping_s=stats.bookkeeping_s, completion_s=completion_s, rounds=stats.rounds,
        expand_calls=stats.expand_calls, value_calls=stats.value_calls, reward_calls=stats.reward_calls,
        completion_calls=completion_calls, rollout_calls=stats.rollout_calls,
    )
    outcomes = []
    for i, (problem, tree, ex, sample) in enumerate(zip(problems, chosen, extractions, completions)):
        # The path's tail: a completion sample, or the rollout that finished it (counted when drawn).
        if sample is not None:
            tail, tail_logprobs, tail_finish = tuple(sample.tokens), tuple(sample.policy_logprobs), sample.finish
        elif ex.rollout is not None:
            tail, tail_logprobs, tail_finish = ex.rollout.tokens, ex.rollout.token_logprobs, ex.rollout.finish
        else:
            tail, tail_logprobs, tail_finish = (), (), ""
        tokens = ex.tokens + tail
        logprobs = tuple(lp for node in ex.nodes[1:] for lp in tree.token_logprobs[node]) + tail_logprobs
        text = bridge.text(tokens)
        score = env.score(problem, text)
        trees = groups[i]
        answers = [a for t in trees for a in bridge.finished_answers(t, tokens if sample is not None and t is tree
                                                                        else None)]
        ts = [t.stats for t in trees]
        traj_stats = {
            "tree_nodes": sum(len(t) for t in trees), "tree_depth": max(s.max_depth for s in ts),
            "path_steps": len(ex.steps), "subtrees": len(trees),
            "simulations": sum(s.simulations for s in ts), "root_value": tree.q(ROOT),
            "root_value_head": tree.value[ROOT], "collisions": sum(s.collisions for s in ts),
            "search_complete": ex.complete,
            "completion_finish": tail_finish,
            "generated_tokens": bridge.generated[i], "returned_tokens": bridge.returned[i],
            "root_tokens": bridge.root_generated[i],
            "completion_tokens": len(sample.tokens) if sample is not None else 0,
            "rollouts": sum(s.rollout_requests for s in ts), "rollout_tokens": sum(s.rollout_tokens for s in ts),
            "repeats": sum(s.repeats for s in ts),
            "finished_by_rollout": sample is None and ex.rollout is not None,
            "finished_answers": len(answers),
            "distinct_answers": len(set(answers)),
        }
        trajectory = Trajectory(prompt_ids=tuple(prompts[i]), completion_ids=tokens, behaviour_logprobs=logprobs,
                                reward=score.reward, sparse=score.sparse, group=i, search_tokens=len(ex.tokens),
                                stats=traj_stats)
        outcomes.append(SearchOutcome(
            trajectory=trajectory, text=text, score=score, extraction=ex, tree=tree,
            generated_tokens=bridge.generated[i], returned_tokens=bridge.returned[i],
            completion_finish=traj_stats["completion_finish"], batch=batch, trees=tuple(trees),
        ))
    return outcomes
