"""NativeEngine against transformers: greedy and seeded sampling equal HF generate, log-probs equal a
full forward pass, the prefix cache changes no output, counters add up. Random Qwen2 weights, CPU."""

from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from treedistill.engine.native import NativeEngine
from treedistill.errors import UsageError
from treedistill.models import tiny
from treedistill.models.load import load_policy
from treedistill.models.value_head import ValueHead

TOK = tiny.build_tokenizer()
EOS = TOK.convert_tokens_to_ids(tiny.EOS_TOKEN)
STEP_END = TOK.convert_tokens_to_ids("</step>")


def _policy(seed=0, eos=(EOS,)):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512)
    model = Qwen2ForCausalLM(cfg).eval()
    return SimpleNamespace(model=model, tokenizer=TOK, value_head=ValueHead(64).eval(), eos_token_ids=list(eos),
                           device=torch.device("cpu"))


def _prefixes(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def _hf_generate(model, prefixes, n=1, **opts):
    """HF generate on left-padded prefixes; returns each row's new tokens (padding after eos removed)."""
    width = max(map(len, prefixes))
    pad = TOK.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prefixes])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prefixes])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, pad_token_id=pad, num_return_sequences=n, **opts)
    return [row[width:].tolist() for row in out]


def _cut_after_eos(tokens, eos):
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_greedy_equals_hf_generate_on_ragged_batch(decode):
    pol = _policy()
    prefixes = _prefixes([3, 11, 7, 20])
    ours = NativeEngine(pol, cache_tokens=0, decode=decode).sample(prefixes, max_new_tokens=24, temperature=0)
    ref = _hf_generate(pol.model, prefixes, max_new_tokens=24, do_sample=False, eos_token_id=[EOS])
    for got, want in zip(ours, ref):
        assert list(got[0].tokens) == _cut_after_eos(want, [EOS])
        assert got[0].finish == ("eos" if got[0].tokens[-1] == EOS else "length")


def test_greedy_equals_hf_generate_on_tiny_architecture():
    torch.manual_seed(0)
    model = tiny.build_model(seed=3).eval()
    pol = SimpleNamespace(model=model, tokenizer=TOK, value_head=None, eos_token_ids=[EOS], device=torch.device("cpu"))
    prefixes = [TOK.encode("<|im_start|>user\n13 9 5 7 -> 72<|im_end|>\n"), TOK.encode("<step>13-9=4 (4 5 7)</step>")]
    ours = NativeEngine(pol).sample(prefixes, max_new_tokens=30, temperature=0)
    ref = _hf_generate(model, prefixes, max_new_tokens=30, do_sample=False, eos_token_id=[EOS])
    assert [list(s[0].tokens) for s in ours] == [_cut_after_eos(r, [EOS]) for r in ref]


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_greedy_equals_hf_generate_on_random_qwen25_tiny_preset(decode):
    pol = load_policy("random-qwen2.5-tiny", device="cpu", value_head=False)
    prefixes = [pol.tokenizer.encode("Hello world, this is"), pol.tokenizer.encode("2 + 2 =")]
    eos = pol.eos_token_ids
    ours = NativeEngine(pol, decode=decode).sample(prefixes, max_new_tokens=12, temperature=0)
    pad_side = [p for p in prefixes]
    width = max(map(len, pad_side))
    pad = pol.tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prefixes])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prefixes])[:, None]).long()
    with torch.no_grad():
        ref = pol.model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=pad,
                                 eos_token_id=eos)
    assert [list(s[0].tokens) for s in ours] == [_cut_after_eos(r[width:].tolist(), eos) for r in ref]


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_seeded_sampling_equals_hf_generate_while_rows_are_the_same(decode):
    # With HF's draw (multinomial) and no row leaving the batch (eos off), a seeded run reproduces
    # generate token for token. Once rows finish at different times the batches differ and so do the
    # random streams: equal in distribution only (the default inverse-CDF draw: another stream).
    pol = _policy(eos=())
    prefixes = _prefixes([9, 4])
    eng = NativeEngine(pol, cache_tokens=0, sampler="multinomial", decode=decode)
    ours = eng.sample(prefixes, 3, max_new_tokens=16, temperature=0.8, top_p=0.9, seed=123)
    torch.manual_seed(123)
    ref = _hf_generate(pol.model, prefixes, n=3, max_new_tokens=16, min_new_tokens=16, do_sample=True,
                       temperature=0.8, top_p=0.9, top_k=0)
    assert [list(s.tokens) for row in ours for s in row] == ref


def test_same_seed_same_samples_and_n_samples_share_one_prefill():
    pol = _policy(eos=())
    eng = NativeEngine(pol, cache_tokens=0)
    a = eng.sample(_prefixes([10]), 4, max_new_tokens=8, seed=7)
    assert eng.counters.prompt_tokens == 10  # one prefill for the 4 samples
    assert eng.counters.generated_tokens == 32
    b = eng.sample(_prefixes([10]), 4, max_new_tokens=8, seed=7)
    assert a == b
    assert len({s.tokens for s in a[0]}) > 1  # the 4 rows are not copies of each other


def test_logprobs_match_a_full_forward_pass():
    pol = _policy(eos=())
    eng = NativeEngine(pol)
    samples = eng.sample(_prefixes([6, 13]), 2, max_new_tokens=10, temperature=0.7, top_p=0.8, seed=1)
    prefixes = _prefixes([6, 13])
    with torch.no_grad():
        for prefix, row in zip(prefixes, samples):
            for s in row:
                seq = prefix + list(s.tokens)
                logits = pol.model(torch.tensor([seq])).logits[0].float()  # [T, V]
                raw = torch.log_softmax(logits, -1)[len(prefix) - 1 : -1].gather(1, torch.tensor(s.tokens)[:, None])
                assert torch.allclose(torch.tensor(s.policy_logprobs), raw[:, 0], atol=1e-4)
                # the sampling distribution: temperature then top-p renormalised -> log-probs >= raw / T shifted
                assert all(lp <= 1e-6 for lp in s.logprobs)
                # engine.logprobs (cached prefix + suffix) agrees with the forward pass too
                again = eng.logprobs([seq], [len(prefix)])[0]
                assert torch.allclose(torch.tensor(again), raw[:, 0], atol=1e-4)


def test_value_matches_value_head_on_full_forward_and_uses_cache():
    pol = _policy()
    eng = NativeEngine(pol)
    prefixes = _prefixes([5, 12, 8])
    first = eng.value(prefixes)
    with torch.no_grad():
        for p, v in zip(prefixes, first):
            hidden = pol.model(torch.tensor([p]), output_hidden_states=True).hidden_states[-1][0, -1]
            assert abs(float(pol.value_head(hidden)) - v) < 1e-5
    before = eng.counters.snapshot()
    again = eng.value(prefixes)
    assert again == pytest.approx(first, abs=1e-5)
    # second time only the last token of each prefix is recomputed
    assert eng.counters.scored_tokens - before["scored_tokens"] == 3
    assert eng.counters.cached_prompt_tokens - before["cached_prompt_tokens"] == 4 + 11 + 7


def _grow_tree(eng, root, depth=3, k=3):
    """Grow a path of a tree greedily: at each depth K children (forced first tokens 0..K-1), then
    continue from the first child. Returns every generated step."""
    out, prefix = [], list(root)
    for _ in range(depth):
        kids = [prefix + [i] for i in range(k)]
        steps = [row[0].tokens for row in eng.sample(kids, max_new_tokens=6, temperature=0, stop=("</step>",))]
        out.append(steps)
        prefix = kids[0] + list(steps[0])
    return out


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_prefix_cache_changes_no_output_even_under_eviction(decode):
    pol = _policy(eos=())
    root = _prefixes([30])[0]
    plain = NativeEngine(pol, cache_tokens=0, decode=decode)
    cached = NativeEngine(pol, decode=decode)
    tight = NativeEngine(pol, cache_tokens=20, decode=decode)  # smaller than the root prompt: evicts constantly
    want = _grow_tree(plain, root)
    assert _grow_tree(cached, root) == want
    assert _grow_tree(tight, root) == want
    c = cached.counters
    assert c.cached_prompt_tokens > c.prompt_tokens  # children re-use their parent's keys/values
    assert tight.cache.size <= 20 and tight.cache.stats.evicted_tokens > 0
    # Counters add up: every prefix token is either recomputed or served, in every engine.
    total = plain.counters.prompt_tokens
    assert c.prompt_tokens + c.cached_prompt_tokens == total
    assert tight.counters.prompt_tokens + tight.counters.cached_prompt_tokens == total
    assert c.generated_tokens == plain.counters.generated_tokens


def _grow_sampled_tree(eng, root, depth=3, k=3):
    """`_grow_tree` at temperature 0.9 with 2 seeded samples per child: every sample's tokens, sampling
    log-probs and raw-policy log-probs, and the log-probs `logprobs` scores along the path grown."""
    out, prefix = [], list(root)
    for level in range(depth):
        kids = [prefix + [i] for i in range(k)]
        rows = eng.sample(kids, 2, max_new_tokens=6, temperature=0.9, stop=("</step>",), seed=10 + level)
        out.append([(s.tokens, s.logprobs, s.policy_logprobs) for row in rows for s in row])
        prefix = kids[0] + list(rows[0][0].tokens)
    return out, eng.logprobs([prefix], [len(root)])


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_prefix_cache_changes_no_sampled_token_nor_log_prob(decode):
    # A stale or misaligned key/value entry can leave the argmax unchanged while it moves the
    # distribution: seeded samples and both log-probs must match the engine without a cache.
    pol = _policy(eos=())
    root = _prefixes([30])[0]
    (want, want_scored) = _grow_sampled_tree(NativeEngine(pol, cache_tokens=0, decode=decode), root)
    cached, tight = NativeEngine(pol, decode=decode), NativeEngine(pol, cache_tokens=20, decode=decode)
    for engine in (cached, tight):
        got, scored = _grow_sampled_tree(engine, root)
        assert [[s[0] for s in level] for level in got] == [[s[0] for s in level] for level in want]
        for level, ref in zip(got, want):
            for (_, logprobs, policy_logprobs), (_, ref_logprobs, ref_policy) in zip(level, ref):
                assert logprobs == pytest.approx(ref_logprobs, abs=1e-5)
                assert policy_logprobs == pytest.approx(ref_policy, abs=1e-5)
        assert scored[0] == pytest.approx(want_scored[0], abs=1e-5)
    assert cached.counters.cached_prompt_tokens > cached.counters.prompt_tokens  # the cache served most keys/values
    assert tight.cache.stats.evicted_tokens > 0  # and under constant eviction
    assert len({tokens for level in want for tokens, _, _ in level}) > 6  # sampled: not one line repeated


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_expanding_a_child_reuses_all_but_one_token(decode):
    pol = _policy(eos=())
    eng = NativeEngine(pol, decode=decode)
    root = _prefixes([40])[0]
    child = eng.sample([root], 4, max_new_tokens=8)[0]
    before = eng.counters.snapshot()
    eng.sample([root + list(child[2].tokens)], 4, max_new_tokens=8)
    assert eng.counters.prompt_tokens - before["prompt_tokens"] == 1
    assert eng.counters.cached_prompt_tokens - before["cached_prompt_tokens"] == 40 + 8 - 1


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_stop_strings_single_token_and_multi_token_paths(decode):
    pol = _policy(eos=())
    eng = NativeEngine(pol, cache_tokens=0, decode=decode)
    prefixes = _prefixes([5, 9, 14, 3])
    full = eng.sample(prefixes, max_new_tokens=40, temperature=0)
    # For each row, a 2-character ASCII text from the middle of its greedy continuation is the stop
    # string (the decoded-tail path): the stopped sample is the greedy one cut where the text appears.
    checked = 0
    for prefix, row in zip(prefixes, full):
        toks = list(row[0].tokens)
        text = TOK.decode(toks)
        starts = [k for k in range(3, len(text) - 1) if text[k:k + 2].isascii() and text[k:k + 2].isprintable()]
        if not starts:
            continue
        stop = text[starts[0]:starts[0] + 2]
        got = eng.sample([prefix], max_new_tokens=40, temperature=0, stop=(stop,))[0][0]
        assert got.finish == "stop"
        assert stop in TOK.decode(list(got.tokens)) and stop not in TOK.decode(list(got.tokens)[:-1])
        assert list(got.tokens) == toks[: len(got.tokens)]
        checked += 1
    assert checked >= 2
    assert eng._stops(("</step>",)) == ((STEP_END,), ())
    assert eng._stops(("ab",)) == ((), ("ab",))


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_finished_rows_leave_the_batch(decode):
    pol = _policy(eos=())
    prefixes = _prefixes([6, 6, 6])
    full = NativeEngine(pol, cache_tokens=0).sample(prefixes, max_new_tokens=20, temperature=0)
    # make the first row stop after 2 tokens: its id becomes an eos; others must run on unchanged
    stop_id = full[0][0].tokens[1]
    eng = NativeEngine(pol, cache_tokens=0, eos_token_ids=(stop_id,), decode=decode)
    got = eng.sample(prefixes, max_new_tokens=20, temperature=0)
    assert got[0][0].finish == "eos"
    for g, f in zip(got, full):
        assert list(g[0].tokens) == _cut_after_eos(list(f[0].tokens), [stop_id])
    assert eng.counters.generated_tokens == sum(len(g[0].tokens) for g in got)


def test_static_decode_equals_eager_while_rows_finish_and_move_to_smaller_workspaces():
    # 3 prefixes x 11 samples = 33 rows (a 64-row workspace); eos ids that are common at temperature 1
    # end rows at different steps, so live rows move to the 32-, 16-, ... row workspaces on the way.
    pol = _policy(eos=())
    prefixes = _prefixes([4, 17, 9])
    probe = NativeEngine(pol, cache_tokens=0).sample(prefixes, 11, max_new_tokens=30, temperature=1.0, seed=5)
    counts = torch.bincount(torch.tensor([t for row in probe for s in row for t in s.tokens]), minlength=300)
    common = tuple(counts.argsort(descending=True)[:12].tolist())  # ends a row within ~20 tokens
    eager = NativeEngine(pol, eos_token_ids=common, decode="eager")
    static = NativeEngine(pol, eos_token_ids=common, decode="static")
    want = eager.sample(prefixes, 11, max_new_tokens=30, temperature=1.0, seed=9)
    got = static.sample(prefixes, 11, max_new_tokens=30, temperature=1.0, seed=9)
    lengths = sorted(len(s.tokens) for row in got for s in row)
    assert lengths[0] < 10 and lengths[-1] > 20  # rows did finish at different steps
    rows_used = {rows for rows, _ in static._workspaces}
    assert 64 in rows_used and len(rows_used) >= 3  # live rows moved to smaller workspaces
    for a_row, b_row in zip(want, got):
        for a, b in zip(a_row, b_row):
            assert (a.tokens, a.finish) == (b.tokens, b.finish)
            assert a.policy_logprobs == pytest.approx(b.policy_logprobs, abs=1e-5)
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert static.counters.generated_tokens == eager.counters.generated_tokens == sum(lengths)
    # the finished rows' keys/values went to the prefix cache alike: the same tokens are cached
    assert static.cache.size == eager.cache.size


def test_static_workspaces_are_bucketed_reused_and_bounded():
    pol = _policy(eos=())
    eng = NativeEngine(pol, cache_tokens=0, decode="static", workspaces=2)
    eng.sample(_prefixes([10]), 3, max_new_tokens=5, temperature=0)  # 3 rows, 15 columns -> (4, 64)
    eng.sample(_prefixes([12]), 4, max_new_tokens=5, temperature=0)  # same bucket: reused
    assert list(eng._workspaces) == [(4, 64)]
    eng.sample(_prefixes([100]), 1, max_new_tokens=30, temperature=0)  # (1, 256)
    eng.sample(_prefixes([600]), 1, max_new_tokens=4, temperature=0)  # (1, 1024): the oldest is dropped
    assert list(eng._workspaces) == [(1, 256), (1, 1024)]
    with pytest.raises(UsageError, match="decode"):
        NativeEngine(pol, decode="graphs")


def test_bad_input_is_a_usage_error():
    eng = NativeEngine(_policy())
    with pytest.raises(UsageError):
        eng.sample([[]], max_new_tokens=4)
    with pytest.raises(UsageError):
        eng.sample([[1, 2]], max_new_tokens=4, top_p=0)
    with pytest.raises(UsageError):
        eng.sample([[1, 999]], max_new_tokens=4)
    with pytest.raises(UsageError):
        eng.logprobs([[1, 2]], [0])


def test_weight_update_clears_the_cache():
    pol = _policy()
    eng = NativeEngine(pol)
    eng.sample(_prefixes([10]), max_new_tokens=4)
    assert eng.cache.size > 0
    with torch.no_grad():
        pol.model.lm_head.weight.mul_(1.0)
    eng.sample(_prefixes([3]), max_new_tokens=2)
    assert eng.counters.cached_prompt_tokens == 0 and eng.cache.size == 3 + 1


@pytest.mark.slow
def test_bench_commands_print_tables_and_json(capsys):
    import json

    from treedistill.cli import main

    assert main(["bench", "search", "--model", "random-qwen2.5-tiny", "--prompt-len", "16", "--breadth", "2",
                 "--depth", "2", "--simulations", "2", "--step-tokens", "4", "--device", "cpu", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["speedup"] > 0 and set(result["engines"]) == {"native_cache", "native_no_cache", "hf_generate"}
    assert result["engines"]["native_cache"]["prompt_tokens_per_generated_token"] < \
        result["engines"]["native_no_cache"]["prompt_tokens_per_generated_token"]
    assert main(["bench", "generate", "--model", "random-qwen2.5-tiny", "--batch", "2", "--prompt-len", "8",
                 "--new-tokens", "4", "--repeats", "1", "--no-static", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["engines"]["native"]["tokens_per_s"] > 0 and "hf_dynamic" in result["engines"]


def test_a_prefix_whose_samples_exceed_max_batch_is_spread_over_chunks():
    pol = _policy(eos=())
    eng = NativeEngine(pol, cache_tokens=0, max_batch=4)
    sizes = []
    chunk_fn = eng._sample_chunk

    def recording(chunk, *args):
        sizes.append(sum(len(rows) for _, rows in chunk))
        return chunk_fn(chunk, *args)

    eng._sample_chunk = recording
    out = eng.sample(_prefixes([10, 6]), 6, max_new_tokens=5, seed=3)
    assert sizes == [4, 2, 4, 2]  # never more than max_batch rows at once
    assert [len(row) for row in out] == [6, 6] and all(len(s.tokens) == 5 for row in out for s in row)
    assert eng.counters.generated_tokens == 60
    # Within max_batch nothing changes: two prefixes x 2 samples are one chunk.
    sizes.clear()
    eng.sample(_prefixes([10, 6]), 2, max_new_tokens=5, seed=3)
    assert sizes == [4]
