"""The search driven by a real model: a randomly initialised tiny model (byte-level tokenizer, 0.9M
parameters) through the native engine, on Countdown problems. Engine calls are counted by a spy that
forwards to the real engine."""

import pytest
import torch

from treedistill.engine import make_engine
from treedistill.engine.base import Sample
from treedistill.envs import get_env
from treedistill.errors import UsageError
from treedistill.models.load import wrap_policy
from treedistill.models.tiny import build_model, build_tokenizer
from treedistill.rollout import SearchBridge, search_problems
from treedistill.search import ROOT, Candidate, NodeRequest, SearchSettings, search

PROBLEMS = [{"numbers": [3, 7, 9, 12], "target": 24}, {"numbers": [1, 5, 6, 13], "target": 59},
            {"numbers": [2, 2, 8, 11], "target": 30}]


class Spy:
    """Forwards every call to the real engine and records (method, rows, options)."""

    def __init__(self, engine):
        self.engine = engine
        self.calls = []

    @property
    def counters(self):
        return self.engine.counters

    def sample(self, prefixes, n=1, **kw):
        self.calls.append(("sample", len(prefixes), n, tuple(kw.get("stop", ()))))
        return self.engine.sample(prefixes, n, **kw)

    def value(self, prefixes):
        self.calls.append(("value", len(prefixes), 1, ()))
        return self.engine.value(prefixes)

    def logprobs(self, sequences, starts):
        return self.engine.logprobs(sequences, starts)


@pytest.fixture(scope="module")
def policy():
    return wrap_policy(build_model(0), build_tokenizer(), name="tiny-random", device=torch.device("cpu"),
                       dtype=torch.float32, compact_prompt=True)


@pytest.fixture(scope="module")
def env():
    return get_env("countdown")


def run(policy, env, *, engine=None, simulations=12, parallel=4, max_depth=4, step=8, budget=40, seed=0):
    engine = engine or Spy(make_engine(policy, "native"))
    cfg = SearchSettings(simulations=simulations, parallel=parallel, max_depth=max_depth, seed=seed, k_children=3,
                         temperature=0.8, step_max_tokens=step)
    before = engine.counters.generated_tokens
    outs = search_problems(engine, policy, env, PROBLEMS, search=cfg, max_new_tokens=budget, seed=seed)
    return engine, outs, engine.counters.generated_tokens - before


def test_one_batched_expand_and_value_call_per_round(policy, env):
    spy, outs, _ = run(policy, env)
    batch = outs[0].batch
    expands = [c for c in spy.calls if c[0] == "sample" and c[3] == ("</step>",)]
    values = [c for c in spy.calls if c[0] == "value"]
    completions = [c for c in spy.calls if c[0] == "sample" and c[3] == ()]
    # the roots' call, then at most one per round, each with K = 3 samples per prefix
    assert len(expands) == batch.expand_calls <= batch.rounds + 1
    assert len(values) == batch.value_calls <= batch.rounds + 1
    assert len(completions) == batch.completion_calls
    assert all(n == 3 for _, _, n, _ in expands)
    assert expands[0][1] == len(PROBLEMS)  # all roots in one call
    # lock-step: a round's call carries leaves of several trees (more prefixes than one tree's W = 4)
    assert max(rows for _, rows, _, _ in expands) > 4
    assert all(o.tree.stats.simulations == 12 for o in outs)


def test_extracted_trajectory_is_always_finished(policy, env):
    for depth in (1, 4):  # max_depth 1: the search never reaches a terminal through its own steps
        spy, outs, _ = run(policy, env, max_depth=depth)
        eos = set(policy.eos_token_ids)
        for o in outs:
            t = o.trajectory
            assert 0 < len(t.completion_ids) <= 40
            finished = (t.completion_ids[-1] in eos or len(t.completion_ids) == 40
                        or env.is_terminal(o.text))
            assert finished
            assert (o.completion_finish in ("eos", "length")) == (not o.extraction.complete)
        if depth == 1:
            assert any(o.completed_by_policy for o in outs)


def test_search_tokens_mark_the_search_part(policy, env):
    _, outs, _ = run(policy, env, max_depth=1)
    for o in outs:
        t, ex = o.trajectory, o.extraction
        assert t.search_tokens == len(ex.tokens) == ex.search_end
        assert t.completion_ids[:t.search_tokens] == ex.tokens
        assert ex.tokens == tuple(tok for node in ex.nodes[1:] for tok in o.tree.tokens[node])
        if ex.complete:
            assert t.search_tokens == len(t.completion_ids) and o.trajectory.stats["completion_tokens"] == 0
        else:
            assert t.search_tokens < len(t.completion_ids)


def test_behaviour_logprobs_match_a_separate_scoring_pass(policy, env):
    engine = make_engine(policy, "native")
    _, outs, _ = run(policy, env, engine=engine, max_depth=2)
    seqs = [o.trajectory.prompt_ids + o.trajectory.completion_ids for o in outs]
    starts = [len(o.trajectory.prompt_ids) for o in outs]
    scored = engine.logprobs(seqs, starts)
    for o, ref in zip(outs, scored):
        got = o.trajectory.behaviour_logprobs
        assert len(got) == len(o.trajectory.completion_ids) == len(ref)
        assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4


def test_rewards_and_accounting(policy, env):
    spy, outs, delta = run(policy, env)
    # tokens generated per tree add up to the engine's own count
    assert sum(o.generated_tokens for o in outs) == delta == outs[0].batch.engine["generated_tokens"]
    for o in outs:
        assert o.returned_tokens <= o.generated_tokens
        score = env.score(PROBLEMS[o.trajectory.group], o.text)
        assert (o.trajectory.reward, o.trajectory.sparse) == (score.dense, score.sparse)
        if o.extraction.complete:  # the tree's cached reward is the same function of the same text
            assert o.extraction.reward == pytest.approx(score.dense)
        # every node whose completion filled the 40-token budget is terminal
        tree = o.tree
        for v in range(1, len(tree)):
            if len(tree.completion(v)) >= 40:
                assert tree.terminal[v] and len(tree.completion(v)) == 40
        assert o.trajectory.stats["tree_nodes"] == len(tree)
        assert o.trajectory.stats["root_value_head"] == tree.value[ROOT]


def test_same_seed_same_outcome(policy, env):
    _, a, _ = run(policy, env, seed=5)
    _, b, _ = run(policy, env, seed=5)
    assert [o.trajectory.completion_ids for o in a] == [o.trajectory.completion_ids for o in b]
    assert [len(o.tree) for o in a] == [len(o.tree) for o in b]


def _bridge(policy, env, budget=40):
    prompts = [policy.prompt_ids(env.messages(p, compact=True)) for p in PROBLEMS[:1]]
    return SearchBridge(make_engine(policy, "native"), policy, env, PROBLEMS[:1], prompts, k=2,
                        step_max_tokens=8, max_new_tokens=budget), prompts[0]


def _sample(policy, text, finish):
    tokens = tuple(policy.tokenizer.encode(text, add_special_tokens=False))
    return Sample(tokens, (-0.5,) * len(tokens), (-0.25,) * len(tokens), finish)


def test_candidate_terminal_rules(policy, env):
    bridge, prompt = _bridge(policy, env)
    req = NodeRequest(0, 1, tuple(prompt), len(prompt), 1)
    # a step cut at step_max_tokens continues; the step delimiter continues; end-of-sequence ends
    cut = bridge._candidate(req, _sample(policy, "3*7=21 (", "length"))
    assert not cut.terminal and cut.finish == "length"
    assert not bridge._candidate(req, _sample(policy, "<step>3*7</step>", "stop")).terminal
    assert bridge._candidate(req, _sample(policy, "x<|im_end|>", "eos")).terminal
    # a closed answer ends the line before any end token
    closed = bridge._candidate(req, _sample(policy, "<answer>3*7</answer>", "stop"))
    assert closed.terminal and closed.logprob == pytest.approx(-0.25 * len(closed.tokens))
    assert closed.token_logprobs == (-0.25,) * len(closed.tokens)  # raw-policy, not sampling log-probs


def test_candidate_cut_at_the_completion_budget(policy, env):
    bridge, prompt = _bridge(policy, env, budget=12)
    done = tuple(policy.tokenizer.encode("<step>3*7=21", add_special_tokens=False))  # 7 tokens
    req = NodeRequest(0, 3, tuple(prompt) + done, len(prompt), 2)
    c = bridge._candidate(req, _sample(policy, "abcdefgh", "length"))  # 8 tokens, room for 5
    assert len(c.tokens) == 5 and len(c.token_logprobs) == 5 and c.terminal and c.finish == "length"
    assert bridge.generated[0] == 8 and bridge.returned[0] == 5
    assert bridge.reward([req])[0] == -1.0  # no answer: the no-answer reward


def test_context_too_short_is_a_usage_error(policy, env):
    long = {"numbers": [1, 2, 3], "target": 10 ** 600}
    with pytest.raises(UsageError):
        search_problems(make_engine(policy, "native"), policy, env, [long], search=SearchSettings(simulations=1))


def test_token_logprobs_length_is_checked_by_the_search():
    def expand(reqs):
        return [[Candidate((1, 2), -1.0, token_logprobs=(-1.0,))] for _ in reqs]

    with pytest.raises(ValueError, match="token log-probs"):
        search([(5,)], expand, lambda r: [0.0] * len(r), lambda r: [0.0] * len(r), SearchSettings(simulations=1))


class CountingEnv:
    """The Countdown env, counting `score` calls."""

    def __init__(self, env):
        self.env, self.scores = env, 0
        self.name, self.step_end = env.name, env.step_end

    def messages(self, problem, compact=False):
        return self.env.messages(problem, compact=compact)

    def is_terminal(self, completion):
        return self.env.is_terminal(completion)

    def score(self, problem, completion):
        self.scores += 1
        return self.env.score(problem, completion)

    def answer_value(self, problem, completion):
        return self.env.answer_value(problem, completion)


def test_value_head_at_terminal_nodes_never_consults_the_environment(policy, env):
    counting = CountingEnv(env)
    engine = make_engine(policy, "native")
    cfg = SearchSettings(simulations=12, parallel=4, max_depth=4, k_children=3, step_max_tokens=8)
    outs = search_problems(engine, policy, counting, PROBLEMS, search=cfg, max_new_tokens=16, terminal_value="value")
    assert counting.scores == len(PROBLEMS)  # only the final scoring of each returned completion
    terminals = [(o.tree, v) for o in outs for v in range(len(o.tree)) if o.tree.terminal[v]]
    assert terminals  # 16-token budget: depth-2 nodes end there
    got = [tree.value[v] for tree, v in terminals]
    want = engine.value([tree.prompt + tree.completion(v) for tree, v in terminals])
    assert got == pytest.approx(want, abs=1e-5)
    with pytest.raises(UsageError):
        search_problems(engine, policy, env, PROBLEMS, search=cfg, terminal_value="oracle")


def test_legal_terminal_values_use_the_value_head_and_the_inputs_only(policy, env):
    # The problem handed to the bridge has no target: the rule cannot read it.
    problem = {"numbers": [3, 7, 9, 12]}
    prompt = policy.prompt_ids(env.messages({**problem, "target": 24}, compact=True))
    engine = make_engine(policy, "native")
    bridge = SearchBridge(engine, policy, env, [problem], [prompt], k=2, step_max_tokens=8, max_new_tokens=64,
                          terminal_value="legal")
    texts = ["<step>3+7</step><answer>(3+7)*12</answer>",  # legal (wrong or right does not matter)
             "<answer>5*5</answer>",                        # numbers the problem does not give
             "<answer>3+</answer>",                         # does not parse
             "<step>3+7</step>"]                            # no answer
    reqs = [NodeRequest(0, i + 1, tuple(prompt) + tuple(policy.tokenizer.encode(t, add_special_tokens=False)),
                        len(prompt), 1) for i, t in enumerate(texts)]
    got = bridge.reward(reqs)
    head = engine.value([r.prefix for r in reqs])
    assert got[0] == pytest.approx(head[0], abs=1e-6) and got[1:] == [-1.0, -1.0, -1.0]


def test_widening_through_the_bridge_keeps_the_token_account(policy, env):
    engine = Spy(make_engine(policy, "native"))
    cfg = SearchSettings(simulations=24, parallel=4, max_depth=4, widen_c=2.0, k_children=3, step_max_tokens=8)
    before = engine.counters.generated_tokens
    outs = search_problems(engine, policy, env, PROBLEMS, search=cfg, max_new_tokens=40)
    assert sum(o.tree.stats.widenings for o in outs) > 0
    assert sum(o.generated_tokens for o in outs) == engine.counters.generated_tokens - before
    for o in outs:  # the root's first expansion only: K samples of at most 8 tokens
        assert 0 < o.trajectory.stats["root_tokens"] <= 3 * 8
        assert o.tree.sampled[ROOT] == 3 * o.tree.expansions[ROOT]


def test_subtrees_and_repeat_penalty_through_the_bridge(policy, env):
    """Two independent trees per problem with rollout leaves and the repeat penalty: one answer per
    problem from the picked tree, every tree's tokens, nodes and finished answers in its problem's
    account, and the repeats marked by the legal answer values of the lines."""
    engine = Spy(make_engine(policy, "native"))
    cfg = SearchSettings(simulations=9, subtrees=2, parallel=2, max_depth=4, k_children=2, step_max_tokens=8,
                         rollout_lambda=1.0, repeat_penalty=1.0, pick="best")
    before = engine.counters.generated_tokens
    outs = search_problems(engine, policy, env, PROBLEMS, search=cfg, max_new_tokens=40)
    assert len(outs) == len(PROBLEMS)
    assert sum(o.generated_tokens for o in outs) == engine.counters.generated_tokens - before
    expands = [c for c in engine.calls if c[0] == "sample" and c[3] == ("</step>",)]
    assert expands[0][1] == 2 * len(PROBLEMS)  # every root of every subtree in the first call
    bridge = SearchBridge(engine, policy, env, PROBLEMS, [o.trajectory.prompt_ids for o in outs])
    for i, o in enumerate(outs):
        assert len(o.trees) == 2 and o.tree in o.trees and all(t.index == i for t in o.trees)
        assert [t.stats.simulations for t in o.trees] == [5, 4]
        s = o.trajectory.stats
        assert (s["subtrees"], s["simulations"], s["tree_nodes"]) == (2, 9, sum(len(t) for t in o.trees))
        assert s["repeats"] == sum(t.stats.repeats for t in o.trees)
        pooled = [a for t in o.trees for a in bridge.finished_answers(t, None)]
        assert s["finished_answers"] >= len(pooled) and s["distinct_answers"] >= len(set(pooled))
        for t in o.trees:  # a repeat holds a legal answer that an earlier line of its tree holds
            lines = [n for n in range(len(t)) if t.repeat[n]]
            for n in lines:
                line = t.completion(n) + (() if t.terminal[n] else t.rollout[n].tokens)
                assert env.answer_value(PROBLEMS[i], bridge.text(line)) in t.answers
