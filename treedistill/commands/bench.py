"""`treedistill bench`: the native engine against HF generate (and, with `--vllm`, vLLM), side by side, as ratios.

- `bench generate`: decode throughput at one batch size, lengths forced (no end-of-sequence):
  ours vs HF `generate` with its dynamic cache and with `cache_implementation="static"`.
- `bench search`: the MCTS expansion workload. A tree grows from one prompt: each simulation descends
  from the root through random children to an unexpanded node, samples K steps of up to 16 tokens
  from its prefix and scores the K children with the value head. Run three ways on the same tree
  shape: native engine with the prefix cache, native engine without it (every prefix re-encoded, as
  HF generate does), and the HF-generate engine. The selection is random descent rather than PUCT,
  so the workload's shape (breadth K, depth d, prefixes that grow step by step) is that of the
  search without depending on the value head's numbers.
  Then, with `--tree-sims` (on by default for the embedded tiny model), the REAL search: the search
  core (pUCT, parallel descents, virtual loss) driven by the model through the rollout bridge on
  Countdown test prompts, a few trees in lock-step, once per tree size: simulations per second, the
  share of the search's wall time spent in tree bookkeeping (selection, tree updates, backup) vs in
  the model calls, and the cost per simulation, total and bookkeeping only, per tree size. The
  bookkeeping per simulation must not grow with the tree: a simulation walks one root-to-leaf path.
- `--vllm` (both): a row for the vLLM engine (engine/vllm.py; needs the treedistill[vllm] extra). Its
  start-up (~40 s or more on CPU) is reported apart and not timed; in `generate` its prefix cache is
  emptied before every timed call, so each call encodes fresh prompts as the others do.
"""

from __future__ import annotations

import random
import time

from treedistill.metrics import counter_delta

HELP = "benchmark generation: native engine vs HF generate (generate | search); the learner: packed vs per-row (learn)"

GENERATE_DEFAULTS = dict(batch=8, prompt_len=64, new_tokens=64)
SEARCH_DEFAULTS = dict(prompt_len=256, breadth=8, depth=6, simulations=24, step_tokens=16)
# The real search's part: tree sizes (simulations per tree) and trees searched in lock-step.
TREE_DEFAULTS = dict(tree_sims="auto", trees=4, tree_parallel=16, tree_k=4)
TREE_SIMS_AUTO = {"tiny": (16, 1600)}  # --tree-sims auto: models it runs for by default


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="WHAT")
    sub.required = True
    gen = sub.add_parser("generate", help="decode throughput: ours vs HF generate (dynamic and static cache)")
    gen.add_argument("--model", default="tiny", help="preset name or model folder (default tiny)")
    gen.add_argument("--batch", type=int, default=GENERATE_DEFAULTS["batch"], help="rows decoded together")
    gen.add_argument("--prompt-len", type=int, default=GENERATE_DEFAULTS["prompt_len"], help="prompt tokens per row")
    gen.add_argument("--new-tokens", type=int, default=GENERATE_DEFAULTS["new_tokens"], help="tokens generated per row")
    gen.add_argument("--no-static", action="store_true", help="skip HF generate with the static cache")
    gen.add_argument("--repeats", type=int, default=2, help="timed runs per engine (best is kept)")
    gen.add_argument("--json", action="store_true", help="print the result dict as JSON on the last line")
    srch = sub.add_parser("search", help="MCTS expansion workload: prefix cache vs re-encoding vs HF generate")
    srch.add_argument("--model", default="tiny", help="preset name or model folder (default tiny)")
    srch.add_argument("--prompt-len", type=int, default=SEARCH_DEFAULTS["prompt_len"], help="root prompt tokens")
    srch.add_argument("--breadth", type=int, default=SEARCH_DEFAULTS["breadth"], help="K children sampled per expansion")
    srch.add_argument("--depth", type=int, default=SEARCH_DEFAULTS["depth"], help="deepest node expanded")
    srch.add_argument("--simulations", type=int, default=SEARCH_DEFAULTS["simulations"], help="expansions per run")
    srch.add_argument("--step-tokens", type=int, default=SEARCH_DEFAULTS["step_tokens"], help="max tokens of one step")
    srch.add_argument("--no-hf", action="store_true", help="skip the HF-generate baseline")
    srch.add_argument("--tree-sims", default=TREE_DEFAULTS["tree_sims"],
                      help="real search: simulations per tree, comma-separated (e.g. 16,1600); 'off' skips it; "
                           "'auto' (default): 16,1600 for the tiny model, off for others")
    srch.add_argument("--trees", type=int, default=TREE_DEFAULTS["trees"],
                      help="real search: Countdown problems searched in lock-step (default 4)")
    srch.add_argument("--tree-parallel", type=int, default=TREE_DEFAULTS["tree_parallel"],
                      help="real search: descents per tree per round, W (default 16)")
    srch.add_argument("--tree-k", type=int, default=TREE_DEFAULTS["tree_k"],
                      help="real search: sampled steps per expansion, K (default 4)")
    srch.add_argument("--json", action="store_true", help="print the result dict as JSON on the last line")
    _add_learn_arguments(sub)
    for p in (gen, srch):
        p.add_argument("--vllm", action="store_true", help="add a row for the vLLM engine (treedistill[vllm] extra)")
        p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
        p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
        p.add_argument("--seed", type=int, default=0, help="seed of prompts and sampling")


def _check_positive(**values) -> None:
    from treedistill.errors import UsageError

    for name, v in values.items():
        if v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


class _Clock:
    """Wall time that waits for the device (CUDA kernels run asynchronously)."""

    def __init__(self, device):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self) -> float:
        self.sync()
        return time.perf_counter()


def _load(args):
    from treedistill.models.load import load_policy

    return load_policy(args.model, dtype=args.dtype, device=args.device, value_head=True)


def _prompts(vocab: int, batch: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    top = min(vocab, 256)  # byte-range ids: plain text for every tokenizer the presets use
    return [[rng.randrange(top) for _ in range(length)] for _ in range(batch)]


# ---------------------------------------------------------------------------------------- generate


def _hf_generate_fn(policy, prompts, new_tokens, cache_implementation):
    import torch

    model, pad = policy.model, policy.tokenizer.pad_token_id or 0
    ids = torch.tensor(prompts, device=policy.device)
    opts = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, top_k=0, top_p=1.0,
                temperature=1.0, pad_token_id=pad, attention_mask=torch.ones_like(ids))
    if cache_implementation:
        opts["cache_implementation"] = cache_implementation

    def go():
        with torch.no_grad():
            model.generate(ids, **opts)

    return go


def _time(fn, clock, repeats: int) -> tuple[float, float]:
    """(first call seconds, best of `repeats` later calls)."""
    t0 = clock()
    fn()
    first = clock() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return first, best


def run_generate(args) -> dict:
    import torch

    from treedistill.engine.native import NativeEngine

    _check_positive(batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats)
    policy = _load(args)
    clock = _Clock(policy.device)
    prompts = _prompts(policy.model.config.vocab_size, args.batch, args.prompt_len, args.seed)
    tokens = args.batch * args.new_tokens
    # eos off and no prefix cache: the same forced-length, fresh-prompt work as HF generate.
    ours = NativeEngine(policy, cache_tokens=0, eos_token_ids=())

    def native_fn(engine):
        return lambda: engine.sample(prompts, 1, max_new_tokens=args.new_tokens, temperature=1.0, seed=args.seed)

    rows = {}
    runners = {"native": native_fn(ours)}
    startup = {}
    if args.vllm:
        runners["vllm"] = _vllm_generate_fn(policy, prompts, args, startup)
    if ours.decode != "eager":  # on CUDA: the same loop without CUDA graphs, to show what they buy
        runners["native_eager"] = native_fn(NativeEngine(policy, cache_tokens=0, eos_token_ids=(), decode="eager"))
    runners["hf_dynamic"] = _hf_generate_fn(policy, prompts, args.new_tokens, None)
    if not args.no_static:
        runners["hf_static"] = _hf_generate_fn(policy, prompts, args.new_tokens, "static")
    for name, fn in runners.items():
        torch.manual_seed(args.seed)
        try:
            first, best = _time(fn, clock, args.repeats)
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as err:
            # HF's static cache compiles the model; where that is unsupported, report it and go on.
            rows[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
            continue
        rows[name] = {"first_call_s": round(first, 4), "seconds": round(best, 4),
                      "tokens_per_s": round(tokens / best, 1),
                      "ms_per_step": round(1e3 * best / args.new_tokens, 3)}
    base = rows["native"]["seconds"]
    for row in rows.values():
        if "seconds" in row:
            row["native_speedup"] = round(row["seconds"] / base, 2)
    print(f"bench generate: model={args.model} device={policy.device} batch={args.batch} decode={ours.decode} "
          f"prompt={args.prompt_len} new={args.new_tokens} (sampling, lengths forced; "
          f"ms/step = whole call / new tokens, prefill included)")
    if startup:
        print(f"vllm start-up (not timed below): {startup['vllm_startup_s']:.1f} s")
    print(f"{'engine':<14}{'tok/s':>12}{'ms/step':>10}{'first call s':>14}{'ours is x faster':>18}")
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:<14}  {row['error']}")
        else:
            print(f"{name:<14}{row['tokens_per_s']:>12.1f}{row['ms_per_step']:>10.3f}{row['first_call_s']:>14.3f}"
                  f"{row['native_speedup']:>18.2f}")
    return {"bench": "generate", "model": args.model, "device": str(policy.device), "batch": args.batch,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
            "decode": ours.decode, "cuda_graphs": ours.use_graphs, "engines": rows, **startup}


def _vllm_generate_fn(policy, prompts, args, startup: dict):
    """The vLLM engine on the same forced-length work (eos off); its prefix cache emptied before every
    call. Records its start-up seconds in `startup`."""
    from treedistill.engine import make_engine

    engine = make_engine(policy, "vllm", eos_token_ids=())
    startup["vllm_startup_s"] = round(engine.startup_seconds, 1)

    def go():
        engine.clear_cache()
        engine.sample(prompts, 1, max_new_tokens=args.new_tokens, temperature=1.0, seed=args.seed)

    return go


# ------------------------------------------------------------------------------------------ search


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

    _check_positive(trees=args.trees, tree_parallel=args.tree_parallel, tree_k=args.tree_k)
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
    return {"workload": "real search: search/mcts.py driven by the model through rollout/mcts.py, "
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

    _check_positive(prompt_len=args.prompt_len, breadth=args.breadth, depth=args.depth,
                    simulations=args.simulations, step_tokens=args.step_tokens,
                    trees=args.trees, tree_parallel=args.tree_parallel, tree_k=args.tree_k)
    tree_sizes = parse_tree_sims(args.tree_sims, args.model)
    policy = _load(args)
    clock = _Clock(policy.device)
    root = _prompts(policy.model.config.vocab_size, 1, args.prompt_len, args.seed)[0]
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


# ------------------------------------------------------------------------------------------- learn


def _add_learn_arguments(sub) -> None:
    from treedistill.benchmarks.learn import LEARN_DEFAULTS

    lrn = sub.add_parser("learn", help="the learner's step on a preset's real rollout: packed rows vs per-row")
    lrn.add_argument("--preset", default=LEARN_DEFAULTS["preset"],
                     help=f"training preset whose rollout and learn step run (default {LEARN_DEFAULTS['preset']})")
    lrn.add_argument("--trees", type=int, default=LEARN_DEFAULTS["trees"],
                     help="training problems rolled out (trees for mcts-tree; default 4)")
    lrn.add_argument("--repeats", type=int, default=LEARN_DEFAULTS["repeats"], help="timed learn steps per way (median)")
    lrn.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    lrn.add_argument("--device", default=None, help="cpu | cuda (default: the preset's)")
    lrn.add_argument("--seed", type=int, default=0, help="seed of the problems' rollout and of the run")
    lrn.add_argument("--json", action="store_true", help="print the result dict as JSON on the last line")


def run_learn(args) -> dict:
    from treedistill.benchmarks.learn import learn_workload

    _check_positive(trees=args.trees, repeats=args.repeats)
    r = learn_workload(preset=args.preset, trees=args.trees, repeats=args.repeats, seed=args.seed,
                       device=args.device, overrides=tuple(args.set))
    print(f"bench learn: {r['workload']}; {r['rows']} rows, {r['row_tokens']} row tokens")
    print(f"{'way':<9}{'s/tree':>10}{'GFLOP/tree':>12}{'positions':>11}  update metrics")
    for name in ("per_row", "packed"):
        w = r[name]
        metrics = " ".join(f"{k}={v:.6g}" for u in w["updates"][:1] for k, v in u.items())
        print(f"{name:<9}{w['seconds_per_tree']:>10.4f}{w['flops_per_tree'] / 1e9:>12.3f}"
              f"{w['train_positions']:>11}  {metrics}")
    print(f"per-row / packed: flops x{r['flops_ratio']:.2f}, seconds x{r['seconds_ratio']:.2f} "
          f"(largest metric difference {r['max_metric_difference']:.2e})")
    return r


RUNS = {"generate": run_generate, "search": run_search, "learn": run_learn}


def run(args) -> dict:
    return RUNS[args.bench](args)
