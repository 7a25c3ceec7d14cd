"""The methods dict and its slots: rollouts through a scripted engine (known completions, known rewards),
best-of-N's choice, the trajectory -> batch masks, advantages worked by hand, and the search rollout on a
small real model."""

from types import SimpleNamespace

import pytest
import torch
from tiny_prompt_policy import TinyPromptPolicy

from treedistill.config import SearchSettings, TrainConfig  # SearchSettings: search/contracts.py
from treedistill.engine.base import FINISH_EOS, FINISH_LENGTH, Sample
from treedistill.envs.countdown import CountdownEnv
from treedistill.errors import UsageError
from treedistill.methods import (
    METHODS,
    Method,
    RolloutContext,
    best_of_n_rollout,
    group_rollout,
    search_rollout,
)
from treedistill.rollout.sample import best_of_n
from treedistill.rollout.to_batch import to_batch
from treedistill.rollout.trajectory import Trajectory

PROBLEMS = [{"numbers": [3, 5, 7, 2], "target": 22}, {"numbers": [1, 2, 3, 4], "target": 24}]
# Dense rewards (countdown, method.md): exact 1.0; 3+5 = 8 vs 22 -> 1 - 2 * 14/22 = -3/11;
# no answer tag -1.0; 9 not available -0.9; (1+2+3)*4 = 24 -> 1.0.
SCRIPT = [
    ["<answer>3*5+7</answer>", "<answer>3+5</answer>", "<step>3*5=15 (2 7 15)</step>"],
    ["<answer>9*1</answer>", "<answer>(1+2+3)*4</answer>", "<answer>9*1</answer>"],
]
REWARDS = [[1.0, 1 - 2 * 14 / 22, -1.0], [-0.9, 1.0, -0.9]]


class _ScriptedEngine:
    """Sample j of prompt i is SCRIPT[i][j] (+ eos); raw-policy log-probs -0.5 per token and sampling
    log-probs -0.25, so a test can tell which of the two a rollout recorded."""

    def __init__(self, policy, prompts):
        self.policy, self.prompts, self.calls = policy, prompts, []

    def sample(self, prefixes, n=1, *, max_new_tokens, temperature=1.0, top_p=1.0, stop=(), seed=None):
        self.calls.append({"prefixes": len(prefixes), "n": n, "temperature": temperature, "seed": seed})
        out = []
        for prefix in prefixes:
            texts = SCRIPT[self.prompts.index(list(prefix))]
            rows = []
            for j in range(n):
                ids = self.policy.tokenizer.encode(texts[j % len(texts)], add_special_tokens=False)
                finish = FINISH_LENGTH if len(ids) >= max_new_tokens else FINISH_EOS
                ids = ids[:max_new_tokens] + ([] if finish == FINISH_LENGTH else [self.policy.eos_token_ids[0]])
                rows.append(Sample(tuple(ids), (-0.25,) * len(ids), (-0.5,) * len(ids), finish))
            out.append(rows)
        return out


def _context(**settings):
    policy, env = TinyPromptPolicy(), CountdownEnv()
    prompts = [policy.prompt_ids(env.messages(p, compact=True)) for p in PROBLEMS]
    cfg = TrainConfig(problems_per_step=2, max_new_tokens=64, **settings)
    return RolloutContext(engine=_ScriptedEngine(policy, prompts), policy=policy, env=env, cfg=cfg), prompts


GRPO = dict(method="grpo", advantage="group", policy_loss="ppo", value_coef=0.0, group_size=3, temperature=0.7)


def test_method_table_is_what_the_config_checks_and_derives_from():
    for name, method in METHODS.items():
        assert isinstance(method, Method), name
        assert callable(method.rollout) and callable(method.advantages), name
    with pytest.raises(UsageError, match="method must be one of " + ", ".join(METHODS)):
        TrainConfig(method="nope")
    # rows per problem, allowed advantages / losses and the group minimum come from the table
    assert [TrainConfig(**GRPO).samples_per_problem, TrainConfig(method="bon").samples_per_problem] == [3, 1]
    assert TrainConfig(method="mcts-tree", advantage="tree", micro_batch_size=4).rows_per_problem is None
    with pytest.raises(UsageError, match="method grpo needs policy_loss in ppo"):
        TrainConfig(**{**GRPO, "policy_loss": "cispo"})
    with pytest.raises(UsageError, match="group_size must be >= 2 for method grpo"):
        TrainConfig(**{**GRPO, "group_size": 1})
    # the baselines that sample groups share one rollout; mcts and bon have their own
    assert METHODS["grpo"].rollout is METHODS["cispo"].rollout is METHODS["ppo"].rollout is group_rollout
    assert METHODS["bon"].rollout is best_of_n_rollout and METHODS["mcts"].rollout is search_rollout
    # bon is trained exactly like mcts (method.md: "same trainer and loss")
    assert METHODS["bon"].advantages is METHODS["mcts"].advantages


def test_group_rollout_keeps_every_sample_in_contiguous_groups_with_behaviour_logprobs():
    ctx, prompts = _context(**GRPO)
    rollout = group_rollout(ctx, PROBLEMS, seed=11)
    # one engine call, group_size samples per prompt, at the rollout temperature and the given seed
    assert ctx.engine.calls == [{"prefixes": 2, "n": 3, "temperature": 0.7, "seed": 11}]
    traj = rollout.trajectories
    assert [t.group for t in traj] == [0, 0, 0, 1, 1, 1]
    assert [t.reward for t in traj] == pytest.approx([r for row in REWARDS for r in row])
    assert [t.sparse for t in traj] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert all(t.prompt_ids == tuple(prompts[t.group]) for t in traj)
    # the RAW policy's log-probs (temperature 1), not the tempered sampling ones, weigh the ratio
    assert all(set(t.behaviour_logprobs) == {-0.5} for t in traj)
    assert all(t.completion_ids[-1] == ctx.policy.eos_token_ids[0] for t in traj)  # the end token carries loss
    assert rollout.stats["flat_group_frac"] == 0.0


def test_best_of_n_keeps_the_highest_dense_reward_first_on_ties():
    def traj(reward, group, tag):
        return Trajectory((1,), (tag,), (0.0,), reward, 0.0, group)

    groups = [[traj(0.1, 0, 1), traj(0.9, 0, 2), traj(0.9, 0, 3)], [traj(-1.0, 1, 4)]]
    assert [t.completion_ids for t in best_of_n(groups)] == [(2,), (4,)]


def test_best_of_n_rollout_returns_one_trajectory_per_problem_and_logs_all_samples():
    ctx, _ = _context(method="bon", bon_n=3, temperature=0.8)
    rollout = best_of_n_rollout(ctx, PROBLEMS, seed=5)
    assert ctx.engine.calls == [{"prefixes": 2, "n": 3, "temperature": 0.8, "seed": 5}]
    assert [t.reward for t in rollout.trajectories] == [1.0, 1.0]
    assert [t.group for t in rollout.trajectories] == [0, 1]
    # (1 - 3/11 - 1 - 0.9 + 1 - 0.9) / 6 over ALL samples, not just the kept ones
    assert rollout.stats["bon_sample_reward_mean"] == pytest.approx((1 - 3 / 11 - 1 - 0.9 + 1 - 0.9) / 6)


def test_to_batch_puts_loss_on_completion_tokens_only():
    a = Trajectory((7, 8, 9), (1, 2), (-0.1, -0.2), 0.5, 1.0, 0)
    b = Trajectory((7,), (3, 4, 5), (-0.3, -0.4, -0.5), -1.0, 0.0, 1)
    batch = to_batch([a, b], pad_id=0)
    # rows: [7 8 9 1 2] and [7 3 4 5 pad]
    assert batch.input_ids.tolist() == [[7, 8, 9, 1, 2], [7, 3, 4, 5, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch.loss_mask.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]
    assert torch.allclose(batch.behaviour_logprobs, torch.tensor([[0, 0, 0, -0.1, -0.2], [0, -0.3, -0.4, -0.5, 0]]))
    assert batch.rewards.tolist() == [0.5, -1.0] and batch.group_ids.tolist() == [0, 1]
    with pytest.raises(AssertionError, match="contiguous"):
        to_batch([b, a, b], pad_id=0)


def test_advantage_slots_by_hand():
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    values = torch.tensor([[0.0, 0.25, -0.5], [0.0, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # mcts / bon / ppo: A_t = R - V(s_t) on every generated token, value target R
    cfg = TrainConfig(method="mcts")
    batch = SimpleNamespace(rewards=rewards, loss_mask=mask)
    adv, ret = METHODS["mcts"].advantages(batch, values, cfg)
    assert torch.allclose(adv, torch.tensor([[0, 0.75, 1.5], [0, -0.5, 0], [0, 0.5, 0.5], [0, 0.5, 0.5]]))
    assert torch.allclose(ret, torch.tensor([[0, 1, 1], [0, 0, 0], [0, 0.5, 0.5], [0, 0.5, 0.5]]))
    # grpo: groups of 2: (1, 0) -> mean 0.5, unbiased std sqrt(0.5) -> +-0.7071; (0.5, 0.5) -> flat -> 0
    cfg = TrainConfig(**{**GRPO, "group_size": 2})
    adv, _ = METHODS["grpo"].advantages(batch, None, cfg)
    s = 0.5 / 0.5 ** 0.5
    assert torch.allclose(adv, torch.tensor([[0, s, s], [0, -s, 0], [0, 0, 0], [0, 0, 0]]))


def test_search_rollout_renumbers_groups_across_search_calls():
    from treedistill.engine.native import NativeEngine
    from treedistill.models.load import wrap_policy
    from treedistill.models.tiny import build_model, build_tokenizer

    policy = wrap_policy(build_model(0, num_hidden_layers=1, hidden_size=32, intermediate_size=64),
                         build_tokenizer(), name="t", device=torch.device("cpu"), dtype=torch.float32,
                         compact_prompt=True)
    cfg = TrainConfig(method="mcts", problems_per_step=3, max_new_tokens=12,
                      search=SearchSettings(simulations=4, parallel=2, problems_at_once=2, k_children=2,
                                            step_max_tokens=4, max_depth=2))
    ctx = RolloutContext(engine=NativeEngine(policy), policy=policy, env=CountdownEnv(), cfg=cfg)
    problems = PROBLEMS + [{"numbers": [4, 4, 6, 1], "target": 96}]
    rollout = search_rollout(ctx, problems, seed=3)
    traj = rollout.trajectories
    # two search calls (2 + 1 problems), groups numbered over the whole step
    assert [t.group for t in traj] == [0, 1, 2]
    for t, p in zip(traj, problems):
        assert t.prompt_ids == tuple(policy.prompt_ids(ctx.env.messages(p, compact=True)))
        assert 0 < len(t.completion_ids) <= 12 and len(t.behaviour_logprobs) == len(t.completion_ids)
        assert all(lp <= 0 for lp in t.behaviour_logprobs)
    assert rollout.stats["search_simulations"] == 4
    for key in ("search_tree_nodes", "search_tree_depth", "search_root_value", "search_complete_frac"):
        assert key in rollout.stats
    # the same seed repeats the same trajectories (resume relies on it)
    again = search_rollout(RolloutContext(NativeEngine(policy), policy, ctx.env, cfg), problems, seed=3)
    assert [t.completion_ids for t in again.trajectories] == [t.completion_ids for t in traj]


def test_search_settings_reach_the_search_core(monkeypatch):
    import treedistill.methods as methods

    cfg = TrainConfig(method="mcts", max_new_tokens=40,
                      search=SearchSettings(simulations=32, parallel=4, c_puct=1.5, select="uct", virtual_loss=0.5,
                                            max_depth=None, widen_c=2.0, widen_alpha=0.25, problems_at_once=12))
    seen = []
    monkeypatch.setattr(methods, "search_problems", lambda *a, search, **kw: seen.append(search) or [])
    methods.search_rollout(RolloutContext(None, None, CountdownEnv(), cfg), [{"numbers": [1], "target": 1}], seed=9)
    sc = seen[0]
    assert (sc.simulations, sc.parallel, sc.c_puct, sc.select, sc.virtual_loss) == (32, 4, 1.5, "uct", 0.5)
    # max_depth None: the completion's token budget; the Gumbel seed: the step's (seed * 1009 + chunk)
    assert (sc.max_depth, sc.widen_c, sc.widen_alpha, sc.seed, sc.pick) == (40, 2.0, 0.25, 9 * 1009, "visits")
    with pytest.raises(UsageError, match="search.widen_c must be >= 0"):
        SearchSettings(widen_c=-1)


def test_sparse_training_reward_is_what_rollouts_score_and_choose_by():
    from treedistill.methods import REWARDS, TrainingReward

    assert set(REWARDS) == {"dense", "sparse"}
    ctx, _ = _context(**GRPO, reward="sparse")
    traj = group_rollout(ctx, PROBLEMS, seed=11).trajectories
    assert [t.reward for t in traj] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # the 0/1 evaluation reward
    assert [t.sparse for t in traj] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    # best-of-N by the sparse reward: problem 0's first sample and problem 1's second are the correct ones
    ctx, _ = _context(method="bon", bon_n=3, reward="sparse")
    assert [t.reward for t in best_of_n_rollout(ctx, PROBLEMS, seed=5).trajectories] == [1.0, 1.0]
    # the wrapped environment is the environment in everything but the training reward
    env = CountdownEnv()
    wrapped = TrainingReward(env, "sparse")
    assert (wrapped.name, wrapped.step_end, wrapped.reward_from_prompt) == (env.name, env.step_end, True)
    assert wrapped.messages(PROBLEMS[0], compact=True) == env.messages(PROBLEMS[0], compact=True)
    assert wrapped.key(PROBLEMS[0]) == env.key(PROBLEMS[0])
    near = wrapped.score(PROBLEMS[0], "<answer>3*5+7-2</answer>")  # 20 for 22: dense 1 - 2 * 2/22
    assert (near.reward, near.sparse, near.well_formed) == (0.0, 0.0, True)
    assert near.dense == pytest.approx(1 - 4 / 22)  # the dense field stays the environment's dense reward
    assert env.score(PROBLEMS[0], "<answer>3*5+7-2</answer>").dense == pytest.approx(1 - 4 / 22)
