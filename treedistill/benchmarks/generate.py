"""`bench generate`: decode throughput at one batch size, lengths forced (no end-of-sequence): the
native engine vs HF `generate` with its dynamic cache and with `cache_implementation="static"` (and,
with `--vllm`, the vLLM engine, its start-up reported apart and not timed, its prefix cache emptied
before every timed call so each call encodes fresh prompts as the others do)."""

from __future__ import annotations

from treedistill.benchmarks.common import Clock, check_positive, load_bench_policy, random_prompts

__all__ = ["run_generate"]


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

    check_positive(batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats)
    policy = load_bench_policy(args)
    clock = Clock(policy.device)
    prompts = random_prompts(policy.model.config.vocab_size, args.batch, args.prompt_len, args.seed)
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
