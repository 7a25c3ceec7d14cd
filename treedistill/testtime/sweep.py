"""Test-time compute: search vs best-of-N vs one sample, at equal budgets of GENERATED tokens.

For each per-problem budget B of generated tokens, on the same problems:
- mcts: step-level MCTS (rollout/tree_search.py) guided by the policy's prior and the value head only:
  terminal nodes are valued by a verifier-free rule, never by the environment's reward (which knows
  the target): by default ("legal") the value head where the completion holds a legal answer and -1
  where it holds none (no answer, or one that does not parse or uses numbers the problem does not
  give: the same target-free legality filter the best-of-N selectors apply); `mcts_terminal="value"`
  uses the value head alone. The answer (`pick`): by default ("best") the terminal node of highest
  value the search valued, the rule bon-value applies to its samples; "visits" is the most-visited
  path, completed by the policy when the search stopped short. With `search.rollout_lambda` > 0 a new
  leaf is also valued by one policy rollout checked by the row's terminal rule (and the rollout's
  finished line is an answer candidate); its tokens count in the budget like every other generated
  token. The search widens progressively
  (`widen_c`, `widen_alpha`), so more simulations can keep adding alternatives instead of revisiting
  a finite tree.
- bon-majority: best-of-N, the answer VALUE that most samples agree on (ties: the value seen first).
- bon-value: best-of-N, the sample whose value-head estimate at its last token is highest.
- once: the model sampled once, reported at its own measured cost (no budget).
No selection looks at the target or the reward: majority vote and the value head only. The chosen
completion is scored with the sparse reward afterwards.
`rows` picks the rows: "free" (the rows above), "verifier" or "both". The verifier rows DO use the
environment's reward, as a pair given the same verifier: mcts+verifier (terminal nodes valued by the
dense reward, as in training and the reference) and bon+verifier (the sample with the best dense
reward). They answer a different question (search or sampling with a checker) and are never mixed
with the rows above. Where the reward reads only what the prompt states (`reward_from_prompt`:
Countdown's numbers and target) the checker is part of the problem, not an answer key, and the
verifier rows are a fair test-time setting; on GSM8K the reward needs the reference answer, so they
measure search with an oracle.

How a budget is spent.
- Best-of-N samples one full completion after another (up to max_new_tokens each) until B tokens are
  generated; the sample that crosses B is cut at B (it keeps its answer if it closed one before the
  cut). N is therefore "as many samples as fit", and every problem uses exactly B tokens. The samples
  come from ONE stream per problem drawn up to the largest budget; a smaller budget uses a prefix of
  that stream, exactly what sampling until B would have drawn (later samples are drawn in parallel
  batches for speed and discarded from the account when they fall past the budget).
- MCTS cannot stop mid-search (the search core runs a fixed number of simulations per tree), so the
  number of simulations S is fitted to the budget from measured token counts: a pilot search on a
  few problems gives the cost of the root expansion, of one simulation and of a completion; then, for
  each budget in increasing order, S is guessed from the runs measured so far (a power law
  tokens = a * S^b: the cost grows less than linearly, since revisiting a terminal node generates
  nothing), the search is run on all problems, and when its mean generated tokens miss the budget by
  more than 10% S is refitted and the search rerun (at most 3 runs; runs are chosen on token counts,
  never on accuracy, and the discarded runs are reported as calibration). The budget is met on
  average over problems, not per problem; the tokens actually used are reported and the plot puts
  every point at its measured mean cost. A budget below the pilot's cost of a root expansion, one
  simulation and a completion is skipped with a note. Without progressive widening (widen_c = 0) each
  node is expanded once (K samples), so a tree is finite: when the tokens grow with an elasticity
  under 0.1 in the simulations (doubling them adds under 7%) the search is saturated, reported at its
  measured cost with a note, and larger budgets are skipped. With widening (the default) a tree keeps
  growing with its simulations, so the check rarely fires.
- Legality filter. Majority vote counts, and the value head chooses among, answers that parse and use
  only the problem's given numbers (on GSM8K: answers that are numbers), which the prompt states and
  needs no ground truth; when no sample has one, the value head picks among all samples.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from treedistill.envs.base import Env, inputs_only
from treedistill.errors import UsageError
from treedistill.metrics import standard_error
from treedistill.search.contracts import TEST_TIME_SEARCH
from treedistill.testtime.config import MethodResult, SweepConfig, SweepReport

__all__ = ["MCTS_VARIANTS", "PAIRS", "SELECTORS", "answer_cost", "best_of_n_at", "majority_vote", "paired_differences",
           "run_sweep", "value_pick"]


# --- best-of-N selectors: one signature, (answer values [N], value-head values [N]) -> index | None ---

def majority_vote(values: Sequence, head: Sequence[float] | None = None) -> int | None:
    """Index of the first sample holding the most frequent legal answer value; None if no legal answer."""
    counts = Counter(v for v in values if v is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(i for i, v in enumerate(values) if v is not None and counts[v] == top)


def value_pick(values: Sequence, head: Sequence[float] | None = None) -> int | None:
    """Index of the highest value-head estimate among samples with a legal answer (all samples when
    none has one); first on ties."""
    if not head:
        return None
    pool = [i for i, v in enumerate(values) if v is not None] or list(range(len(head)))
    return max(pool, key=lambda i: (head[i], -i))


SELECTORS: dict[str, Callable[[Sequence, Sequence[float] | None], int | None]] = {
    "bon-majority": majority_vote,
    "bon-value": value_pick,
}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def answer_cost(tokens: int, finished: Sequence[int], distinct: Sequence[int]) -> dict:
    """Cost per finished answer of a method at a budget: finished lines with a legal answer and
    distinct answer values per problem, and generated tokens / finished answers over all
    problems (None when no line finished with an answer)."""
    total = sum(finished)
    return {"finished_answers": _mean(finished), "distinct_answers": _mean(distinct),
            "tokens_per_answer": tokens / total if total else None}


def _clear(engine) -> None:
    """Empty the engine's prefix cache (if it has one) so each method's wall time starts cold."""
    engine.clear_cache()


# --- the methods -------------------------------------------------------------------------------

class _SweepInputs:
    """What every method needs: engine, policy, env, problems, their prompts and completion budgets."""

    def __init__(self, engine, policy, env: Env, problems: Sequence[dict], cfg: SweepConfig,
                 progress: Callable[[str], None], value_engine=None):
        from treedistill.rollout import completion_budget

        self.engine, self.policy, self.env, self.cfg = engine, policy, env, cfg
        self.value_engine = value_engine
        self.problems = list(problems)
        self.prompts = [policy.prompt_ids(env.messages(p, compact=policy.compact_prompt)) for p in problems]
        self.room = [completion_budget(policy, len(p), cfg.max_new_tokens) for p in self.prompts]
        self.eos = frozenset(policy.eos_token_ids)
        self.progress = progress

    def text(self, tokens: Sequence[int]) -> str:
        tokens = list(tokens)
        if tokens and tokens[-1] in self.eos:
            tokens.pop()
        return self.policy.decode(tokens)


def run_once(ctx: _SweepInputs, temperature: float) -> MethodResult:
    """The model sampled once: mean sparse reward of `once_samples` single samples per problem."""
    cfg = ctx.cfg
    _clear(ctx.engine)
    start = time.perf_counter()
    per_problem, tokens, dense = [], [], []
    groups: dict[int, list[int]] = {}
    for i, room in enumerate(ctx.room):
        groups.setdefault(room, []).append(i)
    results: dict[int, list] = {}
    for room, members in groups.items():
        per_call = max(1, cfg.rows_per_call // cfg.once_samples)
        for lo in range(0, len(members), per_call):
            part = members[lo:lo + per_call]
            out = ctx.engine.sample([ctx.prompts[i] for i in part], n=cfg.once_samples, max_new_tokens=room,
                                    temperature=temperature, seed=cfg.seed * 7919 + lo + room)
            results.update(zip(part, out))
    for i, problem in enumerate(ctx.problems):
        samples = results[i]
        scores = [ctx.env.score(problem, ctx.text(s.tokens)) for s in samples]
        per_problem.append(_mean([sc.sparse for sc in scores]))
        dense.extend(sc.dense for sc in scores)
        tokens.extend(len(s.tokens) for s in samples)
    return MethodResult(method=f"once T={temperature:g}", budget=None, accuracy=_mean(per_problem),
                stderr=standard_error(per_problem), tokens=_mean(tokens), wall_s=time.perf_counter() - start,
                detail={"samples_per_problem": cfg.once_samples, "temperature": temperature,
                        "dense": _mean(dense)})


def sample_streams(ctx: _SweepInputs, total: int) -> tuple[list[list[tuple[int, ...]]], dict]:
    """Per problem, full samples in order until their tokens reach `total` (the last one crossing it)."""
    cfg = ctx.cfg
    streams: list[list[tuple[int, ...]]] = [[] for _ in ctx.problems]
    used = [0] * len(ctx.problems)
    lengths: list[int] = []
    calls = drawn = 0
    start = time.perf_counter()
    while True:
        active = [i for i in range(len(ctx.problems)) if used[i] < total]
        if not active:
            break
        # As many samples per problem as the median remaining budget holds at the mean sample length
        # so far (one in the first round, to measure it): few draws fall past the budget.
        remaining = sorted(total - used[i] for i in active)[len(active) // 2]
        n = int(remaining // max(_mean(lengths[-4096:]), 1.0)) if lengths else 1
        n = max(1, min(n, cfg.rows_per_call // len(active) or 1))
        groups: dict[int, list[int]] = {}
        for i in active:
            groups.setdefault(ctx.room[i], []).append(i)
        for room, members in groups.items():
            per_call = max(1, cfg.rows_per_call // n)
            for lo in range(0, len(members), per_call):
                part = members[lo:lo + per_call]
                calls += 1
                out = ctx.engine.sample([ctx.prompts[i] for i in part], n=n, max_new_tokens=room,
                                        temperature=cfg.search.temperature, seed=cfg.seed * 104729 + calls)
                for i, samples in zip(part, out):
                    for s in samples:
                        drawn += len(s.tokens)
                        lengths.append(len(s.tokens))
                        if used[i] < total:
                            streams[i].append(tuple(s.tokens))
                            used[i] += len(s.tokens)
        ctx.progress(f"best-of-N stream: {sum(min(u, total) for u in used)}/{total * len(used)} tokens")
    return streams, {"engine_calls": calls, "drawn_tokens": drawn, "wall_s": time.perf_counter() - start}


def _prefix_of_stream(stream: list[tuple[int, ...]], budget: int) -> list[tuple[int, ...]]:
    """The samples drawn until `budget` tokens were generated, the crossing one cut at the budget."""
    out, used = [], 0
    for s in stream:
        if used >= budget:
            break
        take = s[:budget - used]
        out.append(take)
        used += len(take)
    return out


def run_best_of_n(ctx: _SweepInputs, streams: list[list[tuple[int, ...]]], budget: int,
                  values_cache: dict) -> list[MethodResult]:
    """The best-of-N rows of `cfg.rows` at `budget`, on the same samples (a prefix of each stream)."""
    start = time.perf_counter()
    free, checked = "mcts" in ROWS[ctx.cfg.rows], "mcts+verifier" in ROWS[ctx.cfg.rows]
    names = [*(SELECTORS if free else ()), *(["bon+verifier"] if checked else [])]
    chosen: dict[str, list[float]] = {name: [] for name in names}
    dense: dict[str, list[float]] = {name: [] for name in names}
    ns, used, finished, distinct = [], [], [], []
    batches = [_prefix_of_stream(s, budget) for s in streams]
    # Value-head estimates at the end of every sample (cut samples computed anew; full ones cached).
    need = [(i, j) for i, b in enumerate(batches) for j in range(len(b))
            if free and (i, b[j]) not in values_cache]  # the verifier row reads no value head
    for lo in range(0, len(need), 1024):
        part = need[lo:lo + 1024]
        vals = ctx.engine.value([tuple(ctx.prompts[i]) + batches[i][j] for i, j in part])
        for (i, j), v in zip(part, vals):
            values_cache[(i, batches[i][j])] = v
    for i, (problem, samples) in enumerate(zip(ctx.problems, batches)):
        texts = [ctx.text(s) for s in samples]
        # Legal answer values (inputs only), read by the majority vote and the cost per finished answer.
        answers = [ctx.env.answer_value(inputs_only(problem), t) for t in texts]
        finished.append(sum(v is not None for v in answers))
        distinct.append(len({v for v in answers if v is not None}))
        if free:  # value-head estimates, read by both selectors with the answer values
            head = [values_cache[(i, s)] for s in samples]
        for name, select in SELECTORS.items() if free else ():
            pick = select(answers, head)
            score = ctx.env.score(problem, texts[pick] if pick is not None else "")
            chosen[name].append(score.sparse)
            dense[name].append(score.dense)
        if checked:  # uses the environment's reward: the best dense reward, first on ties
            scores = [ctx.env.score(problem, t) for t in texts]
            best = max(range(len(scores)), key=lambda j: (scores[j].dense, -j))
            chosen["bon+verifier"].append(scores[best].sparse)
            dense["bon+verifier"].append(scores[best].dense)
        ns.append(len(samples))
        used.append(sum(len(s) for s in samples))
    wall = time.perf_counter() - start
    return [MethodResult(method=name, budget=budget, accuracy=_mean(acc), stderr=standard_error(acc), tokens=_mean(used),
                 wall_s=None, detail={"n_mean": _mean(ns), "n_min": min(ns), "n_max": max(ns),
                                      "dense": _mean(dense[name]), "selection_s": wall, "per_problem": acc,
                                      **answer_cost(sum(used), finished, distinct)})
            for name, acc in chosen.items()]


def best_of_n_at(engine, policy, env: Env, problems: Sequence[dict], budget: int, *, rows: str = "free",
                 temperature: float = 0.8, max_new_tokens: int = 512, seed: int = 0) -> list[MethodResult]:
    """The best-of-N rows of `rows` ("free": majority vote and value head; "verifier": the best reward;
    "both") at one budget of generated tokens per problem, sampled and cut as in the sweep."""
    if rows not in ROWS:
        raise UsageError(f"rows must be one of {', '.join(ROWS)}, got {rows!r}")
    if budget < 1:
        raise UsageError(f"budget must be positive, got {budget}")
    cfg = SweepConfig(budgets=(budget,), search=replace(TEST_TIME_SEARCH, temperature=temperature),
                      max_new_tokens=max_new_tokens, seed=seed, rows=rows)
    ctx = _SweepInputs(engine, policy, env, problems, cfg, lambda message: None)
    streams, stream_stats = sample_streams(ctx, budget)
    cells = run_best_of_n(ctx, streams, budget, {})
    for cell in cells:
        cell.detail["stream"] = stream_stats
    return cells


# MCTS rows -> how their terminal nodes are valued (rollout.tree_search.TERMINAL_VALUES); None: the
# config's `mcts_terminal`, a verifier-free rule.
MCTS_VARIANTS = {"mcts": None, "mcts+verifier": "reward"}
VERIFIER_FREE = ("legal", "value")
# Which MCTS rows each `rows` setting runs (best-of-N follows: its two selectors with the free rows,
# bon+verifier with the verifier rows).
ROWS = {"free": ["mcts"], "verifier": ["mcts+verifier"], "both": ["mcts", "mcts+verifier"]}


# The best-of-N rows each MCTS row is compared with, paired over problems: the same information picks.
PAIRS = {"mcts": ("bon-majority", "bon-value"), "mcts+verifier": ("bon+verifier",)}


def paired_differences(cells: Sequence[MethodResult]) -> list[dict]:
    """MCTS minus best-of-N at each budget where both ran (`PAIRS`), in accuracy points, with the 95%
    bootstrap percentile interval over the problems resampled jointly (`report.stats.bootstrap_interval`)."""
    import numpy as np

    from treedistill.report.stats import bootstrap_interval

    by = {(c.method, c.budget): c for c in cells}
    out = []
    for (method, budget), a in by.items():
        for other in PAIRS.get(method, ()):
            b = by.get((other, budget))
            if a.accuracy is None or b is None or b.accuracy is None:
                continue
            est, low, high = bootstrap_interval(np.array([a.detail["per_problem"]], dtype=float),
                                                np.array([b.detail["per_problem"]], dtype=float))
            out.append({"budget": budget, "method": method, "against": other, "difference": est,
                        "low": low, "high": high, "tokens": a.tokens, "against_tokens": b.tokens})
    return out


def _terminal_value(cfg: SweepConfig, method: str) -> str:
    return MCTS_VARIANTS[method] or cfg.mcts_terminal


@dataclass
class _MctsCost:
    """MCTS cost per problem measured on a pilot, in generated tokens: the root expansion, one more
    simulation, and the completion of an incomplete path; plus every (simulations, mean tokens) run
    measured on the sweep's problems so far (`runs`)."""

    root: float
    per_simulation: float
    completion: float
    runs: list[tuple[int, float]] = field(default_factory=list)
    saturated_at: tuple[int, float] | None = None  # (simulations, tokens) of a run that could not fill its budget

    def minimum(self) -> float:
        """Tokens of a root expansion, one simulation and a completion."""
        return self.root + self.per_simulation + self.completion

    def guess(self, budget: int) -> int:
        """Simulations expected to spend `budget` tokens on average. The cost grows less than
        linearly in simulations (revisits of terminal nodes and collisions generate nothing), so
        measured runs are fitted by tokens = a * S^b in log-log between the two runs nearest to the
        budget (bracketing it when possible; b kept in [0.2, 1.5]); before any run, the pilot's
        linear cost."""
        runs = sorted(set(self.runs))
        if not runs:
            return int((budget - self.root - self.completion) // max(self.per_simulation, 1e-9))
        if len(runs) == 1:
            (s1, t1), = runs
            return max(1, round(s1 * budget / max(t1, 1.0)))
        below = [r for r in runs if r[1] <= budget]
        above = [r for r in runs if r[1] > budget]
        if below and above:
            pair = (below[-1], above[0])
        else:
            pair = tuple(sorted(runs, key=lambda r: abs(math.log(max(r[1], 1.0) / budget)))[:2])
        (s1, t1), (s2, t2) = sorted(pair)
        b = math.log(max(t2, 1.0) / max(t1, 1.0)) / math.log(s2 / s1) if s2 != s1 else 1.0
        b = min(max(b, 0.2), 1.5)
        return max(1, round(s2 * (budget / max(t2, 1.0)) ** (1 / b)))


def _measure(outcomes, simulations: int) -> _MctsCost:
    root = _mean([o.trajectory.stats["root_tokens"] for o in outcomes])
    completion = _mean([o.trajectory.stats["completion_tokens"] for o in outcomes])
    search = _mean([o.generated_tokens - o.trajectory.stats["completion_tokens"] for o in outcomes])
    return _MctsCost(root=root, per_simulation=(search - root) / simulations, completion=completion)


def _search(ctx: _SweepInputs, problems: Sequence[dict], simulations: int, terminal_value: str):
    from treedistill.rollout import search_problems

    cfg = ctx.cfg
    search = replace(cfg.search, simulations=simulations, parallel=min(cfg.search.parallel, simulations),
                     seed=cfg.seed)
    return search_problems(ctx.engine, ctx.policy, ctx.env, problems, search=search,
                           max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, terminal_value=terminal_value,
                           value_engine=ctx.value_engine)


def run_mcts(ctx: _SweepInputs, budget: int, cost: _MctsCost, method: str = "mcts") -> MethodResult:
    """MCTS at `budget`: the simulations are guessed from the measured cost, the search is run on
    all problems, and while its mean generated tokens miss the budget by more than `budget_tolerance`
    the guess is refitted and the search run again (at most `budget_tries` runs; the kept run is the
    last within tolerance, else the one nearest the budget). Runs are chosen on token counts only,
    never on accuracy; the discarded runs' tokens are reported as calibration. Appends to cost.runs."""
    cfg = ctx.cfg
    if cost.saturated_at is not None and budget > cost.saturated_at[1] / (1 - cfg.budget_tolerance):
        # A larger budget than one the trees already could not fill: rerunning the same simulations
        # would return the same trees.
        sims, used = cost.saturated_at
        return MethodResult(method=method, budget=budget, accuracy=None, stderr=None, tokens=None, wall_s=None,
                    note=f"skipped: the trees saturate at ~{used:.0f} tokens per problem ({sims} simulations), "
                         "see the smaller budget")
    if cost.minimum() > budget:
        note = (f"skipped: below the measured cost of a root expansion, one simulation and a completion "
                f"(~{cost.minimum():.0f} tokens)")
        return MethodResult(method=method, budget=budget, accuracy=None, stderr=None, tokens=None, wall_s=None, note=note)
    tried: dict[int, tuple[list, float]] = {}
    saturated = False
    sims = min(max(cost.guess(budget), 1), cfg.max_simulations)
    for _ in range(cfg.budget_tries):
        if sims in tried:
            break
        ctx.progress(f"{method} at {budget} tokens per problem: {sims} simulations")
        _clear(ctx.engine)
        start = time.perf_counter()
        outcomes = _search(ctx, ctx.problems, sims, _terminal_value(cfg, method))
        tried[sims] = (outcomes, time.perf_counter() - start)
        used = _mean([o.generated_tokens for o in outcomes])
        earlier = [(s_, t) for s_, t in cost.runs if 2 * s_ <= sims and t > 0]
        cost.runs.append((sims, used))
        if abs(used - budget) <= cfg.budget_tolerance * budget or (used < budget and sims >= cfg.max_simulations):
            break
        # Saturated: the tokens grow with an elasticity under 0.1 against a run with half the
        # simulations or fewer (doubling them adds under 7%). Each node is expanded once (K samples,
        # no widening), so a tree is finite; once its lines end in terminal nodes, more simulations
        # revisit them and generate nothing: the budget cannot be spent.
        if used < budget and earlier:
            s0, t0 = max(earlier)
            if math.log(max(used, t0) / t0) / math.log(sims / s0) < cfg.saturation_elasticity:
                saturated = True
                break
        sims = min(max(cost.guess(budget), 1), cfg.max_simulations)

    def miss(s: int) -> tuple[bool, float]:
        used = _mean([o.generated_tokens for o in tried[s][0]])
        return abs(used - budget) > cfg.budget_tolerance * budget, abs(used - budget)

    kept = min(tried, key=miss)
    outcomes, wall = tried[kept]
    acc = [o.score.sparse for o in outcomes]
    used = [o.generated_tokens for o in outcomes]
    batch = outcomes[0].batch
    detail = {"simulations": kept, "tokens_max": max(used), "tokens_min": min(used), "per_problem": acc,
              "dense": _mean([o.score.dense for o in outcomes]),
              "completed_by_policy": sum(o.completed_by_policy for o in outcomes) / len(outcomes),
              "tree_nodes_mean": _mean([o.trajectory.stats["tree_nodes"] for o in outcomes]),
              "bookkeeping_share": batch.bookkeeping_share, "rounds": batch.rounds,
              "forward_calls": batch.engine.get("forward_calls", 0),
              "runs": [(s, _mean([o.generated_tokens for o in tried[s][0]])) for s in tried],
              "calibration_tokens_per_problem": sum(_mean([o.generated_tokens for o in tried[s][0]])
                                                    for s in tried if s != kept),
              "calibration_wall_s": sum(tried[s][1] for s in tried if s != kept),
              "rollout_tokens": _mean([o.trajectory.stats["rollout_tokens"] for o in outcomes]),
              **answer_cost(sum(used), [o.trajectory.stats["finished_answers"] for o in outcomes],
                             [o.trajectory.stats["distinct_answers"] for o in outcomes])}
    note = ""
    if saturated or (kept >= cfg.max_simulations and _mean(used) < (1 - cfg.budget_tolerance) * budget):
        detail["saturated"] = True
        cost.saturated_at = (kept, _mean(used))
        note = (f"saturated: the trees were exhausted (every line ends in a terminal node) at ~{_mean(used):.0f} "
                f"tokens per problem, below the budget; shown at its measured cost")
    return MethodResult(method=method, budget=budget, accuracy=_mean(acc), stderr=standard_error(acc), tokens=_mean(used),
                wall_s=wall, detail=detail, note=note)


def run_sweep(engine, policy, env: Env, problems: Sequence[dict], cfg: SweepConfig,
              progress: Callable[[str], None] | None = None, value_engine=None) -> SweepReport:
    """Every method at every budget on `problems`; see the module docstring. value_engine: a value
    model's engine (`value_model.load_value_model`), which ranks the first steps of the search's
    screened roots (`cfg.search.screen`); without one they are ranked by the policy's own value head."""
    if not problems:
        raise UsageError("no problems for the test-time sweep")
    if not cfg.budgets or any(b < 1 for b in cfg.budgets):
        raise UsageError(f"budgets must be positive, got {cfg.budgets}")
    if cfg.rows not in ROWS:
        raise UsageError(f"rows must be one of {', '.join(ROWS)}, got {cfg.rows!r}")
    if cfg.mcts_terminal not in VERIFIER_FREE:
        raise UsageError(f"mcts terminal values must be verifier-free ({', '.join(VERIFIER_FREE)}), "
                         f"got {cfg.mcts_terminal!r}")
    say = progress or (lambda msg: None)
    start = time.perf_counter()
    ctx = _SweepInputs(engine, policy, env, problems, cfg, say, value_engine)
    report = SweepReport(config=cfg, problems=len(ctx.problems))
    budgets = sorted(cfg.budgets)

    for t in cfg.once_temperatures:
        say(f"sampling once at T={t:g}")
        report.cells.append(run_once(ctx, t))

    for method in ROWS[cfg.rows]:
        pilot_n = min(cfg.pilot_problems, len(problems))
        say(f"{method} cost pilot: {cfg.pilot_simulations} simulations on {pilot_n} problems")
        pilot_start = time.perf_counter()
        pilot = _search(ctx, ctx.problems[:pilot_n], cfg.pilot_simulations, _terminal_value(cfg, method))
        cost = _measure(pilot, cfg.pilot_simulations)
        report.calibration.append({"method": method, "stage": "pilot", "simulations": cfg.pilot_simulations,
                                   "problems": pilot_n, "root": cost.root, "per_simulation": cost.per_simulation,
                                   "completion": cost.completion, "wall_s": time.perf_counter() - pilot_start})
        for b in budgets:
            report.cells.append(run_mcts(ctx, b, cost, method))
        report.calibration.append({"method": method, "stage": "runs", "runs": list(cost.runs)})

    say(f"best-of-N: sampling up to {budgets[-1]} tokens per problem")
    _clear(engine)
    streams, stream_stats = sample_streams(ctx, budgets[-1])
    values_cache: dict = {}
    for b in budgets:
        say(f"best-of-N at {b} tokens per problem")
        for cell in run_best_of_n(ctx, streams, b, values_cache):
            cell.detail["stream"] = stream_stats
            report.cells.append(cell)
    report.differences = paired_differences(report.cells)
    report.wall_s = time.perf_counter() - start
    return report
