"""How good the value head is, measured at every evaluation of a method that has one.

VinePPO (2024) found learned value networks "barely outperform a random baseline" at ranking
alternative steps; the search (mcts, mcts-tree) ranks its children by exactly these values. So each
evaluation also measures them against Monte Carlo ground truth from the current policy:

1. Prefixes. For each of P held-out (test) problems, one line is sampled from the current policy step
   by step, as the search's expansion samples (stop at the environment's step delimiter, at most
   `step_max_tokens` per step; a step is terminal at end-of-sequence, at a closed answer or at the
   completion's token budget), and ONE of its non-terminal states (the prompt, or the prompt and its
   first j steps, before the final step) is drawn uniformly: a step prefix s.
2. Truth. k policy completions from s (no stop, the remaining token budget); y(s) = the mean training
   reward (`env.score(...).reward`, cfg.reward: under reward sparse, the success rate) of the k lines.
3. Value. V(s): the value head at the last token of s (`engine.value`, what the search reads).

4. Label (environments with a solver, Countdown: `env.reachable`): c(s) = 1 if the target can still be
   reached from the numbers the prefix's steps left, else 0: exact, no sampling noise.

Reported: the Spearman rank correlation of V against y over the P prefixes (average ranks for ties;
None when either side is constant, e.g. every y = 0), the MSE of V against y, and the MSE of the best
constant (the mean of y, in hindsight: the variance of y): a head worth its compute has
value_mse < value_mse_const and value_spearman > 0. y is itself an estimate (k samples), so both MSEs
include its variance, y(1 - y) / k on average for a 0/1 reward; the comparison between them does not.
On the tiny model nearly every y is 0 before RL, so the Spearman says little either way; the AUC of V
against c (`value_auc_reachable`: the probability that a reachable prefix gets a higher V than an
unreachable one, ties counting 1/2; 0.5 = no better than chance, None when one class is empty) is a
noise-free test of the same head, with both classes in plenty (every root is reachable, many prefixes
after a step are not). `value_probe_reachable_frac` is the share of reachable prefixes.

Cost: P lines (~P x 70 tokens on the tiny model) plus P x k completions of the rest of a line, and one
value call; the default P = 48 keeps it to about a fifth of a tiny preset's evaluation time (measured:
docs/log.md, "the value probe's cost"). Lines and completions are sampled at one
temperature for every method (default 0.8, the search's expansion temperature), so the probe is the
same measurement whichever method trained the head. Every engine call
is seeded from the given seed, so the probe of one run is the same at every evaluation but for the
weights, and it never draws from the training's random streams.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from treedistill.rollout.sample import completion_text
from treedistill.rollout.tree_search import completion_budget

__all__ = ["ValueProbe", "auc", "mse", "probe_value", "spearman"]

_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class ValueProbe:
    """values / targets: V(s) and y(s) for each prefix [P]; depths: steps in each prefix [P]; reachable:
    the solver's label c(s) of each prefix [P], or None (no solver)."""

    values: tuple[float, ...]
    targets: tuple[float, ...]
    depths: tuple[int, ...]
    seconds: float
    reachable: tuple[bool, ...] | None = None

    @property
    def auc(self) -> float | None:
        return None if self.reachable is None else auc(self.values, self.reachable)

    @property
    def spearman(self) -> float | None:
        return spearman(self.values, self.targets)

    @property
    def mse(self) -> float:
        return mse(self.values, self.targets)

    @property
    def mse_const(self) -> float:
        mean = sum(self.targets) / len(self.targets)
        return mse([mean] * len(self.targets), self.targets)

    def to_dict(self) -> dict:
        """The evaluation line's keys."""
        return {"value_spearman": self.spearman, "value_mse": self.mse, "value_mse_const": self.mse_const,
                "value_probe_prefixes": len(self.values),
                "value_probe_target_mean": sum(self.targets) / len(self.targets),
                "value_probe_value_mean": sum(self.values) / len(self.values),
                "value_probe_s": self.seconds,
                **({} if self.reachable is None else {
                    "value_auc_reachable": self.auc,
                    "value_probe_reachable_frac": sum(self.reachable) / len(self.reachable)})}


def _ranks(xs: Sequence[float]) -> list[float]:
    """1-based ranks, ties given their average rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation: Pearson's of the (tie-averaged) ranks; None when a side is constant
    or there are fewer than 2 pairs."""
    assert len(a) == len(b), f"spearman: {len(a)} and {len(b)} values"
    if len(a) < 2:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return None
    return cov / (va * vb) ** 0.5


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve of `scores` for the 0/1 `labels`: P(score of a positive > score of a
    negative), ties 1/2 (Mann-Whitney U / (n+ n-), from tie-averaged ranks); None when a class is empty."""
    assert len(scores) == len(labels), f"auc: {len(scores)} scores and {len(labels)} labels"
    positives = sum(1 for y in labels if y)
    negatives = len(labels) - positives
    if not positives or not negatives:
        return None
    rank_sum = sum(r for r, y in zip(_ranks(scores), labels) if y)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def mse(a: Sequence[float], b: Sequence[float]) -> float:
    assert len(a) == len(b) and a, f"mse: {len(a)} and {len(b)} values"
    return sum((x - y) ** 2 for x, y in zip(a, b)) / len(a)


def probe_value(engine, policy, env, problems: Sequence[dict], *, k: int, temperature: float,
                max_new_tokens: int, step_max_tokens: int, seed: int, batch: int = 256) -> ValueProbe:
    """The probe over `problems` (one prefix each); env.score(...).reward is the reward y averages."""
    assert problems and k >= 1, f"value probe: need problems and k >= 1 (got {len(problems)}, {k})"
    start = time.perf_counter()
    calls = iter(range(1, 1 << 30))

    def next_seed() -> int:
        return (seed * _SEED_STRIDE + next(calls)) % (1 << 62)

    prompts = [tuple(policy.prompt_ids(env.messages(p, compact=policy.compact_prompt))) for p in problems]
    budgets = [completion_budget(policy, len(p), max_new_tokens) for p in prompts]
    eos = frozenset(policy.eos_token_ids)
    # 1. one line per problem, step by step; boundaries[i]: completion lengths of its non-terminal states
    lines: list[tuple[int, ...]] = [() for _ in problems]
    boundaries: list[list[int]] = [[0] for _ in problems]
    going = list(range(len(problems)))
    while going:
        outputs = engine.sample([prompts[i] + lines[i] for i in going], n=1, max_new_tokens=step_max_tokens,
                                temperature=temperature, stop=[env.step_end], seed=next_seed())
        still = []
        for i, (sample,) in zip(going, outputs):
            step = tuple(sample.tokens)[:budgets[i] - len(lines[i])]
            lines[i] += step
            ended = (not step or step[-1] in eos or len(lines[i]) >= budgets[i]
                     or env.is_terminal(completion_text(policy, lines[i])))
            if not ended:
                boundaries[i].append(len(lines[i]))
                still.append(i)
        going = still
    rng = random.Random(f"value-probe/{seed}")
    cuts = [rng.choice(b) for b in boundaries]
    prefixes = [prompts[i] + lines[i][:cut] for i, cut in enumerate(cuts)]
    # 2. k completions from each prefix, about `batch` sequences per call (evaluate's batching): each is cut
    #    at its own remaining budget (the first `room` tokens of a longer sample are distributed as a
    #    sample of at most `room` tokens)
    rooms = [budgets[i] - cut for i, cut in enumerate(cuts)]
    per_call = max(1, batch // k)
    outputs = []
    for first in range(0, len(prefixes), per_call):
        outputs += engine.sample(prefixes[first:first + per_call], n=k, max_new_tokens=max(rooms[first:first + per_call]),
                                 temperature=temperature, seed=next_seed())
    targets = []
    for i, samples in enumerate(outputs):
        done = lines[i][:cuts[i]]
        targets.append(sum(env.score(problems[i], completion_text(policy, done + tuple(s.tokens)[:rooms[i]])).reward
                           for s in samples) / len(samples))
    # 3. the value head at each prefix
    values = [float(v) for v in engine.value(prefixes)]
    depths = [b.index(cut) for b, cut in zip(boundaries, cuts)]
    # 4. the solver's label of each prefix, where the environment has one
    solver = getattr(env, "reachable", None)
    reachable = None if solver is None else tuple(
        bool(solver(problems[i], completion_text(policy, lines[i][:cut]))) for i, cut in enumerate(cuts))
    return ValueProbe(tuple(values), tuple(targets), tuple(depths), time.perf_counter() - start, reachable)


def value_quality(engine, policy, env, problems: Sequence[dict], cfg) -> dict:
    """The eval line's value-head keys (`probe_value` on the first cfg.value_probe_prefixes of the
    evaluation's problems; {} without a value head or with the probe off), on its own seeds; the global
    random state is restored, so training after it draws what it would have drawn without it. Both
    loops (train.py, distributed/ray_loop.py) call this, so their eval lines agree."""
    import torch

    from treedistill.learner import derive_seed
    from treedistill.methods import TrainingReward

    if policy.value_head is None or not cfg.value_probe_prefixes:
        return {}
    engine.clear_cache()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        return probe_value(engine, policy, TrainingReward(env, cfg.reward), problems[:cfg.value_probe_prefixes],
                           k=cfg.value_probe_k, temperature=cfg.value_probe_temperature,
                           max_new_tokens=cfg.max_new_tokens, step_max_tokens=cfg.search.step_max_tokens,
                           seed=derive_seed(cfg.seed, "value-probe", 0)).to_dict()
