"""VLLMEngine (engine/vllm.py) against the native engine and the learner on the embedded tiny model:
greedy outputs equal, behaviour log-probs equal `token_logprobs` of the policy, seeded sampling
reproducible, the prefix cache hit on a repeated prefix, new weights pushed without a restart.

Run where vLLM is installed (`make test-vllm`); skipped elsewhere. vLLM starts in ~40-130 s on this
machine's CPU, so one engine serves the module."""

from importlib.util import find_spec

import pytest

from treedistill.errors import UsageError

pytestmark = pytest.mark.vllm
HAS_VLLM = find_spec("vllm") is not None
TOL = 1e-4  # float32 on both sides; vLLM's CPU attention sums in another order (measured: <= 4e-6)


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed")
def test_without_vllm_the_engine_is_refused_with_how_to_install():
    from treedistill.engine import make_engine
    from treedistill.models.load import load_policy

    with pytest.raises(UsageError, match=r"treedistill\[vllm\]"):
        make_engine(load_policy("tiny", device="cpu", value_head=False), "vllm")


@pytest.fixture(scope="module")
def setup():
    pytest.importorskip("vllm")
    from treedistill.datasets import load_split
    from treedistill.engine import make_engine
    from treedistill.envs import get_env
    from treedistill.models.load import load_policy

    policy = load_policy("tiny", device="cpu", dtype="float32", value_head=True)
    env = get_env("countdown")
    prompts = [policy.prompt_ids(env.messages(p, compact=True)) for p in load_split("countdown", "test")[:6]]
    engine = make_engine(policy, "vllm")
    yield policy, engine, make_engine(policy, "native"), prompts


@pytest.mark.parametrize("stop", [("</step>",), ("=",), ()])
def test_greedy_equals_native(setup, stop):
    """One-token stop string (stop id), a multi-token-free text stop matched on the text, and none."""
    policy, engine, native, prompts = setup
    got = engine.sample(prompts, 1, max_new_tokens=48, temperature=0, stop=stop)
    want = native.sample(prompts, 1, max_new_tokens=48, temperature=0, stop=stop)
    for g, w in zip(got, want):
        assert g[0].tokens == w[0].tokens
        assert g[0].finish == w[0].finish
        assert g[0].logprobs == (0.0,) * len(g[0].tokens)
        assert max(abs(a - b) for a, b in zip(g[0].policy_logprobs, w[0].policy_logprobs)) < TOL


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.9)])
def test_sampled_logprobs_equal_the_learners(setup, temperature, top_p):
    import torch
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    from treedistill.algorithms.losses import token_logprobs

    policy, engine, native, prompts = setup
    out = engine.sample(prompts[:3], 4, max_new_tokens=48, temperature=temperature, top_p=top_p,
                        stop=("</step>",), seed=7)
    for prompt, row in zip(prompts, out):
        assert len(row) == 4
        for s in row:
            ids = torch.tensor([prompt + list(s.tokens)])
            with torch.no_grad():
                logits, _ = policy.forward(ids, torch.ones_like(ids))
            learner = token_logprobs(logits, ids)[0, len(prompt):].tolist()  # [T]
            assert max(abs(a - b) for a, b in zip(s.policy_logprobs, learner)) < TOL
            if temperature == 1.0 and top_p == 1.0:
                assert s.logprobs == s.policy_logprobs
            else:  # the sampling distribution, as HF's warpers make it
                rows = logits[0, len(prompt) - 1:-1]  # [T, V]: the logits that chose each sampled token
                warped = TopPLogitsWarper(top_p)(ids, TemperatureLogitsWarper(temperature)(ids, rows))
                want = torch.log_softmax(warped, -1).gather(1, ids[0, len(prompt):, None])[:, 0].tolist()
                assert max(abs(a - b) for a, b in zip(s.logprobs, want)) < TOL
            assert s.finish in ("stop", "eos", "length")
            if s.finish == "stop":
                assert policy.decode(s.tokens).endswith("</step>")


def test_seeded_sampling_is_reproducible_and_samples_differ(setup):
    _, engine, _, prompts = setup
    a = engine.sample(prompts[:2], 8, max_new_tokens=32, temperature=1.0, seed=3)
    b = engine.sample(prompts[:2], 8, max_new_tokens=32, temperature=1.0, seed=3)
    assert a == b
    assert len({s.tokens for s in a[0]}) > 1


def test_value_and_logprobs_are_the_policys_in_torch(setup):
    _, engine, native, prompts = setup
    assert engine.value(prompts) == pytest.approx(native.value(prompts), abs=1e-6)
    starts = [len(p) // 2 for p in prompts]
    for g, w in zip(engine.logprobs(prompts, starts), native.logprobs(prompts, starts)):
        assert g == pytest.approx(w, abs=1e-6)


def test_prefix_cache_serves_a_repeated_prefix_and_counters_add_up(setup):
    _, engine, _, prompts = setup
    prefix = prompts[0] * 2  # >= two 32-token blocks
    engine.clear_cache()
    before = engine.counters.snapshot()
    engine.sample([prefix], 2, max_new_tokens=8, temperature=1.0, seed=1)
    mid = engine.counters.snapshot()
    out = engine.sample([prefix], 2, max_new_tokens=8, temperature=1.0, seed=2)
    after = engine.counters.snapshot()
    assert after["cached_prompt_tokens"] - mid["cached_prompt_tokens"] >= 32
    assert after["generated_tokens"] - mid["generated_tokens"] == sum(len(s.tokens) for s in out[0])
    assert after["forward_calls"] > mid["forward_calls"] > before["forward_calls"]


def test_new_weights_are_pushed_into_the_running_engine(setup):
    import torch

    policy, engine, native, prompts = setup
    saved = {k: v.clone() for k, v in policy.model.state_dict().items()}
    pushes = len(engine.push_seconds)
    try:
        old = engine.sample(prompts, 1, max_new_tokens=32, temperature=0)
        with torch.no_grad():  # what an optimizer step does: the parameters change in place
            for p in policy.model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        got = engine.sample(prompts, 1, max_new_tokens=32, temperature=0)
        want = native.sample(prompts, 1, max_new_tokens=32, temperature=0)
        assert len(engine.push_seconds) == pushes + 1
        assert [g[0].tokens for g in got] == [w[0].tokens for w in want]
        assert [g[0].tokens for g in got] != [o[0].tokens for o in old]
        for g, w in zip(got, want):
            assert max(abs(a - b) for a, b in zip(g[0].policy_logprobs, w[0].policy_logprobs)) < TOL
    finally:
        policy.model.load_state_dict(saved)
