"""The static decode path with CUDA graphs against the eager loop and HF generate, on CUDA.

Skipped without CUDA (CI). Runs as a script too (`python tests/test_engine_gpu.py`), for a GPU machine
that has torch and transformers but not pytest.
"""

import pytest
import torch

from treedistill.engine.native import NativeEngine

pytestmark = pytest.mark.gpu


def _policy(dtype=torch.float32):
    from treedistill.models.load import load_policy

    return load_policy("random-qwen2.5-tiny", device="cuda", dtype=dtype, value_head=True)


def random_prompts(policy, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def test_graph_decode_equals_eager_and_hf_greedy():
    pol = _policy()
    prompts = random_prompts(pol, [5, 40, 17, 23])
    graph = NativeEngine(pol, cache_tokens=0)
    assert graph.use_graphs
    eager = NativeEngine(pol, cache_tokens=0, decode="eager")
    got = graph.sample(prompts, 2, max_new_tokens=24, temperature=0)
    want = eager.sample(prompts, 2, max_new_tokens=24, temperature=0)
    assert [[s.tokens for s in row] for row in got] == [[s.tokens for s in row] for row in want]
    width = max(map(len, prompts))
    pad = pol.tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device="cuda")
    mask = (torch.arange(width, device="cuda")[None] >= torch.tensor([width - len(p) for p in prompts],
                                                                     device="cuda")[:, None]).long()
    with torch.no_grad():
        ref = pol.model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=pad,
                                 eos_token_id=pol.eos_token_ids)
    for row, r in zip(got, ref):
        tail = r[width:].tolist()
        cut = next((i + 1 for i, t in enumerate(tail) if t in pol.eos_token_ids), len(tail))
        assert list(row[0].tokens) == tail[:cut]


def test_graph_decode_rows_ending_apart_and_tree_cache_equal_eager():
    # Greedy (a 151,936-entry vocabulary of random weights is nearly flat: a sampled draw flips on
    # float-level differences between attention kernels, so sampled runs agree in distribution only).
    pol = _policy()
    prompts = random_prompts(pol, [30, 9, 60, 11, 3, 47, 25, 8, 19])
    eos = tuple(range(40, 90))  # common byte ids: rows end at different steps and change workspaces
    graph = NativeEngine(pol, eos_token_ids=eos)
    eager = NativeEngine(pol, eos_token_ids=eos, decode="eager")
    got = graph.sample(prompts, 1, max_new_tokens=40, temperature=0)
    want = eager.sample(prompts, 1, max_new_tokens=40, temperature=0)
    assert [(r[0].tokens, r[0].finish) for r in got] == [(r[0].tokens, r[0].finish) for r in want]
    child = [prompts[0] + list(got[0][0].tokens)]
    before = graph.counters.snapshot()
    graph.sample(child, 4, max_new_tokens=8, temperature=0)
    assert graph.counters.prompt_tokens - before["prompt_tokens"] == 1  # the child's prefix came from the cache
    # rows moved between workspaces; a workspace gets its graph at its first step (one that every row
    # left before stepping, e.g. all rows ending at their first token, has none)
    shapes = {key: ws.graph is not None for key, ws in graph._workspaces.items()}
    assert len(shapes) >= 2 and any(shapes.values()), shapes


def test_graph_decode_sampled_logprobs_match_a_separate_scoring_pass():
    pol = _policy()
    prompts = random_prompts(pol, [30, 9, 60])
    graph = NativeEngine(pol, eos_token_ids=tuple(range(40, 60)))
    rows = graph.sample(prompts, 6, max_new_tokens=32, temperature=0.8, seed=3)
    scorer = NativeEngine(pol, cache_tokens=0, decode="eager")
    for prompt, row in zip(prompts, rows):
        seqs = [prompt + list(s.tokens) for s in row]
        scored = scorer.logprobs(seqs, [len(prompt)] * len(seqs))
        for s, ref in zip(row, scored):
            assert torch.allclose(torch.tensor(s.policy_logprobs), torch.tensor(ref), atol=1e-3)


if __name__ == "__main__":
    for name, fn in list(globals().items()):
        if name.startswith("test_"):
            fn()
            print(f"{name}: passed")
