"""Evaluation without search: mean@k, pass@k and format rate, with the environment's own reward.

Protocol of the reference (docs/method.md): k = 16 samples per test problem at temperature
0.2, up to 512 new tokens, SPARSE reward (1 iff the answer is valid and equals the target), averaged
over all samples. The reward is `env.score`, the same function that gives the dense training reward.

Statistics:
- accuracy (mean@k): mean of the sparse reward over all P*k samples (= mean of per-problem means).
- stderr: standard error of that mean over problems, std(per-problem means, ddof=1) / sqrt(P):
  samples of one problem are correlated, so problems are the independent unit.
- pass@k: share of problems with at least one correct sample among their k.
- format_rate: share of samples whose answer is well formed (tag present, parses, numbers available).
- why samples failed, counted by the environment's reason: no_answer (no answer found), unparsable (an
  answer that does not parse or breaks the task's rules: Score.reason "invalid:..."), wrong (well formed,
  not the answer); truncated counts samples that hit max_new_tokens, whatever their outcome.

With search (`evaluate_search`): one answer per problem, the completion of the path MCTS extracts
(rollout/tree_search.py; completed by the policy when the search stopped short), scored by the same reward;
accuracy is the mean over problems (k = 1), with generated tokens per problem counted over the whole
search (every sampled step, plus the completion).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from treedistill.metrics import standard_error

__all__ = ["EvalResult", "SearchEvalResult", "evaluate", "evaluate_search", "summarize"]


@dataclass(frozen=True)
class EvalResult:
    """Outcome of one evaluation; per_problem is [P] (mean sparse reward of each problem's k samples)."""

    accuracy: float
    stderr: float
    pass_at_k: float
    format_rate: float
    mean_dense: float
    problems: int
    samples: int
    k: int
    temperature: float
    generated_tokens: int
    truncated: int            # samples that hit max_new_tokens
    seconds: float
    per_problem: tuple[float, ...]
    no_answer: int = 0        # samples without an answer
    unparsable: int = 0       # samples whose answer does not parse or breaks the task's rules
    wrong: int = 0            # samples with a well-formed wrong answer

    def to_dict(self) -> dict:
        """Flat JSON-ready dict (per-problem means left out)."""
        d = asdict(self)
        d.pop("per_problem")
        d["tokens_per_sample"] = self.generated_tokens / self.samples if self.samples else 0.0
        return d


def summarize(sparse: Sequence[Sequence[float]], well_formed: Sequence[Sequence[bool]],
              dense: Sequence[Sequence[float]], *, k: int, temperature: float, generated_tokens: int,
              truncated: int, seconds: float, reasons: Sequence[str] = ()) -> EvalResult:
    """Statistics of a [P, k] table of rewards (see the module docstring); reasons: every sample's
    Score.reason, counted into the failure kinds."""
    kinds = Counter("unparsable" if r.startswith("invalid") else r for r in reasons)
    per_problem = [sum(row) / len(row) for row in sparse]  # [P]
    problems = len(per_problem)
    samples = sum(len(row) for row in sparse)
    accuracy = sum(sum(row) for row in sparse) / samples if samples else 0.0
    stderr = standard_error(per_problem)
    return EvalResult(
        accuracy=accuracy,
        stderr=stderr,
        pass_at_k=sum(any(x > 0 for x in row) for row in sparse) / problems if problems else 0.0,
        format_rate=sum(sum(row) for row in well_formed) / samples if samples else 0.0,
        mean_dense=sum(sum(row) for row in dense) / samples if samples else 0.0,
        problems=problems,
        samples=samples,
        k=k,
        temperature=temperature,
        generated_tokens=generated_tokens,
        truncated=truncated,
        seconds=seconds,
        per_problem=tuple(per_problem),
        no_answer=kinds["no_answer"],
        unparsable=kinds["unparsable"],
        wrong=kinds["wrong"],
    )


def _calls(problems: int, k: int, batch: int) -> list[tuple[int, int, int]]:
    """The engine calls of an evaluation, as (first problem, problems, samples per problem): k samples
    of batch // k problems per call; when k > batch, one problem's k samples over calls of at
    most `batch` each."""
    if k <= batch:
        per_chunk = batch // k
        return [(first, min(per_chunk, problems - first), k) for first in range(0, problems, per_chunk)]
    return [(i, 1, min(batch, k - j)) for i in range(problems) for j in range(0, k, batch)]


def evaluate(engine, policy, env, problems: Sequence[dict], *, k: int = 16, temperature: float = 0.2,
             max_new_tokens: int = 512, batch: int = 256, seed: int = 0,
             progress: Callable[[int], None] | None = None) -> EvalResult:
    """Sample k completions per problem through `engine` (no search) and score them with `env`.

    policy: gives `prompt_ids(messages)`, `compact_prompt`, `decode(ids)`, `eos_token_ids`.
    batch: sequences per engine call (problems per call = batch // k; when k > batch, a problem's
    samples are spread over calls of at most `batch`). Call c is sampled with seed `seed + c`, so a
    run is reproducible for a given (seed, batch).
    progress(n) is called with the number of problems finished after each chunk.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if max_new_tokens < 1 or batch < 1:
        raise ValueError(f"max_new_tokens and batch must be >= 1, got {max_new_tokens}, {batch}")
    start = time.perf_counter()
    eos = set(policy.eos_token_ids)
    sparse: list[list[float]] = []
    dense: list[list[float]] = []
    well_formed: list[list[bool]] = []
    reasons: list[str] = []
    generated = truncated = 0
    pending: list = []  # samples of the problem being gathered (k > batch: over several calls)
    for c, (first, count, n) in enumerate(_calls(len(problems), k, batch)):
        chunk = problems[first:first + count]
        prefixes = [policy.prompt_ids(env.messages(p, compact=policy.compact_prompt)) for p in chunk]
        outputs = engine.sample(prefixes, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                                seed=seed + c)
        assert len(outputs) == len(chunk) and all(len(o) == n for o in outputs), \
            f"engine returned {[len(o) for o in outputs]} samples for {len(chunk)} prefixes x {n}"
        for problem, samples in zip(chunk, outputs):
            pending += samples
            if len(pending) < k:
                continue
            scores = []
            for s in pending:
                tokens = list(s.tokens)
                generated += len(tokens)
                truncated += s.finish == "length"
                if tokens and tokens[-1] in eos:
                    tokens = tokens[:-1]  # the end token is not part of the answer text
                scores.append(env.score(problem, policy.decode(tokens)))
            pending = []
            sparse.append([sc.sparse for sc in scores])
            dense.append([sc.dense for sc in scores])
            well_formed.append([sc.well_formed for sc in scores])
            reasons += [sc.reason for sc in scores]
        if progress is not None:
            progress(len(sparse))
    return summarize(sparse, well_formed, dense, k=k, temperature=temperature, generated_tokens=generated,
                     truncated=truncated, seconds=time.perf_counter() - start, reasons=reasons)


@dataclass(frozen=True)
class SearchEvalResult:
    """Evaluation WITH search: `result` has one answer per problem (k = 1; its temperature is the
    search's), plus what the searches cost and did."""

    result: EvalResult
    simulations: int
    parallel: int
    select: str
    pick: str
    terminal_value: str
    tokens_per_problem: float
    completed_by_policy: float  # share of extracted paths that stopped before a terminal node
    tree_nodes: float           # mean nodes per problem (all its subtrees)
    bookkeeping_share: float    # share of the searches' wall time spent outside the model
    rollout_lambda: float = 0.0           # search.rollout_lambda (0: no rollouts)
    merge: str = "tokens"                 # search.merge
    finished_answers: float = 0.0         # mean finished lines with an answer per problem (terminal nodes, rollouts)
    distinct_answers: float = 0.0         # mean distinct answers among them per problem
    tokens_per_answer: float | None = None  # generated tokens / finished answers, all trees (None: no answer)
    subtrees: int = 1                     # search.subtrees
    repeat_penalty: float = 0.0           # search.repeat_penalty
    defer_expansion: bool = False         # search.defer_expansion
    screen: int = 0                       # search.screen (0 where no value model ranked first steps)
    screen_top: int = 0                   # search.screen_top

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("result")
        return {**self.result.to_dict(), **d}


def evaluate_search(engine, policy, env, problems: Sequence[dict], *, search, max_new_tokens: int = 512,
                    seed: int = 0, terminal_value: str = "reward", value_engine=None,
                    progress: Callable[[int], None] | None = None) -> SearchEvalResult:
    """Search every problem (`search`: a SearchSettings; trees in lock-step, `search.problems_at_once`
    at a time, chunk c seeded with `seed + c`) and score each extracted path's completion with `env`.
    value_engine: a value model's engine, read by the search's `value` (`rollout.search_problems`)."""
    from treedistill.rollout import search_problems

    trees_per_call, temperature = search.problems_at_once, search.temperature
    start = time.perf_counter()
    outcomes = []
    search_s = bookkeeping_s = 0.0
    for c, first in enumerate(range(0, len(problems), trees_per_call)):
        part = search_problems(engine, policy, env, problems[first:first + trees_per_call], search=search,
                               max_new_tokens=max_new_tokens, seed=seed + c, terminal_value=terminal_value,
                               value_engine=value_engine)
        outcomes.extend(part)
        search_s += part[0].batch.search_s
        bookkeeping_s += part[0].batch.bookkeeping_s
        if progress is not None:
            progress(len(outcomes))
    generated = sum(o.generated_tokens for o in outcomes)
    result = summarize([[o.score.sparse] for o in outcomes], [[o.score.well_formed] for o in outcomes],
                       [[o.score.dense] for o in outcomes], k=1, temperature=temperature,
                       generated_tokens=generated,
                       truncated=sum(o.completion_finish == "length" for o in outcomes),
                       seconds=time.perf_counter() - start, reasons=[o.score.reason for o in outcomes])
    n = max(1, len(outcomes))
    answers = sum(o.trajectory.stats["finished_answers"] for o in outcomes)
    return SearchEvalResult(
        result=result, simulations=search.simulations, parallel=search.parallel, select=search.select,
        pick=search.pick, terminal_value=terminal_value, tokens_per_problem=generated / n,
        completed_by_policy=sum(o.completed_by_policy for o in outcomes) / n,
        tree_nodes=sum(o.trajectory.stats["tree_nodes"] for o in outcomes) / n,
        bookkeeping_share=bookkeeping_s / search_s if search_s > 0 else 0.0,
        rollout_lambda=search.rollout_lambda, merge=search.merge, subtrees=search.subtrees,
        repeat_penalty=search.repeat_penalty, defer_expansion=search.defer_expansion, screen=search.screen,
        screen_top=search.screen_top,
        finished_answers=answers / n,
        distinct_answers=sum(o.trajectory.stats["distinct_answers"] for o in outcomes) / n,
        tokens_per_answer=generated / answers if answers else None)
