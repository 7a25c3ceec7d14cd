"""`treedistill eval`: mean@k accuracy of a model without search, with its standard error; with
`--search mcts`, also the accuracy of the answers MCTS extracts on the same problems, and best-of-N at
the search's generated tokens per problem, each with its tokens per problem; with `--value-probe P`, how
well the model's saved value head predicts success (value_probe.py) on the first P problems, and on
Countdown how well it separates prefixes from which the target is still reachable (AUC)."""

from __future__ import annotations

import dataclasses
import sys

from treedistill.commands import (
    add_diversity_arguments,
    add_expansion_arguments,
    add_format_arguments,
    add_leaf_arguments,
    add_pick_argument,
    add_tree_arguments,
    add_widening_arguments,
    check_choice,
    check_counts,
    check_non_negative,
    screened_search,
    search_settings,
)
from treedistill.errors import UsageError
from treedistill.search.contracts import TEST_TIME_SEARCH

# The value probe's settings (sampling temperature, step length) are this preset's, as its training
# evaluations use them (value_probe.value_quality).
PROBE_PRESET = "countdown-tiny-mcts"

HELP = ("evaluate a model: mean@k accuracy (+- stderr), pass@k, format rate; --search mcts adds the accuracy "
        "with search and best-of-N at the same tokens")


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="tiny",
                        help="preset name, model folder or hub id (default: tiny, the embedded model)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--split", help="named split of the environment, e.g. test")
    source.add_argument("--data", help="JSONL file of problems")
    parser.add_argument("--env", default="countdown", help="environment (default countdown)")
    add_format_arguments(parser)
    parser.add_argument("--k", type=int, default=16, help="samples per problem (default 16)")
    parser.add_argument("--temperature", type=float, default=0.2, help="sampling temperature (default 0.2)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="tokens per sample at most (default 512)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems")
    parser.add_argument("--batch", type=int, default=256,
                        help="sequences per engine call (problems per call = batch // k; default 256)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--engine", default=None,
                        help="generation backend: hf | native | vllm (default hf, native with --search)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    search = parser.add_argument_group("search at test time (--search mcts)")
    search.add_argument("--search", default="none", choices=["none", "mcts"],
                        help="mcts: also evaluate the answer of a step-level MCTS per problem (default none)")
    # The search's defaults are the test-time search's (search/contracts.py TEST_TIME_SEARCH), chosen on
    # training problems; the training presets keep theirs.
    add_tree_arguments(search, TEST_TIME_SEARCH)
    add_expansion_arguments(search, TEST_TIME_SEARCH, temperature="--search-temperature")
    search.add_argument("--terminal", default=None, choices=["reward", "legal", "value"],
                        help="value of terminal nodes: reward (the environment's dense reward; the default where "
                             "it reads only the prompt, as on Countdown), legal (the value head, -1 without a "
                             "legal answer; the default elsewhere) or value (the value head)")
    add_pick_argument(search, TEST_TIME_SEARCH)
    add_leaf_arguments(search, TEST_TIME_SEARCH)
    add_widening_arguments(search, TEST_TIME_SEARCH)
    add_diversity_arguments(search, TEST_TIME_SEARCH)
    search.add_argument("--problems-at-once", type=int, default=None,
                        help=f"problems searched in lock-step per batch (default {TEST_TIME_SEARCH.problems_at_once})")
    search.add_argument("--seeds", type=int, default=1,
                        help="the search and its best-of-N run with seeds --seed .. --seed + N - 1: accuracies are "
                             "means over the seeds, the difference's interval resamples problems and seeds "
                             "(default 1)")
    probe = parser.add_argument_group("value head (--value-probe P)")
    probe.add_argument("--value-probe", type=int, default=0, metavar="P",
                       help="also measure the saved value head on step prefixes of the first P problems: Spearman "
                            "of V against the success rate of policy completions, MSE against the best constant's "
                            "(what training logs at every evaluation; default 0 = off)")
    probe.add_argument("--value-probe-k", type=int, default=6, help="policy completions per prefix (default 6)")
    probe.add_argument("--value-reward", default="sparse", choices=["sparse", "dense"],
                       help="the reward the completions are scored with, the one the head was trained on "
                            "(default sparse, as the tiny presets)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line last")


def check_arguments(args) -> None:
    """Refuse bad values before anything is loaded."""
    from treedistill.engine import BACKENDS, check_available

    check_counts(args, ("k", "max_new_tokens", "limit", "batch"))
    check_non_negative(args, ("temperature", "value_probe"))  # also refuses nan
    check_counts(args, ("value_probe_k",))
    check_choice(args, "engine", BACKENDS)
    if args.engine:
        check_available(args.engine)
    check_counts(args, ("seeds",))
    if args.seeds > 1 and args.search != "mcts":
        raise UsageError(f"--seeds {args.seeds} repeats the search; it needs --search mcts")
    if args.search == "mcts":
        check_counts(args, ("simulations", "parallel", "max_depth", "k_children", "step_max_tokens",
                            "problems_at_once", "subtrees"))
        _search_settings(args)


def _search_settings(args):
    """TEST_TIME_SEARCH with the given flags (--search-temperature: the search's; --temperature is the
    samples' without search); W at most the simulations."""
    cfg = search_settings(args, TEST_TIME_SEARCH, flags={"temperature": "--search-temperature"},
                          temperature=args.search_temperature)
    return dataclasses.replace(cfg, parallel=min(cfg.parallel, cfg.simulations))


def _progress_bar(total: int):
    """tqdm on stderr when it is a terminal, else nothing; returns (callback, close)."""
    if not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="problem", file=sys.stderr, dynamic_ncols=True)

    def update(done: int) -> None:
        bar.update(done - bar.n)

    return update, bar.close


def run(args) -> dict:
    check_arguments(args)
    from treedistill.datasets import load_split
    from treedistill.engine import make_engine
    from treedistill.envs import get_env
    from treedistill.evaluate import evaluate
    from treedistill.models.load import load_policy

    env = get_env(args.env, step=args.step, answer=args.answer)
    problems = load_split(args.env, args.split or "test", path=args.data)
    if args.limit is not None:
        problems = problems[:args.limit]
    if not problems:
        raise UsageError(f"no problems to evaluate in {args.data or args.split}")
    searching = args.search == "mcts"
    policy = load_policy(args.model, device=args.device, value_head=searching or args.value_probe > 0)
    if args.value_probe and not policy.value_head_saved:
        raise UsageError(f"--value-probe: model {args.model} has no saved value head (a method without one, "
                         "e.g. grpo or cispo, trained it); nothing to measure")
    engine = make_engine(policy, args.engine or ("native" if searching or args.value_probe else "hf"))
    update, close = _progress_bar(len(problems))
    try:
        result = evaluate(engine, policy, env, problems, k=args.k, temperature=args.temperature,
                          max_new_tokens=args.max_new_tokens, batch=args.batch, seed=args.seed,
                          progress=update)
    finally:
        close()
    out = {"model": args.model, "env": args.env, "step": args.step, "answer": args.answer, "split": args.split,
           "data": args.data, **result.to_dict()}
    print(f"model {args.model}  {args.env} {args.data or args.split} (steps: {args.step}, answer: {args.answer}): "
          f"{result.problems} problems x {result.k} samples at T={result.temperature}")
    print(f"  mean@{result.k} accuracy  {100 * result.accuracy:6.2f}% +- {100 * result.stderr:.2f}")
    print(f"  pass@{result.k}           {100 * result.pass_at_k:6.2f}%")
    print(f"  format rate        {100 * result.format_rate:6.2f}%")
    print(f"  failed samples     {result.no_answer} without an answer, {result.unparsable} unparsable, "
          f"{result.wrong} wrong ({result.truncated} of all samples hit --max-new-tokens)")
    print(f"  mean dense reward  {result.mean_dense:+.3f}")
    print(f"  generated tokens   {result.generated_tokens} ({out['tokens_per_sample']:.1f} per sample, "
          f"{result.truncated} truncated)")
    print(f"  wall seconds       {result.seconds:.1f}")
    if searching:
        out["search"] = _run_search(args, engine, policy, env, problems, result)
    if args.value_probe:
        out["value_probe"] = _run_value_probe(args, engine, policy, env, problems)
    return out


def _run_value_probe(args, engine, policy, env, problems) -> dict:
    """value_probe.value_quality on the first --value-probe problems, as training's evaluations measure
    it (PROBE_PRESET's temperature and step length; the reward, k, seed and completion length given)."""
    from treedistill.config import load_config
    from treedistill.value_probe import value_quality

    cfg = load_config(PROBE_PRESET, overrides=[f"reward={args.value_reward}", f"value_probe_prefixes={args.value_probe}",
                                                f"value_probe_k={args.value_probe_k}", f"seed={args.seed}",
                                                f"max_new_tokens={args.max_new_tokens}"])
    found = value_quality(engine, policy, env, problems, cfg)
    rho = found["value_spearman"]
    print(f"value head on {found['value_probe_prefixes']} step prefixes x {args.value_probe_k} completions "
          f"({args.value_reward} reward; success rate {found['value_probe_target_mean']:.3f}, mean V "
          f"{found['value_probe_value_mean']:+.3f})")
    print(f"  Spearman(V, success) {'undefined (a constant side)' if rho is None else f'{rho:+.3f}'}")
    if "value_auc_reachable" in found:
        area = found["value_auc_reachable"]
        print(f"  AUC(V, target still reachable) {'undefined (one class)' if area is None else f'{area:.3f}'} "
              f"({found['value_probe_reachable_frac']:.0%} of the prefixes reachable, by the solver)")
    print(f"  MSE {found['value_mse']:.4f}  (best constant {found['value_mse_const']:.4f}), wall "
          f"{found['value_probe_s']:.1f} s")
    return found


def _per_answer(tokens: float | None) -> str:
    return "no finished answer" if tokens is None else f"{tokens:.0f} tokens per finished answer"


# A search's numbers over several seeds (`_pooled`): these are means over the seeds, these add up; the
# settings and `problems` are the same in every seed; stderr and tokens_per_answer are recomputed.
MEAN_KEYS = ("accuracy", "pass_at_k", "format_rate", "mean_dense", "tokens_per_sample", "tokens_per_problem",
             "completed_by_policy", "tree_nodes", "bookkeeping_share", "finished_answers", "distinct_answers")
SUM_KEYS = ("samples", "generated_tokens", "truncated", "seconds", "no_answer", "unparsable", "wrong")


def _run_search(args, engine, policy, env, problems, plain) -> dict:
    """MCTS on the same problems, then best-of-N at the search's mean generated tokens per problem
    (picking by the same information the search's terminal values use), once per seed; prints and returns
    both, pooled over the seeds, with MCTS minus best-of-N paired over the problems."""
    import numpy as np

    from treedistill.commands.search import TERMINAL_TEXT
    from treedistill.envs.base import reward_from_prompt
    from treedistill.evaluate import evaluate_search
    from treedistill.report.stats import bootstrap_interval
    from treedistill.testtime import best_of_n_at

    terminal = args.terminal or ("reward" if reward_from_prompt(env) else "legal")
    cfg, value_engine, note = screened_search(args, _search_settings(args), policy)
    if note:
        print(note)
    rows = "verifier" if terminal == "reward" else "free"
    seeds = list(range(args.seed, args.seed + args.seeds))
    runs = []  # (SearchEvalResult, best-of-N cells) per seed
    for seed in seeds:
        update, close = _progress_bar(len(problems))
        try:
            found = evaluate_search(engine, policy, env, problems, search=cfg, max_new_tokens=args.max_new_tokens,
                                    seed=seed, terminal_value=terminal, value_engine=value_engine,
                                    progress=update)
        finally:
            close()
        budget = max(1, round(found.tokens_per_problem))
        runs.append((found, best_of_n_at(engine, policy, env, problems, budget, rows=rows,
                                         temperature=cfg.temperature, max_new_tokens=args.max_new_tokens,
                                         seed=seed)))
    print(f"with search: MCTS {cfg.select}, {cfg.simulations} simulations"
          + (f" over {cfg.subtrees} independent trees" if cfg.subtrees > 1 else "")
          + (f", {cfg.screen} first steps screened by the value model, the best {cfg.kept_first_steps} "
             "searched" if cfg.screen else "")
          + (f", repeat penalty {cfg.repeat_penalty:g}" if cfg.repeat_penalty > 0 else "")
          + (", expansion deferred" if cfg.defer_expansion else "")
          + f", W={cfg.parallel}, K={cfg.k_children}, "
          + (f"depth <= {cfg.max_depth}, " if cfg.max_depth is not None else "")
          + f"T={cfg.temperature:g}, answer: {cfg.pick}, terminal nodes valued by the {TERMINAL_TEXT[terminal]}"
          + ({True: " (the environment's reward reads only the prompt)",
              False: " (the environment's reward reads the reference answer: an oracle, not a test-time method)"}
             [reward_from_prompt(env)] if terminal == "reward" else "")
          + (f"; seeds {seeds[0]}..{seeds[-1]}, means over the seeds" if len(seeds) > 1 else ""))
    per_seed = [_seed_summary(found, bon) for found, bon in runs]
    if len(seeds) > 1:
        for seed, d in zip(seeds, per_seed):
            print(f"  seed {seed}: MCTS {100 * d['accuracy']:.2f}% at {d['tokens_per_problem']:.0f} tokens per "
                  f"problem ({d['distinct_answers']:.1f} distinct answers)"
                  + "".join(f"; {b['method']} {100 * b['accuracy']:.2f}% ({b['distinct_answers']:.1f} distinct)"
                            for b in d["best_of_n"]))
    mcts = np.array([found.result.per_problem for found, _ in runs], dtype=float)  # [seeds, problems]
    bons = [np.array([bon[i].detail["per_problem"] for _, bon in runs], dtype=float)
            for i in range(len(runs[0][1]))]
    s = _pooled(per_seed, mcts, bons) if len(seeds) > 1 else per_seed[0]
    print(f"  accuracy           {100 * s['accuracy']:6.2f}% +- {100 * s['stderr']:.2f}   (without search: "
          f"{100 * plain.accuracy:.2f}% +- {100 * plain.stderr:.2f} per sample)")
    print(f"  format rate        {100 * s['format_rate']:6.2f}%")
    print(f"  tokens per problem {s['tokens_per_problem']:8.1f}   (without search: "
          f"{plain.generated_tokens / plain.samples:.1f} per sample)")
    print(f"  paths completed by the policy {100 * s['completed_by_policy']:.0f}%, {s['tree_nodes']:.0f} nodes "
          f"per problem, bookkeeping {100 * s['bookkeeping_share']:.1f}% of the search, wall {s['seconds']:.1f} s")
    print(f"  finished answers   {s['finished_answers']:8.1f} per problem ({s['distinct_answers']:.1f} distinct), "
          + (f"{s['tokens_per_answer']:.0f} generated tokens per finished answer" if s["tokens_per_answer"]
             else "none"))
    for b, other in zip(s["best_of_n"], bons):
        diff, low, high = bootstrap_interval(mcts, other)
        b["mcts_minus"] = {"difference": diff, "low": low, "high": high}
        print(f"  {b['method']:<18} {100 * b['accuracy']:6.2f}% +- {100 * b['stderr']:.2f}   at "
              f"{b['tokens_per_problem']:.0f} tokens per problem (N = {b['n_mean']:.1f} samples on average, "
              f"T={cfg.temperature:g}; {_per_answer(b['tokens_per_answer'])}, {b['distinct_answers']:.1f} distinct "
              "answers)")
        print(f"  {'':<18} MCTS minus {b['method']}: {100 * diff:+.1f} points [{100 * low:+.1f}, {100 * high:+.1f}] "
              "(paired over problems" + (", seeds resampled" if len(seeds) > 1 else "") + ", 95% bootstrap interval)")
    return {**s, "seeds": seeds, **({"per_seed": per_seed} if len(seeds) > 1 else {})}


def _seed_summary(found, bon) -> dict:
    """One seed's search and its best-of-N cells as JSON-ready dicts (per-problem lists left out)."""
    return {**found.to_dict(), "best_of_n": [{"method": c.method, "accuracy": c.accuracy, "stderr": c.stderr,
                                              "tokens_per_problem": c.tokens, "n_mean": c.detail["n_mean"],
                                              "finished_answers": c.detail["finished_answers"],
                                              "distinct_answers": c.detail["distinct_answers"],
                                              "tokens_per_answer": c.detail["tokens_per_answer"]}
                                             for c in bon]}


def _pooled(per_seed: list[dict], mcts, bons) -> dict:
    """The seeds' summaries (`_seed_summary`) as one: `MEAN_KEYS` averaged, `SUM_KEYS` added up, stderr over
    the problems of their means over the seeds, tokens per finished answer from the means. mcts: [seeds,
    problems] of the search's answers; bons[i]: the same for best-of-N method i."""
    from treedistill.metrics import standard_error

    n = len(per_seed)
    out = {**per_seed[0], **{k: sum(d[k] for d in per_seed) / n for k in MEAN_KEYS},
           **{k: sum(d[k] for d in per_seed) for k in SUM_KEYS}, "stderr": standard_error(mcts.mean(0).tolist())}
    answers = out["finished_answers"]
    out["tokens_per_answer"] = out["tokens_per_problem"] / answers if answers else None
    out["best_of_n"] = []
    for i, rows in enumerate(bons):
        cells = [d["best_of_n"][i] for d in per_seed]
        b = {**cells[0], **{k: sum(c[k] for c in cells) / n
                            for k in ("accuracy", "tokens_per_problem", "n_mean", "finished_answers",
                                      "distinct_answers")}, "stderr": standard_error(rows.mean(0).tolist())}
        b["tokens_per_answer"] = b["tokens_per_problem"] / b["finished_answers"] if b["finished_answers"] else None
        out["best_of_n"].append(b)
    return out
