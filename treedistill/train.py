"""The online training loop: one function, `train`, read top to bottom.

Each step, in file order: take problems -> rollout (search or sampling, scored by the environment) ->
learn (rewards, advantages, loss and optimizer update(s): `learner.learn`) -> log -> periodic
evaluation -> checkpoint. The method (mcts | mcts-tree | bon | grpo | cispo | ppo) is looked up ONCE in
`methods.METHODS`; the loop only calls its rollout, advantages and loss. The distributed loop
(`distributed/ray_loop.py`) calls the same `learn` and the same run bookkeeping (`runs.py`), so both
loops share every line of the maths.

Compute is counted as it is spent: the engine's counters around every rollout (generated tokens,
prefill, cache hits, forward calls) and the learner's own forwards and backwards, into
`metrics.ComputeCounters`. A run ends at cfg.steps or at the first budget reached
(budget_generated_tokens, budget_flops), checked after every step. A step that would run past the
generated-token budget takes fewer problems (`runs.problems_for_step`): so methods whose steps cost very
different amounts (an MCTS step searches 16 trees, a GRPO step samples 4 x 16 completions) all end
within about one problem's tokens of the same budget instead of up to one whole step past it. Only the
final budget cuts a step: an evaluation point (`eval_at_tokens`) is taken after the step that passes
it, so a run evaluated at k points trains exactly as the same run evaluated only at its end. With a
budget, warm-up and decay are fractions of the budget (`TrainConfig.lr_multiplier`), so every method
spends the same share of its compute at each learning rate.

Exact resume. Every random choice of a step is seeded from (cfg.seed, what, step): the problems
(a seeded shuffle per epoch, the position saved), the engine's samples, the search, the minibatch
order; evaluation always uses cfg.seed. The engine's prefix cache is emptied before every rollout and
evaluation, so no phase depends on what an earlier one left there (nor on stale keys/values of
weights that have since changed). A checkpoint holds model, value head, optimizer, all RNG states,
the data position, the counters and the loop's own state; the learning rate is a pure function of
the step and the compute spent (`TrainConfig.lr_multiplier`), so there is no scheduler state. A run killed at any moment
and resumed from its newest complete checkpoint therefore repeats the same steps with the same
numbers on CPU (tests/test_resume.py kills real processes between steps and inside a checkpoint write).

Every evaluation of a method with a value head also measures the head against Monte Carlo truth
(`value_probe.py`: value_spearman, value_mse, value_mse_const on the eval line), on its own seeds.

The run folder (what it holds, its lock) is described in `runs.py`; where the learner departs from
the reference run, in `learner.py`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from treedistill import checkpoint
from treedistill.config import TrainConfig, to_yaml
from treedistill.engine import make_engine
from treedistill.envs import get_env
from treedistill.evaluate import evaluate
from treedistill.jsonl import append_jsonl
from treedistill.learner import (
    DivergedError,
    derive_seed,
    learn,
    load_train_policy,
    reference_policy,
    trainable_params,
)
from treedistill.methods import METHODS, RolloutContext
from treedistill.metrics import ComputeCounters, Progress, counter_delta
from treedistill.runs import (
    advance_bar,
    budget_progress,
    check_context,
    check_same_run,
    eval_stats,
    finish_run,
    holding_run_folder,
    open_run_logs,
    passed_eval_point,
    problems_for_step,
    restore_loop,
    resume_point,
    run_problems,
    sample_records,
    spent,
    take_problems,
    why_stop,
)
from treedistill.value_probe import value_quality

__all__ = ["train"]


@holding_run_folder
def train(cfg: TrainConfig, run_dir: str | Path, *, resume: str = "auto", engine: str = "native",
          progress: bool = True) -> dict:
    """Run (or continue) training as the config says; returns a summary of the run.

    resume: "auto" (continue from the run folder's newest complete checkpoint, else start), "never"
    (start; refused if the folder holds checkpoints) or a checkpoint / run folder path.
    engine: generation backend, "native" (KV cache shared across the search tree) or "hf".
    """
    # ---- set-up: everything that can refuse the input comes before any compute
    run_dir = Path(run_dir)
    method = METHODS[cfg.method]
    _, saved = resume_point(run_dir, resume)
    if saved is not None:
        check_same_run(saved["config"], cfg)
    env = get_env(cfg.env)
    train_problems, test_problems = run_problems(cfg, env)
    eval_problems = test_problems[:cfg.eval_problems] if cfg.eval_problems else test_problems
    final_eval_problems = test_problems[:cfg.final_eval_count] if cfg.final_eval_count else test_problems
    torch.manual_seed(cfg.seed)
    policy = load_train_policy(cfg)
    check_context(cfg, policy, env, [*train_problems, *test_problems])
    stack = contextlib.ExitStack()
    # the frozen initial policy, for the KL term: taken BEFORE any checkpoint weights are loaded
    reference = reference_policy(policy, stack) if cfg.kl_coef > 0 else None
    gen = make_engine(policy, engine)
    params = trainable_params(policy)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    head_params = sum(p.numel() for p in policy.value_head.parameters()) if policy.value_head is not None else 0
    counters = ComputeCounters(params=policy.num_parameters, head_params=head_params)
    step, skipped_updates, nonfinite_streak, wall_before = restore_loop(saved, counters)
    position = 0
    if saved is not None:
        policy.model.load_state_dict(saved["model"])
        if policy.value_head is not None:
            policy.value_head.load_state_dict(saved["value_head"])
        optimizer.load_state_dict(saved["optimizer"])
        position = int(saved["loop"]["position"])
    logger = open_run_logs(run_dir, cfg, step if saved is not None else None)
    ctx = RolloutContext(engine=gen, policy=policy, env=env, cfg=cfg)
    started = time.perf_counter()

    def wall() -> float:
        return wall_before + time.perf_counter() - started

    def evaluation(at_step: int, trajectories: Sequence = (), final: bool = False) -> dict:
        t0 = time.perf_counter()
        gen.clear_cache()
        problems = final_eval_problems if final else eval_problems
        result = evaluate(gen, policy, env, problems, k=cfg.eval_k, temperature=cfg.eval_temperature,
                          max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        shown = problems[:cfg.eval_samples_logged]
        append_jsonl(run_dir / "samples.jsonl",
                      sample_records(ctx, shown, at_step, trajectories[:cfg.eval_samples_logged]))
        probe = value_quality(gen, policy, env, problems, cfg)  # the value head against Monte Carlo truth
        return logger.log(at_step, {"kind": "eval", **eval_stats(result), **probe, **counters.as_dict(),
                                    "eval_s": time.perf_counter() - t0, "wall_s": wall()})

    if step == 0 and cfg.eval_before_rl:
        evaluation(0)  # before RL
    stop_reason = why_stop(step, counters, cfg)
    bar = Progress(cfg.steps, initial=step, desc=f"train {cfg.method}") if progress and stop_reason is None else None
    last_eval = None
    try:
        while stop_reason is None:
            step += 1
            t_step = time.perf_counter()

            # 1. collect trajectories (scored inside: best-of-N and the search choose by reward)
            gen.clear_cache()  # cached keys/values belong to the weights before the last update
            spent_before = spent(counters)
            problems = take_problems(train_problems, cfg.seed, position, problems_for_step(cfg, counters, position))
            position += len(problems)
            before = gen.counters.snapshot()
            rollout = method.rollout(ctx, problems, derive_seed(cfg.seed, "rollout", step))
            counters.add_rollout(**counter_delta(before, gen.counters.snapshot()))
            trajectories = rollout.trajectories
            assert len({t.group for t in trajectories}) == len(problems) and (
                cfg.rows_per_problem is None or len(trajectories) == len(problems) * cfg.rows_per_problem), (
                f"{cfg.method} rollout returned {len(trajectories)} trajectories, expected "
                f"{len(problems) * cfg.samples_per_problem} (problems x samples per problem)")
            t_rollout = time.perf_counter()

            # 2. rewards -> 3. advantages -> 4. loss and optimizer update(s)
            learned = learn(trajectories, policy=policy, reference=reference, method=method, optimizer=optimizer,
                            params=params, counters=counters, cfg=cfg, step=step, nonfinite_streak=nonfinite_streak,
                            progress=budget_progress(cfg, spent_before, spent(counters)))
            skipped_updates += learned.skipped
            nonfinite_streak = learned.nonfinite_streak
            t_learn = time.perf_counter()

            # 5. log
            stop_reason = why_stop(step, counters, cfg)
            record = logger.log(step, {
                **learned.metrics(trajectories, skipped_updates),
                **rollout.stats, **counters.as_dict(), "problems_seen": position,
                "rollout_s": t_rollout - t_step, "learn_s": t_learn - t_rollout, "wall_s": wall(),
            })
            if learned.diverged:
                raise DivergedError(learned.diverged)

            # 6. evaluation (mean@k, sparse reward, no search): every eval_every steps, after the step
            #    that passes an evaluation point, and always at the end
            if (cfg.eval_every and step % cfg.eval_every == 0) or stop_reason or passed_eval_point(
                    cfg, spent_before[0], counters.rollout_generated_tokens):
                last_eval = evaluation(step, trajectories, final=stop_reason is not None)

            # 7. checkpoint (atomic; the newest keep_checkpoints kept), and always at the end
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or stop_reason:
                checkpoint.save_checkpoint(run_dir, step, {
                    "model": policy.model.state_dict(),
                    **({"value_head": policy.value_head.state_dict()} if policy.value_head is not None else {}),
                    "optimizer": optimizer.state_dict(),
                    "rng": checkpoint.rng_state(),
                    "counters": counters.state_dict(),
                    "loop": {"step": step, "position": position, "skipped_updates": skipped_updates,
                             "nonfinite_streak": nonfinite_streak, "wall_s": wall()},
                    "config": to_yaml(cfg),
                }, keep=cfg.keep_checkpoints)
            advance_bar(bar, record, last_eval)
    finally:
        if bar is not None:
            bar.close()
        logger.close()
        stack.close()

    # ---- the end: report.md and a summary
    return finish_run(run_dir, cfg, step=step, stop_reason=stop_reason, skipped_updates=skipped_updates,
                      counters=counters, wall_s=wall())
