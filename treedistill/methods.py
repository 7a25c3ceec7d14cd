"""The training methods: each is a (rollout, advantages, loss) triple, looked up once in `METHODS`.

The loop in `train.py` calls `method.rollout` and `method.advantages` and never asks which method it
runs; `Method` also says what a method may be combined with (config.py checks it) and how its rollouts
are batched. All of them share one signature per slot:
- rollout(ctx, problems, seed) -> Rollout: trajectories to learn from (scored by the environment),
  groups contiguous and numbered 0.. in problem order, plus scalar statistics for the log;
- advantages(batch, values [B, T] | None, cfg) -> (advantages, returns) [B, T]: from the batch's
  rewards [B] and loss mask (`algorithms.advantages`), or the rollout's own (mcts-tree, tree-fork);
and every method learns through one loss, `algorithms.losses.total_loss` (the policy loss named by
cfg.policy_loss, + c_v value MSE, + beta k3 KL to the frozen initial policy).

| method | rollout | trajectories per problem | advantage | policy loss |
|---|---|---|---|---|
| mcts  | tree search, most-visited path (completed by the policy if it stops short) | 1 | R - V(s_t) (or GAE) | CISPO or PPO-clip |
| mcts-tree | the same search; every step on the tree's finished lines, once | 1 tree, a row per step | V^(s') - V^(s) from the tree (`search/credit.py`) | as mcts |
| tree-fork | M chains, then N forks from the steps of highest entropy (`rollout/tree_fork.py`); rows as mcts-tree | 1 tree, a row per step | as mcts-tree | as mcts |
| bon   | N samples, the best by dense reward kept | 1 | R - V(s_t) (or GAE) | as mcts |
| ppo   | G samples | G | R - V(s_t) (or GAE) | as mcts |
| grpo  | G samples | G | group-normalised | PPO-clip |
| cispo | G samples | G | group-normalised | CISPO |

Where a config field picks a variant inside a slot (cfg.advantage: reward_minus_value | gae;
cfg.policy_loss: cispo | ppo), config.py has already refused the combinations a method does not
allow (`Method.advantages_allowed`, `Method.policy_losses`), so the slots stay single functions.

The reward trained on is cfg.reward, one of the environment's two (`REWARDS`): dense (the reference's,
method.md) or sparse (1 iff correct: the evaluation reward). Every rollout sees the environment through
`TrainingReward`, whose `score(...).reward` is that reward, so the search scores its terminal nodes, and
best-of-N chooses, with the same reward the learner is given. mcts and mcts-tree may search with the
other one instead (cfg.search_reward, e.g. dense while learning sparse: under the sparse reward a wrong
answer, a missing one and an unvisited child all read 0); what they learn from is then re-scored with
cfg.reward, so the learner always gets its own reward. The value head is trained on cfg.reward either
way, so the search then mixes two scales (the head's values at leaves, the other reward at terminals):
an option to measure, not a tuned setting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from treedistill.algorithms.advantages import ADVANTAGES, group_advantages
from treedistill.algorithms.losses import LOSSES
from treedistill.envs.base import Score, canonical_step, reward_from_prompt
from treedistill.rollout.sample import best_of_n, sample_problems
from treedistill.rollout.trajectory import Trajectory
from treedistill.rollout.tree_fork import fork_problems
from treedistill.rollout.tree_lines import tree_rows, with_lines
from treedistill.rollout.tree_search import SearchOutcome, search_problems
from treedistill.search.credit import scaled_advantages

__all__ = ["METHODS", "REWARDS", "TREE_CREDIT", "Method", "Rollout", "RolloutContext", "TrainingReward",
           "best_of_n_rollout", "fork_rollout", "group_baseline_advantages", "group_rollout", "search_rollout",
           "tree_advantages", "tree_rollout",
           "value_baseline_advantages"]


REWARDS: dict[str, Callable[[Score], float]] = {
    "dense": lambda score: score.dense,
    "sparse": lambda score: score.sparse,
}


@dataclass(frozen=True)
class TrainingReward:
    """An environment whose `score(...).reward` is the reward `kind` (a key of REWARDS); everything else,
    the dense and sparse rewards included, is the wrapped environment's own."""

    env: object
    kind: str

    @property
    def name(self) -> str:
        return self.env.name

    @property
    def step_end(self) -> str:
        return self.env.step_end

    @property
    def reward_from_prompt(self) -> bool:
        return reward_from_prompt(self.env)

    def messages(self, problem: dict, *, compact: bool = False) -> list[dict]:
        return self.env.messages(problem, compact=compact)

    def is_terminal(self, completion: str) -> bool:
        return self.env.is_terminal(completion)

    def answer_value(self, problem: dict, completion: str):
        return self.env.answer_value(problem, completion)

    def canonical_step(self, step_text: str) -> str:
        return canonical_step(self.env, step_text)

    @property
    def reachable(self):
        """The wrapped environment's solver verdict on a prefix (`CountdownEnv.reachable`), None
        where it has no solver."""
        return getattr(self.env, "reachable", None)

    def key(self, problem: dict) -> tuple:
        return self.env.key(problem)

    def score(self, problem: dict, completion: str) -> Score:
        score = self.env.score(problem, completion)
        return dataclasses.replace(score, trained=float(REWARDS[self.kind](score)))


@dataclass(frozen=True)
class RolloutContext:
    """What a rollout may use: the engine (generation, values), the policy (prompts, decoding), the
    environment (prompts, rewards) and the run's config."""

    engine: object
    policy: object
    env: object
    cfg: object


@dataclass(frozen=True)
class Rollout:
    """trajectories: [B] in group order (rows of a group contiguous); stats: scalars for the log."""

    trajectories: list[Trajectory]
    stats: dict = field(default_factory=dict)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def group_rollout(ctx: RolloutContext, problems: Sequence[dict], seed: int) -> Rollout:
    """GRPO / CISPO / PPO: group_size samples per problem at cfg.temperature, all kept."""
    cfg = ctx.cfg
    env = TrainingReward(ctx.env, cfg.reward)
    groups = sample_problems(ctx.engine, ctx.policy, env, problems, n=cfg.group_size, temperature=cfg.temperature,
                             max_new_tokens=cfg.max_new_tokens, seed=seed)
    # groups whose rewards are all equal carry no group-normalised signal: worth watching
    flat = sum(1 for g in groups if len({t.reward for t in g}) == 1)
    return Rollout([t for g in groups for t in g], {"flat_group_frac": flat / len(groups)})


def best_of_n_rollout(ctx: RolloutContext, problems: Sequence[dict], seed: int) -> Rollout:
    """Best-of-N distillation: bon_n samples per problem at cfg.temperature, the best by the training
    reward kept. The mean reward of ALL samples is logged beside the kept ones' (the reference's best-of-N had
    the highest training reward and the worst evaluation)."""
    cfg = ctx.cfg
    env = TrainingReward(ctx.env, cfg.reward)
    groups = sample_problems(ctx.engine, ctx.policy, env, problems, n=cfg.bon_n, temperature=cfg.temperature,
                             max_new_tokens=cfg.max_new_tokens, seed=seed)
    return Rollout(best_of_n(groups), {"bon_sample_reward_mean": _mean([t.reward for g in groups for t in g]),
                                       "bon_sample_sparse_mean": _mean([t.sparse for g in groups for t in g])})


def _search(ctx: RolloutContext, problems: Sequence[dict], seed: int) -> list[SearchOutcome]:
    """One searched tree per problem, search.problems_at_once trees per search call, terminal nodes
    scored with cfg.search_reward (None: cfg.reward)."""
    cfg, s = ctx.cfg, ctx.cfg.search
    env = TrainingReward(ctx.env, cfg.search_reward or cfg.reward)
    outcomes = []
    for chunk, first in enumerate(range(0, len(problems), s.problems_at_once)):
        part = problems[first:first + s.problems_at_once]
        chunk_seed = seed * 1009 + chunk
        # max_depth None: bounded by the completion's token budget only; the Gumbel noise follows the step's seed.
        settings = dataclasses.replace(s, max_depth=s.max_depth or cfg.max_new_tokens, seed=chunk_seed)
        outcomes += search_problems(ctx.engine, ctx.policy, env, part, search=settings,
                                    max_new_tokens=cfg.max_new_tokens, seed=chunk_seed, leaf_value=cfg.leaf_value)
    return outcomes


def _search_stats(paths: Sequence[Trajectory]) -> dict:
    """The searches' statistics for the log, from each tree's extracted path."""
    stats = {f"search_{name}": _mean([float(t.stats[name]) for t in paths])
             for name in ("simulations", "tree_nodes", "tree_depth", "path_steps", "root_value", "collisions")}
    stats["search_complete_frac"] = _mean([float(t.stats["search_complete"]) for t in paths])
    stats["search_token_frac"] = (sum(t.search_tokens for t in paths)
                                  / max(1, sum(len(t.completion_ids) for t in paths)))
    return stats


def search_rollout(ctx: RolloutContext, problems: Sequence[dict], seed: int) -> Rollout:
    """MCTS distillation: one searched tree per problem, search.problems_at_once trees per search call;
    each tree yields its most-visited path (completed by the policy when the search stopped short),
    scored with the learner's reward."""
    cfg = ctx.cfg
    found = _search(ctx, problems, seed)
    outcomes = [dataclasses.replace(o.trajectory, group=i) for i, o in enumerate(found)]
    if cfg.search_reward not in (None, cfg.reward):
        env = TrainingReward(ctx.env, cfg.reward)
        outcomes = [dataclasses.replace(t, reward=env.score(p, o.text).reward)
                    for t, p, o in zip(outcomes, problems, found)]
    return Rollout(outcomes, _search_stats(outcomes))


def tree_rollout(ctx: RolloutContext, problems: Sequence[dict], seed: int) -> Rollout:
    """mcts-tree: mcts's search; every step on a finished line of each tree becomes one row per sample,
    with the tree's advantage and value target (`rollout.tree_lines`, `search.credit`); the rollouts of
    the search's leaves and the policy's completion of a path the search left unfinished are lines too
    (`with_lines`). The trees' terminal nodes are re-scored with the learner's reward."""
    cfg = ctx.cfg
    found = _search(ctx, problems, seed)
    env = TrainingReward(ctx.env, cfg.reward)
    rows, stats = _tree_learning(cfg, env, ctx.policy, problems, [with_lines(o) for o in found],
                                 sum(o.generated_tokens for o in found))
    stats.update(_search_stats([o.trajectory for o in found]))
    stats["tree_path_reward"] = _mean([env.score(p, o.text).reward for p, o in zip(problems, found)])
    return Rollout(rows, stats)


def _tree_learning(cfg, env, policy, problems: Sequence[dict], trees: Sequence,
                   generated: int) -> tuple[list[Trajectory], dict]:
    """The rows of one tree per problem (`rollout.tree_lines.tree_rows`, group i = problems[i]), their
    advantages scaled over the batch (cfg.tree_advantage_norm), and the trees' statistics, with their
    finished lines per 1,000 of the `generated` tokens (GRPO's: 1,000 / its mean completion length);
    `env` scores with the learner's reward."""
    rows, lines, line_rewards, learned = [], [], [], []
    for i, (problem, tree) in enumerate(zip(problems, trees)):
        part = tree_rows(tree, problem, env, policy, group=i, mode=cfg.tree_advantage)
        rows += part.rows
        lines.append(len(part.line_rewards))
        line_rewards += part.line_rewards
        learned.append(sum(len(t.completion_ids) for t in part.rows))
    assert {t.group for t in rows} == set(range(len(problems))), f"{cfg.method}: a tree has no step to learn from"
    raw = [t.advantage for t in rows]
    rows = [dataclasses.replace(t, advantage=a) for t, a in zip(rows, scaled_advantages(raw, cfg.tree_advantage_norm))]
    return rows, {"tree_rows": len(rows) / len(problems), "tree_lines": _mean(lines),
                  "tree_lines_per_1k_tokens": 1000 * sum(lines) / max(1, generated),
                  "tree_line_reward_mean": _mean(line_rewards), "tree_learned_tokens": _mean(learned),
                  "tree_advantage_abs_mean": _mean([abs(a) for a in raw])}


def fork_rollout(ctx: RolloutContext, problems: Sequence[dict], seed: int) -> Rollout:
    """tree-fork: per problem cfg.fork.chains whole chains at cfg.temperature, then cfg.fork.forks
    lines forked from the parents of the steps of highest estimated entropy (`rollout.tree_fork`), all
    hung in one tree; every step on its lines is one row, with mcts-tree's credit (`_tree_learning`).
    Logged beside mcts-tree's tree_* fields: the trees' generated tokens, their distinct finished lines
    per 1,000 of them, and the forked steps' mean estimated entropy."""
    cfg = ctx.cfg
    env = TrainingReward(ctx.env, cfg.reward)
    forked = fork_problems(ctx.engine, ctx.policy, env, problems, chains=cfg.fork.chains, forks=cfg.fork.forks,
                           per_round=cfg.fork.per_round, temperature=cfg.temperature,
                           max_new_tokens=cfg.max_new_tokens, seed=seed)
    generated = sum(f.generated_tokens for f in forked)
    rows, stats = _tree_learning(cfg, env, ctx.policy, problems, [f.tree for f in forked], generated)
    entropies = [e for f in forked for e in f.forked_entropy]
    stats.update({"tree_generated_tokens": generated / len(problems),
                  "fork_chain_tokens": _mean([f.chain_tokens for f in forked]),
                  "fork_tokens": _mean([f.fork_tokens for f in forked]),
                  "fork_entropy_mean": _mean(entropies)})
    return Rollout(rows, stats)


def value_baseline_advantages(batch, values, cfg):
    """The value head's baseline: A_t = R - V(s_t) (the reference) or GAE, as cfg.advantage says."""
    return ADVANTAGES[cfg.advantage](batch.rewards, values, batch.loss_mask, cfg)


def group_baseline_advantages(batch, values, cfg):
    """GRPO / CISPO: group-normalised rewards."""
    return group_advantages(batch.rewards, values, batch.loss_mask, cfg)


def tree_advantages(batch, values, cfg):
    """mcts-tree: each row's advantage is its step's, computed by the rollout from its tree (`to_batch`
    put it on the row's loss mask); the value target of every step token is the row's reward, V^ of
    the step's node (`search.credit`). The value head's estimates are not used."""
    mask = batch.loss_mask.float()  # [B, T]
    return batch.advantages * mask, batch.rewards.float()[:, None] * mask  # [B, T], [B, T]


POLICY_LOSSES = tuple(LOSSES)
VALUE_BASELINES = ("reward_minus_value", "gae")  # advantages whose baseline is the value head
# The advantage of a tree method: each row's credit from its tree's Monte-Carlo values (`search.credit`,
# cfg.tree_advantage), computed by the rollout; it reads no value head.
TREE_CREDIT = "tree"


@dataclass(frozen=True)
class Method:
    """One training method: how trajectories are collected and credited, and what it may be combined
    with. Every method learns through the same loss (`algorithms.losses.total_loss`: the policy loss
    named by cfg.policy_loss, + c_v value MSE, + beta k3 KL).

    rollout(ctx, problems, seed) -> Rollout; advantages(batch, values [B, T] | None, cfg) -> [B, T] x2.
    samples: trajectories one problem yields, from the config (mcts-tree: one tree, whose rows vary).
    rows_vary: the learner rows of one problem vary (mcts-tree: a row per step on the tree's finished
        lines); minibatch_size then counts problems and micro_batch_size rows.
    advantages_allowed / policy_losses: the cfg.advantage / cfg.policy_loss values it runs with.
    min_group: the smallest cfg.group_size it accepts (0: group_size is not read).
    task_limit: most problems one rollout call batches well (the trees one search call grows
        together), or None: all of a task's problems in one engine call (the distributed loop's tasks).
    searches: its rollout is the tree search (`cfg.search`; the search's options, e.g. cfg.leaf_value,
        apply), which reads the value head unless every leaf is valued by a rollout (rollout_lambda = 1).
    """

    rollout: Callable[[RolloutContext, Sequence[dict], int], Rollout]
    advantages: Callable
    samples: Callable = lambda cfg: 1
    rows_vary: bool = False
    advantages_allowed: tuple[str, ...] = VALUE_BASELINES
    policy_losses: tuple[str, ...] = POLICY_LOSSES
    min_group: int = 0
    task_limit: Callable | None = None
    searches: bool = False


def _group(cfg) -> int:
    return cfg.group_size


def _trees_per_call(cfg) -> int:
    return cfg.search.problems_at_once


METHODS: dict[str, Method] = {
    "mcts": Method(search_rollout, value_baseline_advantages, task_limit=_trees_per_call, searches=True),
    # mcts-tree's advantage is its tree's (TREE_CREDIT: cfg.tree_advantage); the value head, when
    # value_coef > 0, guides the search and is trained on the tree's value targets
    "mcts-tree": Method(tree_rollout, tree_advantages, rows_vary=True, advantages_allowed=(TREE_CREDIT,),
                        task_limit=_trees_per_call, searches=True),
    # tree-fork's advantage is its tree's, as mcts-tree's; it searches nothing, so a value head (value_coef
    # > 0, trained on the trees' V^ targets, e.g. for the value probe) is read by nothing
    "tree-fork": Method(fork_rollout, tree_advantages, rows_vary=True, advantages_allowed=(TREE_CREDIT,)),
    "bon": Method(best_of_n_rollout, value_baseline_advantages),
    "grpo": Method(group_rollout, group_baseline_advantages, samples=_group, advantages_allowed=("group",),
                   policy_losses=("ppo",), min_group=2),
    "cispo": Method(group_rollout, group_baseline_advantages, samples=_group, advantages_allowed=("group",),
                    policy_losses=("cispo",), min_group=2),
    "ppo": Method(group_rollout, value_baseline_advantages, samples=_group, min_group=1),
}
