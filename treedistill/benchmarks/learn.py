"""`bench learn`: the learner's step on real rollouts, packed rows (`algorithms/packing.py`) against per-row.

A preset's real rollout (default countdown-tiny-mcts-tree: its search on the first `trees` Countdown
training problems) gives one step's trajectories; then the same `learner.learn` step (rewards,
advantages with the value head's no-grad pass, the reference's pass for the KL term, forward + backward,
optimizer updates) runs on them with cfg.pack_rows off and on, each from the same starting weights:
one warm-up each, then `repeats` times each, alternating. Reported per tree (problem): learner FLOPs
(the positions actually computed, `metrics.ComputeCounters.learn_flops`) and seconds (the median of the
repeats), the learner's throughput in row tokens (prompt + completion of every row) per second, and
the ratios per-row / packed. The two runs' update metrics (loss, grad_norm, ...) are reported side by side: the
packed step computes the same numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time

__all__ = ["LEARN_DEFAULTS", "learn_workload", "run_learn"]

LEARN_DEFAULTS = dict(preset="countdown-tiny-mcts-tree", trees=4, repeats=3)
COMPARED = ("loss", "policy_loss", "value_loss", "kl", "grad_norm")


def learn_workload(*, preset: str, trees: int, repeats: int, seed: int, device: str | None = None,
                   overrides: tuple[str, ...] = ()) -> dict:
    """The preset's rollout on `trees` training problems, then its learn step per-row and packed."""
    import torch

    from treedistill.config import load_config
    from treedistill.engine import make_engine
    from treedistill.envs import get_env
    from treedistill.learner import learn, load_train_policy, reference_policy, trainable_params
    from treedistill.methods import METHODS, RolloutContext
    from treedistill.metrics import ComputeCounters
    from treedistill.runs import run_problems

    # the whole step is one optimizer update at most `trees` problems (the preset's sizes otherwise)
    cfg = load_config(preset=preset, overrides=[f"seed={seed}", f"problems_per_step={trees}",
                                                 *([f"device={device}"] if device else []), *overrides])
    env = get_env(cfg.env, **cfg.env_options)
    torch.manual_seed(cfg.seed)
    policy = load_train_policy(cfg)
    method = METHODS[cfg.method]
    problems = run_problems(cfg, env)[0][:trees]
    t0 = time.perf_counter()
    rollout = method.rollout(RolloutContext(engine=make_engine(policy, "native"), policy=policy, env=env, cfg=cfg),
                             problems, seed)
    rollout_s = time.perf_counter() - t0
    trajectories = rollout.trajectories
    params = trainable_params(policy)
    start = [p.detach().clone() for p in params]
    head_params = sum(p.numel() for p in policy.value_head.parameters()) if policy.value_head is not None else 0

    def one(pack: bool) -> tuple[float, ComputeCounters, list[dict]]:
        with torch.no_grad():
            for p, saved in zip(params, start):
                p.copy_(saved)
        run_cfg = dataclasses.replace(cfg, pack_rows=pack)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        counters = ComputeCounters(params=policy.num_parameters, head_params=head_params)
        with contextlib.ExitStack() as stack:
            reference = reference_policy(policy, stack) if cfg.kl_coef > 0 else None
            t = time.perf_counter()
            step = learn(trajectories, policy=policy, reference=reference, advantages=method.advantages, optimizer=optimizer,
                         params=params, counters=counters, cfg=run_cfg, step=1, nonfinite_streak=0)
            seconds = time.perf_counter() - t
        return seconds, counters, step.updates

    one(False), one(True)  # warm-up (first calls allocate)
    timed = {"per_row": [], "packed": []}
    for _ in range(repeats):  # the two ways alternate, so a change in the machine's load hits both
        timed["per_row"].append(one(False))
        timed["packed"].append(one(True))
    runs = {}
    row_tokens = sum(len(t.prompt_ids) + len(t.completion_ids) for t in trajectories)
    for name, results in timed.items():
        seconds, counters, updates = results[-1]
        median = statistics.median(t[0] for t in results)
        runs[name] = {"seconds_per_tree": median / len(problems),
                      "row_tokens_per_s": row_tokens / median,  # learner throughput: the rows' tokens per second
                      "seconds_all": [round(t[0], 4) for t in results],
                      "flops_per_tree": counters.learn_flops / len(problems),
                      "train_positions": counters.learn_train_tokens,
                      "inference_positions": counters.learn_inference_tokens,
                      "forward_calls": counters.learn_forward_calls,
                      "updates": [{k: u[k] for k in COMPARED if k in u} for u in updates]}
    with torch.no_grad():
        for p, saved in zip(params, start):
            p.copy_(saved)
    row, packed = runs["per_row"], runs["packed"]
    differences = [abs(a[k] - b[k]) for a, b in zip(row["updates"], packed["updates"]) for k in a]
    return {"workload": f"{preset}: its rollout on {len(problems)} training problems, then learner.learn "
                        "per-row and packed (cfg.pack_rows) from the same weights",
            "preset": preset, "method": cfg.method, "trees": len(problems), "rows": len(trajectories),
            "row_tokens": row_tokens,
            "rollout_s": round(rollout_s, 3), "repeats": repeats, "per_row": row, "packed": packed,
            "flops_ratio": row["flops_per_tree"] / packed["flops_per_tree"],
            "seconds_ratio": row["seconds_per_tree"] / packed["seconds_per_tree"],
            "max_metric_difference": max(differences, default=0.0)}


def run_learn(args) -> dict:
    """`treedistill bench learn`: the workload, printed as a table and ratios."""
    from treedistill.benchmarks.common import check_positive

    check_positive(trees=args.trees, repeats=args.repeats)
    r = learn_workload(preset=args.preset, trees=args.trees, repeats=args.repeats, seed=args.seed,
                       device=args.device, overrides=tuple(args.set))
    print(f"bench learn: {r['workload']}; {r['rows']} rows, {r['row_tokens']} row tokens")
    print(f"{'way':<9}{'s/tree':>10}{'row tok/s':>11}{'GFLOP/tree':>12}{'positions':>11}  update metrics")
    for name in ("per_row", "packed"):
        w = r[name]
        metrics = " ".join(f"{k}={v:.6g}" for u in w["updates"][:1] for k, v in u.items())
        print(f"{name:<9}{w['seconds_per_tree']:>10.4f}{w['row_tokens_per_s']:>11.1f}{w['flops_per_tree'] / 1e9:>12.3f}"
              f"{w['train_positions']:>11}  {metrics}")
    print(f"per-row / packed: flops x{r['flops_ratio']:.2f}, seconds x{r['seconds_ratio']:.2f} "
          f"(largest metric difference {r['max_metric_difference']:.2e})")
    return r
