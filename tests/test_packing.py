"""Packed rows (algorithms/packing.py): the trie layout by hand, then "packed equals per-row" with the
tiny model: log-probs, values, entropy, the reference's log-probs, the loss (token-mean) and the
gradients, within 1e-5 in float32, also when the trie splits into several sequences; and one whole
`learn` step, packed and not, leaving the same weights at fewer computed positions."""

import contextlib
import dataclasses

import pytest
import torch

from treedistill.algorithms.batch import Batch, pad_rows
from treedistill.algorithms.losses import total_loss
from treedistill.algorithms.packing import pack_rows
from treedistill.config import TrainConfig
from treedistill.learner import forward, learn, reference_policy, trainable_params
from treedistill.methods import METHODS
from treedistill.metrics import ComputeCounters
from treedistill.rollout.trajectory import Trajectory

TOL = 1e-5


def test_trie_layout_by_hand():
    # rows (0 = padding):  [1 2 3 0]   [1 2 4 5]   [1 6 0 0]
    # trie, depth-first:   1(0) 2(1) 3(2) 4(2) 5(3) 6(1)     (token(depth)); 6 nodes for 9 row tokens
    ids = torch.tensor([[1, 2, 3, 0], [1, 2, 4, 5], [1, 6, 0, 0]])
    mask = (ids > 0).long()
    p = pack_rows(ids, mask, max_tokens=8)
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 5, 6]] and p.tokens == 6
    assert p.position_ids.tolist() == [[0, 1, 2, 2, 3, 1]]
    # node 4 (index 3) sees 1, 2 and itself, not its sibling 3; node 6 (index 5) sees 1 and itself
    assert p.attention[0, 3].tolist() == [True, True, False, True, False, False]
    assert p.attention[0, 5].tolist() == [True, False, False, False, False, True]
    assert p.attention[0, 4].tolist() == [True, True, False, True, True, False]
    assert p.index.tolist() == [[0, 1, 2, 0], [0, 1, 3, 4], [0, 5, 0, 0]]


def test_a_trie_too_large_splits_at_a_subtree_boundary():
    # the same rows in sequences of at most 4 nodes: node 1's subtree (6 nodes) does not fit, nor node
    # 2's with its ancestor (1 + 4); the chunks are then the subtrees of 3, 4 and 6, in depth-first
    # order, each with its ancestors: [1 2 3]; [1 2 4 5] (3 + 2 new > 4: a new sequence, 1 2 repeated);
    # [1 6] (4 + 1 > 4). 3 + 4 + 2 = 9 positions. A fourth row [1 2] ends at node 2, which heads no
    # chunk (its subtree was split): it reads the first sequence holding node 2.
    ids = torch.tensor([[1, 2, 3, 0], [1, 2, 4, 5], [1, 6, 0, 0], [1, 2, 0, 0]])
    p = pack_rows(ids, (ids > 0).long(), max_tokens=4)
    assert p.input_ids.tolist() == [[1, 2, 3, 0], [1, 2, 4, 5], [1, 6, 0, 0]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0, 0]]
    assert p.tokens == 9 and p.index.tolist() == [[0, 1, 2, 0], [4, 5, 6, 7], [8, 9, 0, 0], [0, 1, 0, 0]]
    # a padding node sees only itself
    assert p.attention[0, 3].tolist() == [False, False, False, True]


def test_sequences_are_balanced_to_the_shortest_padded_length():
    # a root with four one-token children, at most 4 nodes a sequence: greedy at 4 gives [1 2 3 4] and
    # [1 5] padded to 4 (8 computed); 2 sequences also fit a budget of 3: [1 2 3] and [1 4 5] (6 computed)
    ids = torch.tensor([[1, 2], [1, 3], [1, 4], [1, 5]])
    p = pack_rows(ids, torch.ones_like(ids), max_tokens=4)
    assert p.input_ids.tolist() == [[1, 2, 3], [1, 4, 5]] and p.tokens == 6
    assert p.index.tolist() == [[0, 1], [0, 2], [3, 4], [3, 5]]


@pytest.fixture(scope="module")
def policy():
    from treedistill.models.load import load_policy

    torch.manual_seed(0)
    return load_policy("tiny", dtype="float32", device="cpu", value_head=True)


def _tree_batch(seed: int = 0) -> Batch:
    """Rows of two toy trees (mcts-tree's layout: prompt + the steps above + the learned step), random
    tokens, random advantages and value targets; 3 steps per node, depth 3."""
    g = torch.Generator().manual_seed(seed)

    def toks(n):
        return torch.randint(0, 256, (n,), generator=g).tolist()

    prompts, completions, logprobs, groups = [], [], [], []
    for group in range(2):
        prompt = toks(12)
        frontier = [[]]
        for level in range(3):
            nxt = []
            for above in frontier:
                for _ in range(2 if level < 2 else 1):
                    step = toks(3 + int(torch.randint(0, 4, (1,), generator=g)))
                    prompts.append(prompt + above)
                    completions.append(step)
                    logprobs.append((-torch.rand(len(step), generator=g)).tolist())
                    groups.append(group)
                    nxt.append(above + step)
            frontier = nxt
    t = pad_rows(prompts, completions, logprobs, pad_id=0)
    B, T = t["input_ids"].shape
    adv = torch.randn(B, 1, generator=g) * t["loss_mask"]
    ret = torch.rand(B, T, generator=g) * t["loss_mask"]
    return Batch(**t, rewards=torch.rand(B, generator=g), advantages=adv, returns=ret,
                 group_ids=torch.tensor(groups))


def _cfg(**kw) -> TrainConfig:
    kw = {"micro_batch_size": 64, **kw}
    return TrainConfig(model="tiny", method="mcts-tree", advantage="tree", value_coef=0.1, kl_coef=0.05, policy_loss="cispo", **kw)


@pytest.mark.parametrize("tight", [False, True])
def test_packed_forward_loss_and_gradients_equal_the_per_row_ones(policy, tight):
    batch = _tree_batch()
    # tight: sequences no longer than the longest row, so the trees split below their first steps and
    # rows ending at a split node read it as an ancestor in another chunk's sequence
    p = pack_rows(batch.input_ids, batch.attention_mask, max_tokens=batch.input_ids.shape[1] if tight else 1024)
    real = batch.attention_mask.bool()
    assert p.tokens < int(real.sum())  # shared prefixes computed once
    assert p.input_ids.shape[0] == (8 if tight else 1)
    cfg = _cfg()
    params = trainable_params(policy)
    with contextlib.ExitStack() as stack:
        ref = reference_policy(policy, stack)
        ref_rows, ref_packed = ref(batch.input_ids, batch.attention_mask), ref(batch.input_ids, batch.attention_mask, p)
    assert torch.allclose(ref_rows[real], ref_packed[real], atol=TOL)
    batch = dataclasses.replace(batch, ref_logprobs=ref_rows, old_values=torch.zeros_like(ref_rows))

    results = []
    for packing in (None, p):
        policy.model.zero_grad(set_to_none=True)
        policy.value_head.zero_grad(set_to_none=True)
        entropy, logprobs, values = forward(policy, batch, packing, entropy=True)
        loss, metrics = total_loss(batch, logprobs, values, cfg, entropy=entropy)
        loss.backward()
        results.append((entropy, logprobs, values, loss, metrics, [q.grad.clone() for q in params]))
    (e0, l0, v0, loss0, m0, g0), (e1, l1, v1, loss1, m1, g1) = results
    for a, b in ((e0, e1), (l0, l1), (v0, v1)):
        assert torch.allclose(a[real], b[real], atol=TOL)
    assert abs(loss0.item() - loss1.item()) < TOL
    assert m0.keys() == m1.keys() and all(abs(m0[k] - m1[k]) < TOL for k in m0)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, atol=TOL)


def _trajectories(batch: Batch) -> list[Trajectory]:
    rows = []
    for b in range(batch.size):
        n, start = int(batch.attention_mask[b].sum()), int(batch.loss_mask[b].argmax())
        rows.append(Trajectory(prompt_ids=batch.input_ids[b, :start].tolist(),
                               completion_ids=batch.input_ids[b, start:n].tolist(),
                               behaviour_logprobs=batch.behaviour_logprobs[b, start:n].tolist(),
                               reward=float(batch.rewards[b]), sparse=0.0, group=int(batch.group_ids[b]),
                               search_tokens=n - start, advantage=float(batch.advantages[b, start])))
    return rows


def test_a_learn_step_packed_equals_per_row_at_fewer_positions(policy):
    trajectories = _trajectories(_tree_batch(seed=1))
    start = {k: v.clone() for k, v in policy.model.state_dict().items()}
    head_start = {k: v.clone() for k, v in policy.value_head.state_dict().items()}
    outcomes = []
    for pack_rows_on in (False, True):
        policy.model.load_state_dict(start)
        policy.value_head.load_state_dict(head_start)
        policy.model.zero_grad(set_to_none=True)  # no gradient left over from another test
        policy.value_head.zero_grad(set_to_none=True)
        cfg = _cfg(pack_rows=pack_rows_on, minibatch_size=1, micro_batch_size=5, lr=1e-3)
        params = trainable_params(policy)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr)
        counters = ComputeCounters(params=policy.num_parameters, head_params=1)
        with contextlib.ExitStack() as stack:
            step = learn(trajectories, policy=policy, reference=reference_policy(policy, stack),
                         advantages=METHODS["mcts-tree"].advantages, optimizer=optimizer, params=params, counters=counters,
                         cfg=cfg, step=1, nonfinite_streak=0)
        outcomes.append((step.updates, counters, [q.detach().clone() for q in params]))
    (u0, c0, w0), (u1, c1, w1) = outcomes
    assert len(u0) == len(u1) == 2  # two trees, one update each
    for a, b in zip(u0, u1):
        assert all(abs(a[k] - b[k]) < TOL for k in ("loss", "policy_loss", "value_loss", "kl", "grad_norm")), (a, b)
    for a, b in zip(w0, w1):
        assert torch.allclose(a, b, atol=TOL)
    assert c1.learn_train_tokens < c0.learn_train_tokens and c1.learn_flops < c0.learn_flops
    assert c1.learn_forward_calls == c0.learn_forward_calls
    policy.model.load_state_dict(start)
    policy.value_head.load_state_dict(head_start)


def test_the_lora_reference_packed_equals_per_row():
    from treedistill.models.load import load_policy

    torch.manual_seed(0)
    lora = load_policy("tiny", dtype="float32", device="cpu", lora={"r": 4, "alpha": 8})
    with torch.no_grad():  # LoRA B starts at zero; move it so that the disabled adapter matters
        for name, q in lora.model.named_parameters():
            if "lora_B" in name:
                q.normal_(0, 0.5)
    batch = _tree_batch(seed=2)
    p = pack_rows(batch.input_ids, batch.attention_mask, max_tokens=1024)
    real = batch.attention_mask.bool()
    with lora.reference() as ref:
        rows, packed = ref(batch.input_ids, batch.attention_mask), ref(batch.input_ids, batch.attention_mask, p)
    assert torch.allclose(rows[real], packed[real], atol=TOL)
