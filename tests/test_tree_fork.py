"""Method tree-fork (chains, then forks from the steps of highest estimated entropy), the solver's leaf
value and the value probe's AUC: steps and trees by hand, the fork choice on a toy engine whose
log-probs are known, real tiny-model trees, a training step, and the configuration's refusals."""

import json
from types import SimpleNamespace

import pytest
import torch

from treedistill.cli import main
from treedistill.config import TrainConfig, load_config
from treedistill.engine.native import NativeEngine
from treedistill.envs.countdown import CountdownEnv, reachable, remaining_numbers
from treedistill.errors import UsageError
from treedistill.methods import METHODS, RolloutContext, TrainingReward, fork_rollout, tree_advantages
from treedistill.metrics import read_metrics
from treedistill.rollout.sample import completion_text
from treedistill.rollout.tree_fork import fork_problems, hang_line, step_ends, step_entropy
from treedistill.rollout.tree_lines import tree_rows
from treedistill.rollout.tree_search import search_problems
from treedistill.search import SearchSettings
from treedistill.search.tree import ROOT, Tree
from treedistill.value_probe import ValueProbe, auc, probe_value

_POLICY = SimpleNamespace(eos_token_ids=[0], decode=lambda ids: "".join(chr(i) for i in ids),
                          prompt_ids=lambda text: [ord(ch) for ch in text], compact_prompt=True,
                          context_length=100, name="toy")


def _ids(text):
    return tuple(map(ord, text))


def test_step_ends_cut_after_each_delimiter_and_keep_the_rest_as_the_last_step():
    assert step_ends(_POLICY, _ids("a|bc|d!"), "|") == [2, 5, 7]
    assert step_ends(_POLICY, _ids("a|bc|"), "|") == [2, 5]      # a line that ends at a delimiter
    assert step_ends(_POLICY, _ids("abc"), "|") == [3]           # no delimiter: one step
    assert step_ends(_POLICY, (), "|") == []
    # a delimiter of several tokens ends the step at its last token
    assert step_ends(_POLICY, _ids("a</s>b"), "</s>") == [5, 6]


def test_hang_line_merges_identical_steps_and_marks_the_last_terminal():
    tree = Tree(prompt=(1,))
    first = hang_line(tree, ROOT, _ids("a|b!"), [-0.5] * 4, "eos", [2, 4])
    assert first == [1, 2] and tree.terminal[1:] == [False, True] and tree.finish[1:] == ["stop", "eos"]
    assert tree.token_logprobs[2] == (-0.5, -0.5) and tree.logprob[2] == -1.0
    # the same first step: the same node; a new second step: a sibling of b!
    assert hang_line(tree, ROOT, _ids("a|c!"), [-0.1] * 4, "eos", [2, 4]) == [1, 3]
    # the same line again: the same nodes, nothing added (it counts once in the credit), each node's count
    # raised (its row is learned once per sample)
    assert hang_line(tree, ROOT, _ids("a|b!"), [-0.5] * 4, "eos", [2, 4]) == [1, 2] and len(tree) == 4
    assert tree.count[1:] == [3, 2, 1]
    # equal tokens that end the line here but not there are two nodes
    assert hang_line(tree, ROOT, _ids("a|"), [-0.1] * 2, "length", [2]) == [4]
    assert tree.tokens[4] == tree.tokens[1] and tree.terminal[4] and not tree.terminal[1]
    # hung under a node: the fork's steps continue its prefix
    assert hang_line(tree, 1, _ids("d|e!"), [-0.2] * 4, "eos", [2, 4]) == [5, 6]
    assert tree.completion(6) == _ids("a|d|e!")
    # the mean of -log p: (0.5 + 0.5) / 2
    assert step_entropy(tree, 2) == pytest.approx(0.5)


class _ToyEngine:
    """Lines of a toy policy over characters. From the prompt "P" a chain is "a|b|!" with per-token
    log-probs -0.1 on "a|", -2.0 on "b|", -0.5 on "!": step b| is the least certain. From any other
    prefix a line is "x|!" (-1.0 per token): the forks. Records every call's prefixes."""

    def __init__(self):
        self.calls = []

    def sample(self, prefixes, n=1, *, max_new_tokens, temperature=1.0, top_p=1.0, stop=(), seed=None):
        self.calls.append(([_POLICY.decode(p) for p in prefixes], n, max_new_tokens, seed))
        out = []
        for prefix in prefixes:
            if _POLICY.decode(prefix) == "P":
                text, lps = "a|b|!", (-0.1, -0.1, -2.0, -2.0, -0.5)
            else:
                text, lps = "x|!", (-1.0,) * 3
            cut = len(text) > max_new_tokens
            out.append([SimpleNamespace(tokens=_ids(text)[:max_new_tokens], policy_logprobs=lps[:max_new_tokens],
                                        finish="length" if cut else "eos") for _ in range(n)])
        return out


class _ToyEnv:
    step_end = "|"

    def messages(self, problem, compact=False):
        return problem["name"]


def test_forks_start_from_the_parent_of_the_step_of_highest_entropy_first():
    engine = _ToyEngine()
    (forked,) = fork_problems(engine, _POLICY, _ToyEnv(), [{"name": "P"}], chains=2, forks=3, per_round=2,
                              temperature=1.0, max_new_tokens=10, seed=4)
    tree = forked.tree
    # the chains (2 samples, one line): P -> a| -> b| -> !
    assert engine.calls[0][:3] == (["P"], 2, 10)
    # round 1 forks the two most uncertain steps: b| (2.0: a new line from "Pa|") and ! (0.5: from
    # "Pa|b|"), one call per remaining budget, the smaller first (6 and 8 tokens left)
    assert [tree.tokens[n] for n in forked.forked[:2]] == [_ids("b|"), _ids("!")]
    assert forked.forked_entropy[:2] == pytest.approx((2.0, 0.5))
    assert [c[0] for c in engine.calls[1:3]] == [["Pa|b|"], ["Pa|"]] and [c[2] for c in engine.calls[1:3]] == [6, 8]
    # round 2 (one fork left): the forks' own steps x| and ! (1.0) now outrank a| (0.1); the lowest id
    # wins: x| under b| (node 4), so the new line starts from "Pa|b|" again
    third = forked.forked[2]
    assert third == 4 and tree.tokens[third] == _ids("x|") and forked.forked_entropy[2] == pytest.approx(1.0)
    assert engine.calls[3][0] == ["Pa|b|"] and len(engine.calls) == 4
    # every generated token counted: 2 chains x 5 + 3 forks x 3; the last fork repeated a line (merged)
    assert (forked.chain_tokens, forked.fork_tokens, forked.generated_tokens) == (10, 9, 19)
    lines = [_POLICY.decode(tree.completion(n)) for n in range(len(tree)) if tree.terminal[n]]
    assert sorted(lines) == ["a|b|!", "a|b|x|!", "a|x|!"]
    # the same seed, the same calls
    again = _ToyEngine()
    fork_problems(again, _POLICY, _ToyEnv(), [{"name": "P"}], chains=2, forks=3, per_round=2, temperature=1.0,
                  max_new_tokens=10, seed=4)
    assert again.calls == engine.calls


def test_a_line_is_cut_at_its_room_and_forks_stop_when_no_step_is_left():
    engine = _ToyEngine()
    (forked,) = fork_problems(engine, _POLICY, _ToyEnv(), [{"name": "P"}], chains=1, forks=10, per_round=2,
                              temperature=1.0, max_new_tokens=3, seed=0)
    tree = forked.tree
    # the chain "a|b" (3 tokens, cut): steps a| and b, the last terminal with finish "length"
    assert [tree.tokens[n] for n in range(1, 3)] == [_ids("a|"), _ids("b")]
    assert tree.terminal[1:3] == [False, True] and tree.finish[2] == "length"
    # round 1 forks b (2.0, from "Pa|": "x", cut at 1 token) and a| (0.1, from the root: "a|b" again,
    # merged); round 2 the one step left, x (1.0, from "Pa|": "x" again); round 3 finds none: 3 forks of 10
    assert [tree.tokens[n] for n in forked.forked] == [_ids("b"), _ids("a|"), _ids("x")]
    assert len(tree) == 4 and forked.fork_tokens == 1 + 3 + 1


@pytest.fixture(scope="module")
def tiny():
    from treedistill.models.load import load_policy

    return load_policy("tiny", value_head=True, device="cpu", dtype="float32")


PROBLEMS = [{"numbers": [3, 5, 7, 2], "target": 22}, {"numbers": [4, 6, 8, 9], "target": 26},
            {"numbers": [12, 2, 5, 1], "target": 29}]


def test_tiny_model_forking_trees_hold_every_line_once_and_count_every_token(tiny):
    engine = NativeEngine(tiny)
    env = TrainingReward(CountdownEnv(), "sparse")
    before = engine.counters.generated_tokens
    trees = fork_problems(engine, tiny, env, PROBLEMS, chains=4, forks=6, per_round=3, temperature=1.0,
                          max_new_tokens=128, seed=7)
    assert sum(f.generated_tokens for f in trees) == engine.counters.generated_tokens - before
    for problem, f in zip(PROBLEMS, trees):
        tree = f.tree
        assert f.generated_tokens == f.chain_tokens + f.fork_tokens and len(f.forked) == 6
        terminals = [n for n in range(len(tree)) if tree.terminal[n]]
        assert 1 <= len(terminals) <= 4 + 6
        # no line stops short: every leaf is terminal, every terminal is a leaf
        assert all(bool(tree.children[n]) != tree.terminal[n] for n in range(1, len(tree)))
        for n in range(1, len(tree)):
            assert len(tree.token_logprobs[n]) == len(tree.tokens[n]) >= 1
            text = tiny.decode(list(tree.tokens[n]))
            # a step ends at the delimiter (the model writes steps), only a line's last step may not
            assert text.endswith("</step>") or tree.terminal[n], text
            assert text.count("</step>") <= 1
        # a fork hangs under the forked step's parent, so that parent has at least two children
        assert all(len(tree.children[tree.parent[n]]) >= 2 for n in f.forked[:3])
        # merged identical steps are generated more than once and learned once: learned <= generated
        rows = tree_rows(tree, problem, env, tiny, group=0).rows
        assert sum(len(r.completion_ids) for r in rows) == sum(c * len(t) for c, t in zip(tree.count, tree.tokens)) <= f.generated_tokens
    # the same seed, the same trees
    again = fork_problems(NativeEngine(tiny), tiny, env, PROBLEMS, chains=4, forks=6, per_round=3, temperature=1.0,
                          max_new_tokens=128, seed=7)
    assert [a.tree.tokens for a in again] == [f.tree.tokens for f in trees]


def test_fork_rollout_gives_each_tree_its_rows_with_the_tree_credit(tiny):
    cfg = load_config("countdown-tiny-tree-fork", overrides=["fork.chains=3", "fork.forks=2", "fork.per_round=1"])
    assert METHODS["tree-fork"].rollout is fork_rollout and METHODS["tree-fork"].advantages is tree_advantages
    out = fork_rollout(RolloutContext(NativeEngine(tiny), tiny, CountdownEnv(), cfg), PROBLEMS, seed=3)
    groups = [t.group for t in out.trajectories]
    assert groups == sorted(groups) and set(groups) == {0, 1, 2}  # contiguous, one tree per problem
    assert all(t.advantage is not None and len(t.behaviour_logprobs) == len(t.completion_ids)
               for t in out.trajectories)
    s = out.stats
    assert s["tree_rows"] == len(out.trajectories) / 3 and 1 <= s["tree_lines"] <= 5
    assert s["tree_learned_tokens"] == sum(len(t.completion_ids) for t in out.trajectories) / 3
    assert s["tree_learned_tokens"] <= s["tree_generated_tokens"] == s["fork_chain_tokens"] + s["fork_tokens"]
    assert s["tree_lines_per_1k_tokens"] == pytest.approx(1000 * s["tree_lines"] / s["tree_generated_tokens"])
    assert s["fork_entropy_mean"] > 0


def test_tree_fork_preset_trains_a_step_with_no_value_head(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--preset", "countdown-tiny-tree-fork", "--steps", "1", "--set", "problems_per_step=2",
                 "--set", "minibatch_size=1", "--set", "fork.chains=3", "--set", "fork.forks=2", "--set", "fork.per_round=1",
                 "--set", "eval_problems=2", "--set", "eval_k=1", "--set", "eval_before_rl=false",
                 "--run-dir", str(run), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    (line,) = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert line["tree_rows"] >= 1 and line["tree_lines"] >= 1
    # every generated token is on a finished line; only merged duplicate steps are learned once
    assert 0.5 < line["learned_token_share"] <= 1.0
    assert line["learned_tokens"] == 2 * line["tree_learned_tokens"]
    assert line["grad_norm"] > 0 and "value_loss" not in line
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert summary["steps"] == 1


@pytest.mark.parametrize("overrides, message", [
    (["fork.chains=0"], "fork.chains must be >= 1"),
    (["fork.forks=-1"], "fork.forks must be >= 0"),
    (["fork.forks=4", "fork.per_round=5"], "fork.per_round must be in 1..4 \\(fork.forks=4; got 5\\)"),
    (["fork.per_round=0"], "fork.per_round must be in 1..8"),
    (["fork.forks=0"], "fork.per_round must be in 1..1 \\(fork.forks=0; got 4\\)"),
    (["fork.chains=20000000"], "fork.chains must be at most 10000000"),
    (["fork.width=2"], "unknown key fork.width"),
    (["micro_batch_size=0"], "tree-fork needs micro_batch_size >= 1"),
    (["advantage=gae", "value_coef=0.1"], "tree-fork needs advantage in tree"),
    (["leaf_value=solver"], "leaf_value=solver values search leaves: method tree-fork does not search"),
])
def test_tree_fork_config_errors(overrides, message):
    with pytest.raises(UsageError, match=message):
        load_config("countdown-tiny-tree-fork", overrides=overrides)


def test_fork_settings_reach_the_rollout(monkeypatch):
    import treedistill.methods as methods

    seen = {}
    monkeypatch.setattr(methods, "fork_problems", lambda *a, **kw: seen.update(kw) or [])
    monkeypatch.setattr(methods, "_tree_learning", lambda *a: ([], {"tree_lines": 0.0}))
    cfg = load_config("countdown-tiny-tree-fork", overrides=["fork.chains=5", "fork.forks=7", "fork.per_round=3",
                                                             "temperature=0.9"])
    methods.fork_rollout(RolloutContext(None, None, CountdownEnv(), cfg), PROBLEMS[:1], seed=11)
    assert {k: seen[k] for k in ("chains", "forks", "per_round", "temperature", "max_new_tokens", "seed")} == dict(
        chains=5, forks=7, per_round=3, temperature=0.9, max_new_tokens=128, seed=11)


# ---------------------------------------------------------------------------------------------------
# The solver's verdict on a prefix, and the search leaf valued by it


def test_remaining_numbers_and_reachable_by_hand():
    p = {"numbers": [3, 5, 7, 2], "target": 22}
    assert remaining_numbers(p["numbers"], "") == (2, 3, 5, 7) and reachable(p, "")
    # 5*3=15 leaves 2 7 15: 15+7 = 22
    assert remaining_numbers(p["numbers"], "<step>5*3=15 (2 7 15)</step>") == (2, 7, 15)
    assert reachable(p, "<step>5*3=15 (2 7 15)</step>")
    # then 15+2=17 leaves 7 17: 24, 10, 119 and no exact quotient; 22 is out of reach
    assert not reachable(p, "<step>5*3=15 (2 7 15)</step><step>15+2=17 (7 17)</step>")
    # reached: the target is one of the numbers left
    assert reachable(p, "<step>5*3=15</step><step>15+7=22 (2 22)</step>")
    # the restated numbers are not read; spaces are allowed
    assert remaining_numbers(p["numbers"], "<step> 7 - 2 = 5 (9 9 9)</step>") == (3, 5, 5)
    # an unclosed last step and text outside the steps are ignored
    assert remaining_numbers(p["numbers"], "<step>5*3=15</step>15=3*5<step>7+") == (2, 7, 15)
    # a broken step: wrong arithmetic, a number not available (5 used twice), a non-integer quotient,
    # a non-positive difference, not a combination at all
    for broken in ("5*3=16", "5*5=25", "7/2=3", "2-7=0", "think"):
        assert remaining_numbers(p["numbers"], f"<step>{broken}</step>") is None, broken
        assert not reachable(p, f"<step>{broken}</step>")


def test_solver_leaf_values_are_the_reachability_and_never_call_the_head(tiny):
    env = TrainingReward(CountdownEnv(), "sparse")
    search = SearchSettings(simulations=8, parallel=4, problems_at_once=3, k_children=3, step_max_tokens=40,
                            max_depth=3, temperature=1.0)
    engine = NativeEngine(tiny)
    outcomes = search_problems(engine, tiny, env, PROBLEMS, search=search, max_new_tokens=128, seed=2,
                               leaf_value="solver")
    assert engine.counters.values == 0  # the value head was never read
    seen = set()
    for problem, outcome in zip(PROBLEMS, outcomes):
        tree = outcome.tree
        for node in range(len(tree)):
            if tree.value[node] is None or tree.terminal[node]:
                continue
            text = completion_text(tiny, tree.completion(node))
            assert tree.value[node] == float(reachable(problem, text)), text
            seen.add(tree.value[node])
    assert 1.0 in seen  # every root is reachable
    # the head's values, by default
    head = NativeEngine(tiny)
    search_problems(head, tiny, env, PROBLEMS, search=search, max_new_tokens=128, seed=2)
    assert head.counters.values > 0


def test_solver_leaf_value_is_refused_where_it_cannot_apply():
    from treedistill.envs.gsm8k import GSM8KEnv
    from treedistill.rollout.tree_search import SearchBridge

    with pytest.raises(UsageError, match="leaf value 'solver' needs an environment with a solver"):
        SearchBridge(None, _POLICY, GSM8KEnv(), [{}], [(1,)], leaf_value="solver")
    with pytest.raises(UsageError, match="leaf value must be one of head, solver"):
        SearchBridge(None, _POLICY, CountdownEnv(), [{}], [(1,)], leaf_value="oracle")
    base = dict(method="mcts", reward="sparse", leaf_value="solver")
    assert TrainConfig(**base).leaf_value == "solver"
    assert TrainConfig(method="mcts-tree", advantage="tree", micro_batch_size=8, reward="sparse", leaf_value="solver")
    with pytest.raises(UsageError, match="leaf_value=solver needs an environment with a solver"):
        TrainConfig(**{**base, "env": "gsm8k"})
    with pytest.raises(UsageError, match="leaf_value=solver is on the sparse reward's scale"):
        TrainConfig(**{**base, "reward": "dense"})
    with pytest.raises(UsageError, match="leaf_value=solver is on the sparse reward's scale"):
        TrainConfig(**{**base, "search_reward": "dense"})
    with pytest.raises(UsageError, match="leaf_value must be one of head, solver"):
        TrainConfig(leaf_value="perfect")
    with pytest.raises(UsageError, match="method grpo does not search"):
        load_config("countdown-tiny-grpo", overrides=["leaf_value=solver"])
    # no preset uses it
    from treedistill.config import list_presets
    assert all(load_config(name).leaf_value == "head" for name in list_presets())


# ---------------------------------------------------------------------------------------------------
# The value probe's AUC against the solver's label


def test_auc_by_hand():
    assert auc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0     # a perfect scorer
    assert auc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0     # backwards
    assert auc([0.5] * 4, [True, False, True, False]) == 0.5                # a constant: every pair tied
    # positives 0.9, 0.4; negatives 0.4, 0.1: pairs (0.9>0.4) 1, (0.9>0.1) 1, (0.4=0.4) 1/2, (0.4>0.1) 1 -> 3.5 / 4
    assert auc([0.9, 0.4, 0.4, 0.1], [True, True, False, False]) == pytest.approx(3.5 / 4)
    assert auc([0.3, 0.4], [True, True]) is None and auc([], []) is None   # one class only
    probe = ValueProbe((0.9, 0.1), (0.0, 0.0), (0, 1), 0.0, (True, False))
    assert probe.to_dict()["value_auc_reachable"] == 1.0 and probe.to_dict()["value_probe_reachable_frac"] == 0.5
    assert "value_auc_reachable" not in ValueProbe((0.9,), (0.0,), (0,), 0.0).to_dict()


class _ProbeEnv:
    """Prompt = the problem's name; a step ends at "|"; a line ends at "!"; right iff it holds "W"; a
    prefix is "reachable" iff the problem's name is in "AB" (the solver's label, known)."""

    step_end = "|"

    def messages(self, problem, compact=False):
        return problem["name"]

    def is_terminal(self, text):
        return text.endswith("!")

    def score(self, problem, text):
        from treedistill.envs.base import Score
        return Score(dense=float("W" in text), sparse=float("W" in text), reason="")

    def reachable(self, problem, text):
        return problem["name"] in "AB"


class _ProbeEngine:
    """Lines "s|s|!" step by step; every completion is a loss; the value at a prefix is values[i]."""

    def __init__(self, values):
        self.values = values

    def sample(self, prefixes, n=1, *, max_new_tokens, temperature=1.0, top_p=1.0, stop=(), seed=None):
        if stop:
            return [[SimpleNamespace(tokens=_ids("!" if _POLICY.decode(p[1:]).count("|") == 2 else "s|"))]
                    for p in prefixes]
        return [[SimpleNamespace(tokens=_ids("L!"))] * n for _ in prefixes]

    def value(self, prefixes):
        return [self.values[p[0] - ord("A")] for p in prefixes]


def test_value_probe_reports_the_auc_where_the_spearman_is_undefined():
    problems = [{"name": ch} for ch in "ABCD"]
    kw = dict(k=2, temperature=1.0, max_new_tokens=20, step_max_tokens=4, seed=1)
    seeing = probe_value(_ProbeEngine([0.7, 0.9, 0.2, 0.1]), _POLICY, _ProbeEnv(), problems, **kw)
    assert seeing.reachable == (True, True, False, False)
    assert seeing.spearman is None        # every completion fails: a constant Monte Carlo target
    assert seeing.auc == 1.0
    blind = probe_value(_ProbeEngine([0.3] * 4), _POLICY, _ProbeEnv(), problems, **kw)
    assert blind.auc == 0.5
    # an environment without a solver: no label, no AUC
    plain = _ProbeEnv()
    plain.reachable = None
    assert probe_value(_ProbeEngine([0.3] * 4), _POLICY, plain, problems, **kw).reachable is None


def test_the_evaluation_line_carries_the_auc_on_countdown(tiny):
    from treedistill.value_probe import value_quality

    cfg = load_config("countdown-tiny-mcts", overrides=["value_probe_prefixes=3", "value_probe_k=1"])
    with torch.random.fork_rng():
        found = value_quality(NativeEngine(tiny), tiny, CountdownEnv(), PROBLEMS, cfg)
    assert 0.0 <= found["value_probe_reachable_frac"] <= 1.0
    assert found["value_auc_reachable"] is None or 0.0 <= found["value_auc_reachable"] <= 1.0
