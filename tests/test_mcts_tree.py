"""Method mcts-tree and the value probe: credit and value targets on a toy tree worked by hand, a shared
step learned once, minibatches of whole trees, the probe's numbers on a case with a known answer, and
the search_reward option."""

from types import SimpleNamespace

import pytest
import torch

from treedistill.algorithms.batch import Batch
from treedistill.config import TrainConfig
from treedistill.envs.base import Score
from treedistill.errors import UsageError
from treedistill.methods import METHODS, tree_advantages
from treedistill.rollout.to_batch import to_batch
from treedistill.rollout.trajectory import Trajectory
from treedistill.rollout.tree_lines import tree_rows, with_lines
from treedistill.search.contracts import LeafRollout
from treedistill.search.credit import step_credits, subtree_values
from treedistill.search.tree import ROOT, Tree
from treedistill.value_probe import mse, probe_value, spearman


def _toy_tree() -> Tree:
    """root -> a (step "a|") -> a1 "w!" (terminal, right), a2 "x!" (terminal, wrong)
            -> b "b|" -> b1 "c|" (never expanded: no terminal below)
            -> c "y!" (terminal, wrong)"""
    tree = Tree(prompt=(ord("P"),))
    def add(parent, text, terminal):
        tokens = tuple(ord(ch) for ch in text)
        return tree.add_node(parent, tokens, -0.1 * len(tokens), 0.25, terminal=terminal, finish="stop",
                             token_logprobs=tuple(-0.1 - 0.01 * i for i in range(len(tokens))))
    a = add(ROOT, "a|", False)
    b = add(ROOT, "b|", False)
    c = add(ROOT, "y!", True)
    a1 = add(a, "w!", True)
    a2 = add(a, "x!", True)
    add(b, "c|", False)
    assert (a, b, c, a1, a2) == (1, 2, 3, 4, 5)
    return tree


REWARDS = {3: 0.0, 4: 1.0, 5: 0.0}


def test_subtree_values_and_credits_by_hand():
    tree = _toy_tree()
    values, leaves = subtree_values(tree, REWARDS)
    # V^(a) = mean(1, 0) = 1/2; V^(c) = 0; V^(root) = mean(0, 1, 0) = 1/3; b and its child: no terminal below
    assert values == pytest.approx([1 / 3, 0.5, None, 0.0, 1.0, 0.0, None])
    assert leaves == [3, 2, 0, 1, 1, 1, 0]
    # local: A = V^(n) - V^(parent): a 1/2 - 1/3 = 1/6, c 0 - 1/3, a1 1 - 1/2, a2 0 - 1/2; b is not learned
    local = step_credits(tree, REWARDS, "local")
    assert [c.node for c in local] == [1, 3, 4, 5]
    assert [c.advantage for c in local] == pytest.approx([1 / 6, -1 / 3, 0.5, -0.5])
    assert [c.value for c in local] == pytest.approx([0.5, 0.0, 1.0, 0.0])
    # local+global adds V^(n) - V^(root): a 1/6 + 1/6, c -1/3 - 1/3, a1 1/2 + 2/3, a2 -1/2 - 1/3
    both = step_credits(tree, REWARDS, "local+global")
    assert [c.advantage for c in both] == pytest.approx([1 / 3, -2 / 3, 7 / 6, -5 / 6])
    with pytest.raises(AssertionError, match="no reward for terminal nodes"):
        subtree_values(tree, {3: 0.0})


class _Env:
    """Scores a completion: right iff it holds "w"; the dense reward is 1 / -1, the sparse 1 / 0."""

    def score(self, problem, text):
        right = "w" in text
        return Score(dense=1.0 if right else -1.0, sparse=float(right), reason="")


_POLICY = SimpleNamespace(eos_token_ids=[0], decode=lambda ids: "".join(chr(i) for i in ids))


def test_tree_rows_learn_each_step_once_with_its_prefix_and_recorded_logprobs():
    tree = _toy_tree()
    part = tree_rows(tree, {}, _Env(), _POLICY, group=7, mode="local")
    rows = part.rows
    texts = [(_POLICY.decode(r.prompt_ids), _POLICY.decode(r.completion_ids)) for r in rows]
    # the shared step "a|" (on two lines) is ONE row; a1 and a2 are conditioned on the prompt and "a|"
    assert texts == [("P", "a|"), ("P", "y!"), ("Pa|", "w!"), ("Pa|", "x!")]
    assert all(r.group == 7 for r in rows)
    # the environment's (learner's) reward, not the tree's values: dense 1 / -1 -> V^(a) = 0, V^(root) = -1/3
    assert [r.reward for r in rows] == pytest.approx([0.0, -1.0, 1.0, -1.0])
    assert [r.sparse for r in rows] == pytest.approx([0.5, 0.0, 1.0, 0.0])
    assert [r.advantage for r in rows] == pytest.approx([1 / 3, -2 / 3, 1.0, -1.0])
    assert sorted(part.line_rewards) == [-1.0, -1.0, 1.0]
    # behaviour log-probs: those the search recorded at expansion, token by token
    assert rows[2].behaviour_logprobs == tree.token_logprobs[4]

    # to the batch: the step's advantage on its tokens only; value target V^ on the same tokens
    batch = to_batch(rows, pad_id=0)
    cfg = TrainConfig(method="mcts-tree", advantage="tree", micro_batch_size=4)
    advantages, returns = METHODS["mcts-tree"].advantages(batch, None, cfg)
    assert METHODS["mcts-tree"].advantages is tree_advantages
    mask = batch.loss_mask
    assert mask.sum(dim=1).tolist() == [2, 2, 2, 2]
    assert advantages[2].tolist() == pytest.approx([0, 0, 0, 1.0, 1.0])          # row "Pa|" + "w!"
    assert returns[1].tolist() == pytest.approx([0, -1.0, -1.0, 0, 0])           # row "P" + "y!", padded
    assert bool((advantages[mask == 0] == 0).all()) and bool((returns[mask == 0] == 0).all())
    with pytest.raises(AssertionError, match="every trajectory carries its advantage or none"):
        to_batch([rows[0], SimpleNamespace(**{**rows[1].__dict__, "advantage": None})], pad_id=0)


def test_the_policy_completion_of_an_unfinished_path_is_one_more_line():
    tree = _toy_tree()
    # the extracted path stopped at b1 (node 6, never expanded); the policy completed it with "w!"
    b, b1 = tuple(map(ord, "b|")), tuple(map(ord, "c|"))
    path = Trajectory((ord("P"),), b + b1 + (ord("w"), ord("!")), (-0.1,) * 6, 1.0, 1.0, 0, search_tokens=4)
    outcome = SimpleNamespace(tree=tree, trajectory=path, completed_by_policy=True,
                              extraction=SimpleNamespace(nodes=(0, 2, 6)), completion_finish="eos")
    assert with_lines(outcome) is tree and len(tree) == 8
    assert (tree.parent[7], tree.tokens[7], tree.terminal[7], tree.token_logprobs[7]) == (6, (119, 33), True,
                                                                                          (-0.1, -0.1))
    rows = tree_rows(tree, {}, _Env(), _POLICY, group=0).rows
    # b and b1 now lie on a line (V^ = 1): five old rows' worth plus b, b1 and the completion
    assert [_POLICY.decode(r.prompt_ids) + "+" + _POLICY.decode(r.completion_ids) for r in rows] == [
        "P+a|", "P+b|", "P+y!", "Pa|+w!", "Pa|+x!", "Pb|+c|", "Pb|c|+w!"]
    # a finished path adds nothing
    done = SimpleNamespace(tree=_toy_tree(), trajectory=path, completed_by_policy=False)
    assert len(with_lines(done)) == 7


def test_every_rollout_is_a_learned_line_below_the_leaf_it_valued():
    tree = _toy_tree()
    # rollout leaves: the root's rollout "y!" (wrong) and b1's "w!" (right), which also finished the
    # extracted path root -> b -> b1: hung once, not a second time as the path's completion
    tree.rollout[ROOT] = LeafRollout(tuple(map(ord, "y!")), -1.0, (-0.2, -0.3), "eos")
    tree.rollout[6] = LeafRollout(tuple(map(ord, "w!")), 1.0, (-0.4, -0.5), "eos")
    path = Trajectory((ord("P"),), tuple(map(ord, "b|c|w!")), (-0.1,) * 4 + (-0.4, -0.5), 1.0, 1.0, 0,
                      search_tokens=4, stats={"finished_by_rollout": True})
    outcome = SimpleNamespace(tree=tree, trajectory=path, completed_by_policy=True,
                              extraction=SimpleNamespace(nodes=(0, 2, 6)), completion_finish="eos")
    assert with_lines(outcome) is tree and len(tree) == 9
    assert [(tree.parent[n], tree.tokens[n], tree.terminal[n], tree.token_logprobs[n], tree.prior[n])
            for n in (7, 8)] == [(ROOT, (121, 33), True, (-0.2, -0.3), 0.0), (6, (119, 33), True, (-0.4, -0.5), 0.0)]
    part = tree_rows(tree, {}, _Env(), _POLICY, group=0, mode="local")
    assert [_POLICY.decode(r.prompt_ids) + "+" + _POLICY.decode(r.completion_ids) for r in part.rows] == [
        "P+a|", "P+b|", "P+y!", "Pa|+w!", "Pa|+x!", "Pb|+c|", "P+y!", "Pb|c|+w!"]
    # five lines (dense reward 1 / -1), two right: V^(root) = -1/5, V^(b) = 1, so b's step gains 1 + 1/5;
    # the root's rollout (a line of its own, wrong) gets -1 + 1/5 with the log-probs it was sampled with
    rows = {(r.stats["node"]): r for r in part.rows}
    assert rows[2].advantage == pytest.approx(1.2) and rows[7].advantage == pytest.approx(-0.8)
    assert rows[7].behaviour_logprobs == (-0.2, -0.3) and len(part.line_rewards) == 5
    # a step sampled twice at its node (merged into one node by the search) is learned twice
    tree.count[4] = 2
    again = tree_rows(tree, {}, _Env(), _POLICY, group=0, mode="local").rows
    assert len(again) == len(part.rows) + 1 and again[3] is again[4] and again[3].stats["node"] == 4


def _batch(groups: list[int]) -> Batch:
    B = len(groups)
    ones = torch.ones((B, 2), dtype=torch.long)
    mask = torch.tensor([[0.0, 1.0]] * B)
    return Batch(input_ids=torch.arange(B)[:, None].repeat(1, 2), attention_mask=ones, loss_mask=mask,
                 behaviour_logprobs=torch.zeros(B, 2), rewards=torch.zeros(B), advantages=torch.zeros(B, 2),
                 returns=torch.zeros(B, 2), group_ids=torch.tensor(groups))


def test_group_minibatches_keep_trees_whole_and_equal_the_row_minibatches_for_equal_groups():
    batch = _batch([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])  # trees of 3, 1, 2, 4 rows
    parts = batch.group_minibatches(2, torch.Generator().manual_seed(0))
    assert len(parts) == 2
    seen = sorted(int(x) for p in parts for x in p.input_ids[:, 0])
    assert seen == list(range(10))
    for p in parts:
        ids = p.group_ids.tolist()
        assert len(set(ids)) == 2 and all(ids.count(g) == [3, 1, 2, 4][g] for g in set(ids))
    equal = _batch([0, 0, 1, 1, 2, 2, 3, 3])
    rows = [p.input_ids.tolist() for p in equal.minibatches(4, torch.Generator().manual_seed(5))]
    groups = [p.input_ids.tolist() for p in equal.group_minibatches(2, torch.Generator().manual_seed(5))]
    assert rows == groups


def test_mcts_tree_config_counts_trees_per_minibatch_and_rows_per_micro_batch():
    cfg = TrainConfig(method="mcts-tree", advantage="tree", problems_per_step=16, minibatch_size=4, micro_batch_size=64)
    assert (cfg.rows_per_problem, cfg.minibatch_problems, cfg.micro_batch_rows, cfg.updates_per_step) == (
        None, 4, 64, 4)
    assert TrainConfig(method="mcts").rows_per_problem == 1
    with pytest.raises(UsageError, match="mcts-tree needs micro_batch_size >= 1"):
        TrainConfig(method="mcts-tree", advantage="tree")
    with pytest.raises(UsageError, match="tree_advantage must be one of local, local\\+global"):
        TrainConfig(method="mcts-tree", advantage="tree", micro_batch_size=8, tree_advantage="global")
    with pytest.raises(UsageError, match="search_reward must be one of"):
        TrainConfig(search_reward="shaped")
    with pytest.raises(UsageError, match="mcts-tree needs advantage in tree"):
        TrainConfig(method="mcts-tree", micro_batch_size=8, advantage="gae")


def test_spearman_and_mse_by_hand():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties take their average rank: a = ranks (1, 2.5, 2.5), b = (1, 2, 3): cov 1.5, var 1.5 and 2 -> 1.5 / sqrt 3
    assert spearman([0, 1, 1], [0, 1, 2]) == pytest.approx(1.5 / 3 ** 0.5)
    assert spearman([1, 1, 1], [0, 1, 2]) is None
    assert mse([0.0, 1.0], [0.5, 0.5]) == pytest.approx(0.25)


class _ProbeEnv:
    """Prompt = the problem's name; a step ends at "|"; a line ends at "!"; right iff it holds "W"."""

    step_end = "|"

    def messages(self, problem, compact=False):
        return problem["name"]

    def is_terminal(self, text):
        return text.endswith("!")

    def score(self, problem, text):
        return Score(dense=float("W" in text), sparse=float("W" in text), reason="")


class _ProbeEngine:
    """Lines are "s|s|!" step by step. From any prefix of problem i, sample j of k holds "W" iff
    j < wins[i]: the success rate is wins[i] / k exactly. The value at a prefix is values[i]."""

    def __init__(self, wins, values):
        self.wins, self.values, self.seeds = wins, values, []

    def _problem(self, prefix):
        return prefix[0] - ord("A")

    def sample(self, prefixes, n=1, *, max_new_tokens, temperature=1.0, top_p=1.0, stop=(), seed=None):
        self.seeds.append(seed)
        out = []
        for prefix in prefixes:
            done = "".join(chr(t) for t in prefix[1:])
            if stop:  # one step
                text = "!" if done.count("|") == 2 else "s|"
                out.append([SimpleNamespace(tokens=tuple(map(ord, text)))])
            else:
                i = self._problem(prefix)
                out.append([SimpleNamespace(tokens=tuple(map(ord, "W!" if j < self.wins[i] else "L!")))
                            for j in range(n)])
        return out

    def value(self, prefixes):
        return [self.values[self._problem(p)] for p in prefixes]


_PROBE_POLICY = SimpleNamespace(eos_token_ids=[0], decode=lambda ids: "".join(chr(i) for i in ids),
                                prompt_ids=lambda name: [ord(name)], compact_prompt=True, context_length=100,
                                name="toy")


def test_value_probe_on_a_case_with_a_known_answer():
    problems = [{"name": ch} for ch in "ABCD"]
    wins = [0, 1, 2, 4]                       # k = 4: success rates 0, 1/4, 1/2, 1
    engine = _ProbeEngine(wins, values=[0.1, 0.35, 0.6, 1.1])   # truth + 0.1: ranks right, MSE 0.01
    probe = probe_value(engine, _PROBE_POLICY, _ProbeEnv(), problems, k=4, temperature=1.0, max_new_tokens=20,
                        step_max_tokens=4, seed=3)
    assert probe.targets == pytest.approx((0.0, 0.25, 0.5, 1.0))
    assert probe.spearman == pytest.approx(1.0)
    assert probe.mse == pytest.approx(0.01)
    # the best constant, mean 0.4375: ((0.4375)^2 + (0.1875)^2 + (0.0625)^2 + (0.5625)^2) / 4
    assert probe.mse_const == pytest.approx((0.4375 ** 2 + 0.1875 ** 2 + 0.0625 ** 2 + 0.5625 ** 2) / 4)
    # prefixes are non-terminal states of the sampled lines: 0, 1 or 2 steps
    assert set(probe.depths) <= {0, 1, 2}
    keys = probe.to_dict()
    assert {"value_spearman", "value_mse", "value_mse_const"} <= set(keys)
    # a head that ranks backwards
    backwards = probe_value(_ProbeEngine(wins, values=[1.0, 0.5, 0.2, 0.0]), _PROBE_POLICY, _ProbeEnv(), problems,
                            k=4, temperature=1.0, max_new_tokens=20, step_max_tokens=4, seed=3)
    assert backwards.spearman == pytest.approx(-1.0)
    # the same seed, the same engine calls
    again = _ProbeEngine(wins, values=[0.0] * 4)
    probe_value(again, _PROBE_POLICY, _ProbeEnv(), problems, k=4, temperature=1.0, max_new_tokens=20,
                step_max_tokens=4, seed=3)
    assert again.seeds == engine.seeds


def test_search_reward_searches_with_one_reward_and_trains_on_the_other():
    import treedistill.methods as methods
    from treedistill.config import SearchSettings
    from treedistill.engine.native import NativeEngine
    from treedistill.envs.countdown import CountdownEnv
    from treedistill.models.load import wrap_policy
    from treedistill.models.tiny import build_model, build_tokenizer

    policy = wrap_policy(build_model(0, num_hidden_layers=1, hidden_size=32, intermediate_size=64),
                         build_tokenizer(), name="t", device=torch.device("cpu"), dtype=torch.float32,
                         compact_prompt=True)
    env = CountdownEnv()
    problems = [{"numbers": [3, 5, 7, 2], "target": 22}, {"numbers": [1, 2, 3, 4], "target": 24}]
    # 8-token lines of 4-token steps: the search reaches terminal nodes (cut at the length), which it scores
    search = SearchSettings(simulations=8, parallel=2, problems_at_once=2, k_children=2, step_max_tokens=4,
                            max_depth=4)

    def rollout(**rewards):
        cfg = TrainConfig(method="mcts", max_new_tokens=8, search=search, **rewards)
        return methods.search_rollout(methods.RolloutContext(NativeEngine(policy), policy, env, cfg), problems,
                                      seed=1).trajectories

    searched_dense = rollout(reward="dense")  # searches and learns with the dense reward
    mixed = rollout(reward="sparse", search_reward="dense")
    # the same search (dense terminal values, the same seed): the same lines ...
    assert [t.completion_ids for t in mixed] == [t.completion_ids for t in searched_dense]
    texts = [policy.decode(t.completion_ids) for t in mixed]
    # ... the learner gets its own reward, sparse, for them; the search's was dense
    assert [t.reward for t in mixed] == [env.score(p, x).sparse for p, x in zip(problems, texts)]
    assert [t.reward for t in searched_dense] == [env.score(p, x).dense for p, x in zip(problems, texts)]
    assert [t.reward for t in mixed] != [t.reward for t in searched_dense]  # the random model answers wrong: -1 vs 0
    # the search backed up the dense reward of its terminal nodes (-1: no answer), not the sparse one (0)
    searched_sparse = rollout(reward="sparse")
    assert all(t.stats["search_complete"] for t in mixed)
    assert [t.stats["root_value"] for t in mixed] == [t.stats["root_value"] for t in searched_dense]
    assert all(a.stats["root_value"] < b.stats["root_value"] for a, b in zip(mixed, searched_sparse))


def test_scaled_advantages_by_hand():
    from treedistill.search.credit import scaled_advantages

    assert scaled_advantages([0.5, -0.5, 0.0, 0.0], "none") == [0.5, -0.5, 0.0, 0.0]
    # population std of [0.5, -0.5, 0, 0] = sqrt(0.5 / 4); divided, not centred
    s = (0.5 / 4) ** 0.5
    assert scaled_advantages([0.5, -0.5, 0.0, 0.0], "std") == pytest.approx([0.5 / s, -0.5 / s, 0.0, 0.0])
    assert scaled_advantages([0.0, 0.0], "std") == [0.0, 0.0]      # nothing to scale: left as is
    assert scaled_advantages([0.3, 0.3], "std") == [0.3, 0.3]      # std 0: left as is
    with pytest.raises(UsageError, match="tree_advantage_norm must be one of none, std"):
        TrainConfig(method="mcts-tree", advantage="tree", micro_batch_size=8, tree_advantage_norm="max")
