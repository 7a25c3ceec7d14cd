"""`bench search`: the MCTS expansion workload, then the real search.

The expansion workload: a tree grows from one prompt: each simulation descends from the root through
random children to an unexpanded node, samples K steps of up to 16 tokens from its prefix and scores
the K children with the value head. Run three ways on the same tree shape: native engine with the
prefix cache, native engine without it (every prefix re-encoded, as HF generate does), and the
HF-generate engine (and, with `--vllm`, the vLLM engine). The selection is random descent rather
than PUCT, so the workload's shape (breadth K, depth d, prefixes that grow step by step) is that of
the search without depending on the value head's numbers.

Then, with `--tree-sims` (on by default for the embedded tiny model), the REAL search: the search
core (pUCT, parallel descents, virtual loss) driven by the model through the rollout bridge on
Countdown test prompts, a few trees in lock-step, once per tree size: simulations per second, the
share of the search's wall time spent in tree bookkeeping (selection, tree updates, backup) vs in
the model calls, and the cost per simulation, total and bookkeeping only, per tree size. The
bookkeeping per simulation must not grow with the tree: a simulation walks one root-to-leaf path.
"""

from __future__ import annotations

import random

from treedistill.benchmarks.common import Clock, check_positive, load_bench_policy, random_prompts
from treedistill.metrics import counter_delta

__all__ = ["TREE_SIMS_AUTO", "expansion_workload", "parse_tree_sims", "run_search", "run_tree_search",
           "tree_search_workload"]

TREE_SIMS_AUTO = {"tiny": (16, 1600)}  # --tree-sims auto: models it runs for by default


def expansion_workload(engine, root: list[int], *, breadth: int, depth: int, simulations: int,
                       step_tokens: int, seed: int, stop: tuple[str, ...], use_value: bool, clock) -> dict:
    """Grow one tree with `engine`: `simulations` expansions of `breadth` children each.

    Each simulation descends from the root through random (seeded) children to an unexpanded node of
    depth < `depth` (restarting from the root at a dead end), samples the children's steps from its
    prefix and, when `use_value`, scores the children's prefixes. Returns timing and counters.
    """
    rng = random.Random(seed)
    children: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    start = clock()
    before = engine.counters.snapshot()
    expanded = 0
    while expanded < simulations:
        node, d = (), 0
        while node in children and d < depth:
            node, d = rng.choice(children[node]), d + 1
        if node in children:  # depth limit reached on an expanded path: start again
            continue
        prefix = root + [t for step in node for t in step] if node else list(root)
        node_key = node
        samples = engine.sample([prefix], breadth, max_new_tokens=step_tokens, temperature=1.0,
                                stop=stop, seed=seed + expanded)[0]
        kids = [node_key + (s.tokens,) for s in samples]
        if use_value:
            engine.value([prefix + list(s.tokens) for s in samples])
        children[node_key] = kids
        expanded += 1
    seconds = clock() - start
    delta = counter_delta(before, engine.counters.snapshot())
    processed = delta["prompt_tokens"] + delta["scored_tokens"]
    return {"seconds": round(seconds, 4), "simulations_per_s": round(simulations / seconds, 3),
            "generated_tokens": delta["generated_tokens"], "prompt_tokens": delta["prompt_tokens"],
            "scored_tokens": delta["scored_tokens"], "cached_prompt_tokens": delta["cached_prompt_tokens"],
            "forward_calls": delta["forward_calls"],
            "prompt_tokens_per_generated_token": round(processed / max(1, delta["generated_tokens"]), 3)}


def parse_tree_sims(text: str, model: str) -> tuple[int, ...]:
    """--tree-sims: 'off' -> (), 'auto' -> TREE_SIMS_AUTO.get(model, ()), '16,1600' -> (16, 1600)."""
    from treedistill.errors import UsageError

    text = str(text).strip().lower()
    if text == "off":
        return ()
    if text == "auto":
        return TREE_SIMS_AUTO.get(str(model), ())
    try:
        sims = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"--tree-sims must be 'auto', 'off' or comma-separated integers, got {text!r}") from None
    if not sims or any(s < 1 for s in sims):
        raise UsageError(f"--tree-sims must be positive integers, got {text!r}")
    return sims


def tree_search_workload(engine, policy, problems, *, simulations: int, parallel: int, k: int, seed: int) -> dict:
    """The real search on `problems` (one tree each, in lock-step) with `simulations` per tree: pUCT
    with the search's defaults otherwise, K steps at T = 0.8, terminal nodes scored by the environment
    (the training setting). Returns simulations per second, the bookkeeping / model split of the
    search's wall time and the costs per simulation. The completion of incomplete paths is excluded:
    it is sampling, not search."""
    from treedistill.envs import get_env
    from treedistill.rollout import search_problems
    from treedistill.search import SearchSettings

    cfg = SearchSettings(simulations=simulations, parallel=min(parallel, simulations), select="puct", k_children=k,
                         seed=seed)
    outcomes = search_problems(engine, policy, get_env("countdown"), problems, search=cfg, seed=seed)
    batch = outcomes[0].batch
    sims = sum(o.tree.stats.simulations for o in outcomes)
    edges = sum(o.tree.stats.selections for o in outcomes)
    return {"simulations_per_tree": simulations, "trees": len(problems), "simulations": sims,
            "search_s": round(batch.search_s, 4), "model_s": round(batch.model_s, 4),
            "bookkeeping_s": round(batch.bookkeeping_s, 4), "bookkeeping_share": round(batch.bookkeeping_share, 4),
            "simulations_per_s": round(sims / batch.search_s, 2) if batch.search_s > 0 else None,
            "ms_per_simulation": round(1e3 * batch.search_s / sims, 4),
            "model_ms_per_simulation": round(1e3 * batch.model_s / sims, 4),
            "bookkeeping_us_per_simulation": round(1e6 * batch.bookkeeping_s / sims, 2),
            "bookkeeping_us_per_edge": round(1e6 * batch.bookkeeping_s / max(edges, 1), 3),
            "edges_per_simulation": round(edges / sims, 2), "rounds": batch.rounds,
            "expand_calls": batch.expand_calls, "nodes_per_tree": round(sum(len(o.tree) for o in outcomes)
                                                                       / len(outcomes), 1),
            "generated_tokens": batch.engine.get("generated_tokens", 0),
            "completion_s": round(batch.completion_s, 4)}


def run_tree_search(args, policy, sizes: tuple[int, ...]) -> dict:
    """The real search at each tree size in `sizes`, on the first `--trees` Countdown test problems;
    a 2-simulation warm-up first. `cost_growth` is the bookkeeping per simulation at the largest size
    over that at the smallest (about 1 when a simulation costs what its path costs)."""
    from treedistill.datasets import load_split
    from treedistill.engine import make_engine

    check_positive(trees=args.trees, tree_parallel=args.tree_parallel, tree_k=args.tree_k)
    problems = load_split("countdown", "test")[:args.trees]
    engine = make_engine(policy, "native")
    opts = dict(parallel=args.tree_parallel, k=args.tree_k, seed=args.seed)
    tree_search_workload(engine, policy, problems, simulations=2, **opts)
    runs = {}
    for sims in sizes:
        engine.clear_cache()
        runs[str(sims)] = tree_search_workload(engine, policy, problems, simulations=sims, **opts)
    lo, hi = runs[str(min(sizes))], runs[str(max(sizes))]
    growth = hi["bookkeeping_us_per_simulation"] / lo["bookkeeping_us_per_simulation"] \
        if lo["bookkeeping_us_per_simulation"] > 0 else None
    return {"workload": "real search: search/mcts.py driven by the model through rollout/tree_search.py, "
                        "pUCT, Countdown test prompts, terminal nodes scored by the environment",
            "trees": len(problems), "parallel": args.tree_parallel, "k": args.tree_k, "runs": runs,
            "bookkeeping_share_max": max(r["bookkeeping_share"] for r in runs.values()),
            "cost_growth": round(growth, 3) if growth is not None else None}


def _print_tree_search(ts: dict) -> None:
    print(f"real search: {ts['trees']} Countdown trees in lock-step, pUCT, W={ts['parallel']}, K={ts['k']} "
          "(search wall time = bookkeeping + model calls; completions excluded)")
    print(f"{'sims/tree':>10}{'sims/s':>10}{'bookkeeping':>13}{'ms/sim':>10}{'model ms/sim':>14}"
          f"{'book us/sim':>13}{'book us/edge':>14}{'nodes/tree':>12}")
    for r in ts["runs"].values():
        print(f"{r['simulations_per_tree']:>10}{r['simulations_per_s']:>10.1f}{100 * r['bookkeeping_share']:>12.1f}%"
              f"{r['ms_per_simulation']:>10.3f}{r['model_ms_per_simulation']:>14.3f}"
              f"{r['bookkeeping_us_per_simulation']:>13.1f}{r['bookkeeping_us_per_edge']:>14.2f}"
              f"{r['nodes_per_tree']:>12.1f}")
    print(f"bookkeeping per simulation, largest tree / smallest: {ts['cost_growth']}x; "
          f"largest bookkeeping share {100 * ts['bookkeeping_share_max']:.1f}%")


def run_search(args) -> dict:
    import torch

    from treedistill.engine import make_engine

    check_positive(prompt_len=args.prompt_len, breadth=args.breadth, depth=args.depth,
                    simulations=args.simulations, step_tokens=args.step_tokens,
                    trees=args.trees, tree_parallel=args.tree_parallel, tree_k=args.tree_k)
    tree_sizes = parse_tree_sims(args.tree_sims, args.model)
    policy = load_bench_policy(args)
    clock = Clock(policy.device)
    root = random_prompts(policy.model.config.vocab_size, 1, args.prompt_len, args.seed)[0]
    engines = {"native_cache": make_engine(policy, "native"),
               "native_no_cache": make_engine(policy, "native", cache_tokens=0)}
    if not args.no_hf:
        engines["hf_generate"] = make_engine(policy, "hf")
    if args.vllm:
        engines["vllm"] = make_engine(policy, "vllm")
    opts = dict(breadth=args.breadth, depth=args.depth, simulations=args.simulations,
                step_tokens=args.step_tokens, seed=args.seed, stop=("</step>",),
                use_value=policy.value_head is not None, clock=clock)
    # Warm-up (allocator, first-call costs) on a small tree, then the timed run on a fresh cache.
    rows = {}
    for name, engine in engines.items():
        expansion_workload(engine, root, **{**opts, "simulations": 2})
        engine.clear_cache()
        torch.manual_seed(args.seed)
        rows[name] = expansion_workload(engine, root, **opts)
    base = rows["native_cache"]["seconds"]
    for row in rows.values():
        row["native_cache_speedup"] = round(row["seconds"] / base, 2)
    result = {"bench": "search", "model": args.model, "device": str(policy.device),
              "workload": "synthetic MCTS expansion (random descent; the search core is not driven)",
              "prompt_len": args.prompt_len, "breadth": args.breadth, "depth": args.depth,
              "simulations": args.simulations, "step_tokens": args.step_tokens,
              "value_head": policy.value_head is not None, "threads": torch.get_num_threads(),
              "engines": rows,
              "speedup": rows["native_no_cache"]["native_cache_speedup"]}
    if args.vllm:
        result["vllm_startup_s"] = round(engines["vllm"].startup_seconds, 1)
        # one push of the weights as they are: the time is the copy (serialise, send, reload, cache reset)
        result["vllm_weight_push_s"] = round(engines["vllm"].push_weights(), 4)
    if "hf_generate" in rows:
        result["speedup_vs_hf_generate"] = rows["hf_generate"]["native_cache_speedup"]
    print(f"bench search: model={args.model} device={policy.device} prompt={args.prompt_len} K={args.breadth} "
          f"depth<={args.depth} simulations={args.simulations} step<={args.step_tokens} tokens "
          f"(synthetic expansion workload; value head {'on' if result['value_head'] else 'off'})")
    if args.vllm:
        print(f"vllm start-up (not timed): {result['vllm_startup_s']} s; one weight push: "
              f"{result['vllm_weight_push_s']} s")
    print(f"{'engine':<16}{'sims/s':>10}{'prompt tok/gen tok':>20}{'cached tok':>12}{'cache is x faster':>19}")
    for name, row in rows.items():
        print(f"{name:<16}{row['simulations_per_s']:>10.2f}{row['prompt_tokens_per_generated_token']:>20.3f}"
              f"{row['cached_prompt_tokens']:>12}{row['native_cache_speedup']:>19.2f}")
    if tree_sizes:
        torch.manual_seed(args.seed)
        result["tree_search"] = run_tree_search(args, policy, tree_sizes)
        _print_tree_search(result["tree_search"])
    return result
