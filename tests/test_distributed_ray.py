"""Training over Ray: the ledger's bookkeeping (pure, by hand and by random events), weights loaded
into a generator, refusals before compute, and real runs on a local 2-CPU Ray cluster (2 generator
actors + the driver learner; a generator killed mid-run; an FSDP learner over 2 CPU ranks)."""

import dataclasses
import json
import random

import pytest
import ray
import torch

from treedistill.checkpoint import latest_checkpoint, load_checkpoint
from treedistill.cli import main
from treedistill.config import load_config
from treedistill.distributed import DistributedSettings, Finished, Ledger, load_weights
from treedistill.metrics import read_metrics
from treedistill.models.presets import TINY_FOLDER
from treedistill.train import train

SMALL = [
    "train_size=64", "test_size=8", "eval_problems=4", "eval_k=2", "eval_samples_logged=2",
    "max_new_tokens=24", "problems_per_step=2", "group_size=2",
    "search.simulations=4", "search.parallel=2", "search.problems_at_once=2", "search.k_children=2",
    "search.step_max_tokens=8", "search.max_depth=3",
]
DISTRIBUTED_KEYS = {"weight_version", "dropped_stale", "requeued_problems", "generator_restarts",
                    "problems_dispatched", "problems_trained", "problems_in_flight", "problems_buffered"}


def _done(n, version=0, first=0):
    return [Finished(p, ("traj",), version) for p in range(first, first + n)]


# ---------------------------------------------------------------------------------------------------
# The ledger, by hand


def test_distributed_ledger_throttle_by_hand():
    # P = 4 problems per step, max_staleness 1: up to (1 - lag + 1) * 4 problems outstanding, and a
    # task never crosses a step boundary (4 - outstanding % 4)
    ledger = Ledger(problems_per_step=4, max_staleness=1)
    assert ledger.room(learner_version=0, published_version=0) == 4  # min(8 - 0, 4 - 0)
    a = ledger.dispatch(3, version=0)
    assert a.positions == (0, 1, 2)
    assert ledger.room(learner_version=0, published_version=0) == 1  # min(8 - 3, 4 - 3)
    b = ledger.dispatch(1, version=0)
    assert ledger.room(learner_version=0, published_version=0) == 4  # min(8 - 4, 4 - 0)
    c = ledger.dispatch(4, version=0)
    assert ledger.room(learner_version=0, published_version=0) == 0  # 8 outstanding: two steps' worth
    ledger.finish(a.task_id, _done(3))
    ledger.finish(b.task_id, _done(1, first=3))
    assert [f.position for f in ledger.take(4)] == [0, 1, 2, 3]
    # the batch of step 1 is taken but not learned: the next batch updates version 1 while the
    # generators still hold version 0 (lag 1) -> (1 - 1 + 1) * 4 - 4 outstanding = 0
    assert ledger.room(learner_version=1, published_version=0) == 0
    assert ledger.room(learner_version=1, published_version=1) == 4  # published: min(8 - 4, 4 - 0)
    ledger.finish(c.task_id, _done(4, first=4))
    ledger.check()
    assert (ledger.dispatched, ledger.trained, len(ledger.buffered)) == (8, 4, 4)

    # max_staleness 0 is the synchronous loop: nothing is dispatched until the new weights are out
    sync = Ledger(problems_per_step=2, max_staleness=0)
    assert sync.room(learner_version=0, published_version=0) == 2
    sync.finish(sync.dispatch(2, version=0).task_id, _done(2))
    sync.take(2)
    assert sync.room(learner_version=1, published_version=0) == 0
    assert sync.room(learner_version=1, published_version=1) == 2


def test_distributed_ledger_requeues_lost_tasks_first_and_drops_stale_results():
    ledger = Ledger(problems_per_step=2, max_staleness=1)
    lost = ledger.dispatch(2, version=0)
    kept = ledger.dispatch(2, version=0)
    assert ledger.lose(lost.task_id) == 2
    again = ledger.dispatch(3, version=1)
    assert again.positions == (0, 1, 4)  # the lost problems first, in order, then the stream
    ledger.finish(kept.task_id, _done(2, version=0, first=2))
    ledger.finish(again.task_id, [Finished(p, ("traj",), 1) for p in again.positions])
    # the learner is at version 2: results of version 0 are 2 versions stale, more than 1
    assert ledger.drop_stale(2) == 2
    assert sorted(f.position for f in ledger.take(2)) == [0, 1]
    ledger.check()
    assert ledger.counts() == {"dispatched": 7, "trained": 2, "dropped_stale": 2, "requeued": 2}
    assert ledger.pending() == [4] and list(ledger.waiting) == []


def test_distributed_ledger_takes_the_oldest_version_first():
    ledger = Ledger(problems_per_step=2, max_staleness=2)
    new = ledger.dispatch(2, version=1)
    old = ledger.dispatch(2, version=0)
    ledger.finish(new.task_id, _done(2, version=1))
    ledger.finish(old.task_id, _done(2, version=0, first=2))
    assert [f.position for f in ledger.take(2)] == [2, 3]  # version 0 before it expires


def test_distributed_ledger_random_events_never_lose_a_problem():
    """Random dispatch / finish / lose / drop / take / checkpoint-and-resume events: after each, every
    stream position is in exactly one state, and both identities of ledger.py hold."""
    rng = random.Random(0)
    for trial in range(30):
        P, S = rng.randint(1, 4), rng.randint(0, 2)
        ledger = Ledger(problems_per_step=P, max_staleness=S)
        learner = published = 0
        for _ in range(200):
            event = rng.random()
            room = ledger.room(learner_version=learner, published_version=published)
            if event < 0.35 and room:
                ledger.dispatch(rng.randint(1, room), version=published)
            elif event < 0.6 and ledger.in_flight:
                task = rng.choice(list(ledger.in_flight.values()))
                ledger.finish(task.task_id, [Finished(p, ("traj",), task.version) for p in task.positions])
            elif event < 0.68 and ledger.in_flight:
                ledger.lose(rng.choice(list(ledger.in_flight)))
            elif event < 0.9:
                ledger.drop_stale(learner)
                if len(ledger.buffered) >= P:
                    ledger.take(P)
                    learner += 1
                    published = learner if rng.random() < 0.7 else max(published, learner - S)
            elif event < 0.95:
                ledger = Ledger.resume(ledger.state(), problems_per_step=P, max_staleness=S)
            ledger.check()
            states = ([*ledger.waiting] + ledger.pending())
            assert len(states) == len(set(states)), (trial, "a position in two states")
        assert ledger.position == ledger.trained + ledger.dropped_stale + len(states)


# ---------------------------------------------------------------------------------------------------
# Weights into a generator; refusals


def test_distributed_generator_loading_new_weights_never_reuses_stale_keys_values():
    from treedistill.engine.native import NativeEngine
    from treedistill.learner import trainable_state
    from treedistill.models.load import wrap_policy
    from treedistill.models.tiny import build_model, build_tokenizer

    def policy(seed):
        return wrap_policy(build_model(seed, num_hidden_layers=1, hidden_size=32, intermediate_size=64),
                           build_tokenizer(), name="t", device=torch.device("cpu"), dtype=torch.float32)

    generator, learner = policy(0), policy(1)
    engine = NativeEngine(generator)
    sequence = list(range(40, 70))
    before = engine.logprobs([sequence], [10])  # fills the prefix cache with the old weights' keys/values
    load_weights(generator, engine, trainable_state(learner))
    after = engine.logprobs([sequence], [10])
    assert after != before
    assert after == NativeEngine(learner).logprobs([sequence], [10])  # as a fresh engine on the new weights
    assert all(torch.equal(a, b) for a, b in zip(generator.value_head.state_dict().values(),
                                                 learner.value_head.state_dict().values()))


@pytest.mark.parametrize("args, message", [
    (["--generators", "3"], "--generators needs --distributed ray"),
    (["--distributed", "ray", "--generators", "0"], "generators must be >= 1"),
    (["--distributed", "ray", "--sync-every", "3", "--max-staleness", "1"], "max_staleness=1 must be >= sync_every - 1"),
])
def test_distributed_settings_are_refused_before_any_compute(args, message, tmp_path, capsys):
    run, connected = tmp_path / "run", ray.is_initialized()
    assert main(["train", "--preset", "countdown-tiny-grpo", *args, "--run-dir", str(run)]) == 2
    assert message in capsys.readouterr().err
    assert not run.exists() and ray.is_initialized() == connected  # no cluster started, no folder written


# ---------------------------------------------------------------------------------------------------
# Real runs on a local Ray cluster


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny model when its checkpoint is there, else a random model of its architecture."""
    if (TINY_FOLDER / "config.json").is_file():
        return "tiny"
    from treedistill.models.load import wrap_policy
    from treedistill.models.tiny import build_model, build_tokenizer

    folder = tmp_path_factory.mktemp("tiny-random")
    policy = wrap_policy(build_model(0), build_tokenizer(), name="tiny-random", device=torch.device("cpu"),
                         dtype=torch.float32, compact_prompt=True)
    policy.save(folder)
    return str(folder)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _config(preset, model, *more):
    return load_config(preset=preset, overrides=[*SMALL, f"model={model}", *more])


def _lines(run_dir, kind):
    return [r for r in read_metrics(run_dir) if r["kind"] == kind]


def _check_counts(record):
    """Every dispatch is accounted for on every logged line."""
    assert record["problems_dispatched"] == (record["problems_trained"] + record["dropped_stale"]
                                             + record["requeued_problems"] + record["problems_in_flight"]
                                             + record["problems_buffered"]), record


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model, cluster):
    """One one-process run (2 steps) and one distributed run (2 generators, 3 steps) of the same config,
    in which generator 0's process exits after computing its first rollout, before returning it."""
    cfg = _config("countdown-tiny-mcts", model, "steps=2", "checkpoint_every=1", "eval_every=2")
    single, spread = tmp_path_factory.mktemp("single") / "run", tmp_path_factory.mktemp("ray") / "run"
    train(cfg, single, progress=False)
    summary = train(dataclasses.replace(cfg, steps=3), spread, distributed=DistributedSettings(generators=2),
                    fault=(0, 1), progress=False)
    return cfg, single, spread, summary


@pytest.mark.slow
def test_ray_two_generators_log_the_one_process_metrics(runs):
    cfg, single, spread, summary = runs
    for kind in ("train", "eval"):
        want = set().union(*(r.keys() for r in _lines(single, kind)))
        got = set().union(*(r.keys() for r in _lines(spread, kind)))
        assert got - want == DISTRIBUTED_KEYS | ({"staleness_mean", "staleness_max"} if kind == "train" else set())
        assert want <= got
    assert [r["step"] for r in _lines(spread, "train")] == [1, 2, 3]
    assert [r["step"] for r in _lines(spread, "eval")] == [0, 2, 3]
    for r in _lines(spread, "train"):
        assert 0 <= r["staleness_max"] <= 1  # max_staleness 1: the next batch is generated during learning
        assert r["weight_version"] == r["step"]  # published after every step
    # the evaluation before RL runs on a generator with the learner's published weights: the same
    # function, weights and seed as the one-process loop give the same numbers
    first = {k: v for k, v in _lines(single, "eval")[0].items() if not k.endswith("_s")}
    assert {k: v for k, v in _lines(spread, "eval")[0].items() if k in first} == first
    samples = [json.loads(line) for line in (spread / "samples.jsonl").read_text().splitlines()]
    assert {s["kind"] for s in samples} == {"eval", "train"}
    assert "mean@2" in (spread / "report.md").read_text()


@pytest.mark.slow
def test_distributed_generator_killed_mid_run_is_restarted_and_no_problem_is_lost(runs, model, capsys):
    cfg, single, spread, summary = runs
    assert summary["stop_reason"] == "all 3 steps done"
    assert summary["requeued_problems"] >= 1 and summary["generator_restarts"] == 1
    lines = _lines(spread, "train")
    for r in [*lines, *_lines(spread, "eval")]:
        _check_counts(r)
    assert lines[-1]["problems_trained"] == 3 * cfg.problems_per_step
    assert all(r["problems_seen"] == r["problems_trained"] + r["dropped_stale"] + r["problems_in_flight"]
               + r["problems_buffered"] for r in lines)  # no waiting problem left at a step's end

    # --resume (CLI): the learner's checkpoint holds the run, its unresolved problems are dispatched first
    pending = load_checkpoint(latest_checkpoint(spread))["loop"]["ledger"]["pending"]
    flags = [flag for item in [*SMALL, f"model={model}", "checkpoint_every=1", "eval_every=2"]
             for flag in ("--set", item)]
    code = main(["train", "--preset", "countdown-tiny-mcts", "--steps", "4", *flags, "--run-dir", str(spread),
                 "--resume", "auto", "--distributed", "ray", "--generators", "2", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert json.loads(out.out.strip().splitlines()[-1])["steps"] == 4
    last = _lines(spread, "train")[-1]
    _check_counts(last)
    assert last["step"] == 4 and last["problems_trained"] == 4 * cfg.problems_per_step
    assert last["requeued_problems"] == lines[-1]["requeued_problems"] + len(pending)

    # the checkpoint is the one-process loop's too: that loop continues the run
    train(dataclasses.replace(cfg, steps=5), spread, progress=False)
    assert [r["step"] for r in _lines(spread, "train")] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_distributed_fsdp_learner_on_two_cpu_ranks_matches_the_one_process_update(tmp_path, model, cluster):
    from treedistill.distributed.fsdp import FSDPLearner
    from treedistill.engine import make_engine
    from treedistill.envs import get_env
    from treedistill.learner import Learner
    from treedistill.methods import METHODS
    from treedistill.metrics import ComputeCounters
    from treedistill.rollout.sample import sample_problems

    # 4 trajectories, 4 micro-batches of 1: rank r trains micro-batches r and r + 2
    cfg = _config("countdown-tiny-ppo", model, "micro_batch_size=1", "lr=1e-3")
    local = Learner(cfg, None, __import__("contextlib").ExitStack())
    env = get_env("countdown")
    problems = [{"numbers": [3, 5, 7], "target": 22}, {"numbers": [2, 4, 9], "target": 17}]
    groups = sample_problems(make_engine(local.policy, "native"), local.policy, env, problems, n=2,
                             temperature=1.0, max_new_tokens=16, seed=0)
    trajectories = [t for g in groups for t in g]
    fsdp = FSDPLearner(cfg, 2, device="cpu")
    try:
        advantages = METHODS[cfg.method].advantages
        want = local.learn(trajectories, advantages=advantages, step=1, nonfinite_streak=0, counters=ComputeCounters())
        got = fsdp.learn(trajectories, advantages=advantages, step=1, nonfinite_streak=0, counters=ComputeCounters())
        for key in ("loss", "policy_loss", "value_loss", "kl", "grad_norm", "reward_mean"):
            assert got.metrics[key] == pytest.approx(want.metrics[key], rel=1e-4, abs=1e-6), key
        # the weights it publishes are the one-process learner's after the same update
        published = ray.get(fsdp.publish())
        for name, value in local.policy.model.named_parameters():
            assert torch.allclose(published["model"][name], value, atol=1e-6), name
        for name, value in local.policy.value_head.state_dict().items():
            assert torch.allclose(published["value_head"][name], value, atol=1e-6), name
        # and its checkpoint is in the one-process format: same keys, the optimizer by parameter index
        fsdp.save(tmp_path, 1, {"loop": {"step": 1}}, keep=1)
        saved = load_checkpoint(latest_checkpoint(tmp_path))
        assert saved["model"].keys() == local.policy.model.state_dict().keys()
        want_optimizer = local.optimizer.state_dict()
        assert saved["optimizer"]["param_groups"] == want_optimizer["param_groups"]
        for i, moments in want_optimizer["state"].items():
            for key, value in moments.items():
                assert torch.allclose(saved["optimizer"]["state"][i][key], value, atol=1e-6), (i, key)
    finally:
        fsdp.close()


@pytest.mark.slow
def test_ray_collector_trains_tree_fork(tmp_path, model, cluster):
    """tree-fork (a forking tree per problem, a varying number of rows) through the Ray collector: every
    step's generated tokens are its trees' (chains and forks), and every logged line accounts for its
    dispatches."""
    cfg = _config("countdown-tiny-tree-fork", model, "steps=2", "eval_every=0", "problems_per_step=2",
                  "minibatch_size=1", "fork.chains=3", "fork.forks=2", "fork.per_round=1", "eval_before_rl=false")
    summary = train(cfg, tmp_path / "run", distributed=DistributedSettings(generators=1, max_staleness=0),
                    progress=False)
    assert summary["stop_reason"] == "all 2 steps done"
    lines = _lines(tmp_path / "run", "train")
    assert [r["problems_trained"] for r in lines] == [2, 4]
    spent = 0
    for r in lines:
        assert r["tree_rows"] >= 1 and 0 < r["learned_token_share"] <= 1
        assert r["rollout_generated_tokens"] - spent == 2 * r["tree_generated_tokens"]
        spent = r["rollout_generated_tokens"]
        _check_counts(r)


@pytest.mark.slow
def test_ray_collector_trains_mcts_tree_and_cuts_the_last_step_to_the_budget(tmp_path, model, cluster):
    """mcts-tree (a varying number of rows per problem) through the Ray collector, to a generated-token
    budget: the step that would pass it takes only the problems it has room for, as in one process."""
    cfg = _config("countdown-tiny-mcts-tree", model, "steps=50", "eval_every=0", "problems_per_step=4",
                  "search.problems_at_once=1")
    layout = DistributedSettings(generators=1, max_staleness=0)  # one generator, no batch ahead: repeatable
    train(dataclasses.replace(cfg, steps=1), tmp_path / "probe", distributed=layout, progress=False)
    spent = _lines(tmp_path / "probe", "train")[0]["rollout_generated_tokens"]  # 4 problems' tokens
    budget = spent + int(1.5 * spent / 4)  # room for about 1.5 more problems
    run = tmp_path / "run"
    summary = train(dataclasses.replace(cfg, budget_generated_tokens=budget), run, distributed=layout, progress=False)
    assert summary["stop_reason"].startswith("generated-token budget reached")
    lines = _lines(run, "train")
    assert all(r["tree_rows"] >= 1 for r in lines)  # every problem's tree yields its own number of rows
    assert [r["problems_trained"] for r in lines][:1] == [4] and lines[0]["rollout_generated_tokens"] == spent
    assert len(lines) == 2 and 1 <= lines[1]["problems_trained"] - 4 <= 2  # the cut step: 1 or 2 of 4
    for r in lines:
        _check_counts(r)
