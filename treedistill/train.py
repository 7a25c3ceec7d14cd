"""The online training loop: one function, `train`, read top to bottom.

Each step, in file order: collect (the method's rollout on the next problems: search or sampling,
scored by the environment) -> learn (rewards, advantages, loss and optimizer update(s):
`learner.learn`) -> log -> periodic evaluation -> checkpoint. The method (mcts | mcts-tree | tree-fork |
bon | grpo | cispo | ppo) is looked up ONCE in `methods.METHODS`; the loop only passes its advantages on.

One loop, two collectors (`collect.py`): in one process (`LocalCollector`), or generator actors on a
Ray cluster (`distributed.RayCollector`, `distributed=DistributedSettings(...)`), where the learner is
this process (`learner.Learner`) or L FSDP processes (`distributed/fsdp.py`). Every method runs in both;
the context check, the budgets and the last step's cut hold in both.

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
from pathlib import Path

from treedistill import checkpoint
from treedistill.collect import LocalCollector
from treedistill.config import TrainConfig, to_yaml
from treedistill.envs import get_env
from treedistill.jsonl import append_jsonl
from treedistill.learner import DivergedError, Learner
from treedistill.methods import METHODS
from treedistill.metrics import ComputeCounters, Progress
from treedistill.runs import (
    advance_bar,
    budget_progress,
    check_same_run,
    finish_run,
    holding_run_folder,
    open_run_logs,
    passed_eval_point,
    problems_for_step,
    restore_loop,
    resume_point,
    run_problems,
    spent,
    why_stop,
)

__all__ = ["train"]


@holding_run_folder
def train(cfg: TrainConfig, run_dir: str | Path, *, resume: str = "auto", engine: str = "native",
          progress: bool = True, distributed=None, fault: tuple[int, int] | None = None) -> dict:
    """Run (or continue) training as the config says; returns a summary of the run.

    resume: "auto" (continue from the run folder's newest complete checkpoint, else start), "never"
    (start; refused if the folder holds checkpoints) or a checkpoint / run folder path.
    engine: generation backend, "native" (KV cache shared across the search tree), "hf" or "vllm".
    distributed: a `distributed.DistributedSettings` to collect on a Ray cluster (None: this process).
    fault = (generator, n): that generator's process exits after its n-th rollout (fault-injection tests).
    """
    # ---- set-up: everything that can refuse the input comes before any training compute
    run_dir = Path(run_dir)
    method = METHODS[cfg.method]
    if distributed is not None:
        distributed.check()
    start_from, saved = resume_point(run_dir, resume)
    if saved is not None:
        check_same_run(saved["config"], cfg)
    env = get_env(cfg.env, **cfg.env_options)
    train_problems, test_problems = run_problems(cfg, env)
    eval_problems = test_problems[:cfg.eval_problems] if cfg.eval_problems else test_problems
    final_eval_problems = test_problems[:cfg.final_eval_count] if cfg.final_eval_count else test_problems
    stack = contextlib.ExitStack()
    with stack:
        if distributed is None:
            learner = Learner(cfg, saved, stack)
            collector = LocalCollector(cfg, learner, env, train_problems, engine=engine, saved=saved)
        else:
            from treedistill.distributed.ray_loop import start_cluster

            learner, collector = start_cluster(cfg, distributed, stack, env=env, train_problems=train_problems,
                                               saved=saved, start_from=start_from, engine=engine, fault=fault)
        collector.check_context([*train_problems, *test_problems])
        counters = ComputeCounters(params=learner.num_params, head_params=learner.head_params)
        step, skipped_updates, nonfinite_streak, wall_before = restore_loop(saved, counters)
        logger = stack.enter_context(contextlib.closing(open_run_logs(run_dir, cfg, step if saved is not None else None)))
        started = time.perf_counter()

        def wall() -> float:
            return wall_before + time.perf_counter() - started

        def evaluation(at_step: int, trajectories=(), final: bool = False) -> dict:
            t0 = time.perf_counter()
            stats, records = collector.evaluate(at_step, learner, final_eval_problems if final else eval_problems,
                                                list(trajectories), counters)
            append_jsonl(run_dir / "samples.jsonl", records)
            return logger.log(at_step, {"kind": "eval", **stats, **counters.as_dict(), **collector.log_fields(),
                                        "eval_s": time.perf_counter() - t0, "wall_s": wall()})

        if step == 0 and cfg.eval_before_rl:
            evaluation(0)  # before RL
        stop_reason = why_stop(step, counters, cfg)
        bar = (Progress(cfg.steps, initial=step, desc=f"{collector.name} {cfg.method}")
               if progress and stop_reason is None else None)
        if bar is not None:
            stack.callback(bar.close)
        last_eval = None
        while stop_reason is None:
            step += 1
            t_step = time.perf_counter()

            # 1. collect trajectories (scored inside: best-of-N and the search choose by reward); a step
            #    that would run past the generated-token budget takes fewer problems
            spent_before = spent(counters)
            collected = collector.collect(step, problems_for_step(cfg, counters, collector.problems_seen), counters)
            trajectories = collected.trajectories
            assert len({t.group for t in trajectories}) == collected.problems and (
                cfg.rows_per_problem is None or len(trajectories) == collected.problems * cfg.rows_per_problem), (
                f"{cfg.method} rollout returned {len(trajectories)} trajectories, expected "
                f"{collected.problems * cfg.samples_per_problem} (problems x samples per problem)")
            t_rollout = time.perf_counter()

            # 2. rewards -> 3. advantages -> 4. loss and optimizer update(s)
            learned = learner.learn(trajectories, advantages=method.advantages, step=step,
                                    nonfinite_streak=nonfinite_streak, counters=counters,
                                    progress=budget_progress(cfg, spent_before, spent(counters)))
            skipped_updates += learned.skipped
            nonfinite_streak = learned.nonfinite_streak
            collector.learned(step, learner)  # the generators' weights, where they are not the learner's
            t_learn = time.perf_counter()

            # 5. log (learned_token_share: the step's learned tokens per generated token; a sampling
            #    method that learns every sample: 1.0)
            stop_reason = why_stop(step, counters, cfg)
            generated = counters.rollout_generated_tokens - spent_before[0]
            record = logger.log(step, {
                **learned.metrics, "skipped_updates": skipped_updates,
                "learned_token_share": learned.metrics["learned_tokens"] / generated if generated else None,
                **collected.stats, **counters.as_dict(),
                **collector.log_fields(),
                "rollout_s": t_rollout - t_step, "learn_s": t_learn - t_rollout, "wall_s": wall(),
            })
            if learned.diverged:
                raise DivergedError(learned.diverged)

            # 6. evaluation (mean@k, sparse reward, no search): every eval_every steps, after the step
            #    that passes an evaluation point, and always at the end
            if (cfg.eval_every and step % cfg.eval_every == 0) or stop_reason or passed_eval_point(
                    cfg, spent_before, spent(counters)):
                last_eval = evaluation(step, trajectories, final=stop_reason is not None)

            # 7. checkpoint (atomic; the newest keep_checkpoints kept), and always at the end
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or stop_reason:
                learner.save(run_dir, step, {
                    "rng": checkpoint.rng_state(),
                    "counters": counters.state_dict(),
                    "loop": {"step": step, **collector.state(), "skipped_updates": skipped_updates,
                             "nonfinite_streak": nonfinite_streak, "wall_s": wall()},
                    "config": to_yaml(cfg),
                }, cfg.keep_checkpoints)
            advance_bar(bar, record, last_eval)
        extra = collector.summary()

    # ---- the end: report.md and a summary
    return finish_run(run_dir, cfg, step=step, stop_reason=stop_reason, skipped_updates=skipped_updates,
                      counters=counters, wall_s=wall(), **extra)
