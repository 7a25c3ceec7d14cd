"""`treedistill bench`: the native engine against HF generate (and, with `--vllm`, vLLM), side by side, as ratios.

- `bench generate`: decode throughput at one batch size, lengths forced (benchmarks/generate.py).
- `bench search`: the MCTS expansion workload on three engines, then the real search at a few tree
  sizes (benchmarks/search.py).
- `bench learn`: the learner's step on a preset's real rollout, packed rows against per-row
  (benchmarks/learn.py).
- `--vllm` (generate, search): a row for the vLLM engine (engine/vllm.py; needs the treedistill[vllm] extra). Its
  start-up (~40 s or more on CPU) is reported apart and not timed.

This module holds the arguments and the dispatch; the workloads are in treedistill/benchmarks/.
"""

from __future__ import annotations

from treedistill.benchmarks.generate import run_generate
from treedistill.benchmarks.learn import LEARN_DEFAULTS, run_learn
from treedistill.benchmarks.search import TREE_SIMS_AUTO, parse_tree_sims, run_search

__all__ = ["TREE_SIMS_AUTO", "add_arguments", "parse_tree_sims", "run"]

HELP = "benchmark generation: native engine vs HF generate (generate | search); the learner: packed vs per-row (learn)"

GENERATE_DEFAULTS = dict(batch=8, prompt_len=64, new_tokens=64)
SEARCH_DEFAULTS = dict(prompt_len=256, breadth=8, depth=6, simulations=24, step_tokens=16)
# The real search's part: tree sizes (simulations per tree) and trees searched in lock-step.
TREE_DEFAULTS = dict(tree_sims="auto", trees=4, tree_parallel=16, tree_k=4)


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
    for p in (gen, srch):
        p.add_argument("--vllm", action="store_true", help="add a row for the vLLM engine (treedistill[vllm] extra)")
        p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
        p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
        p.add_argument("--seed", type=int, default=0, help="seed of prompts and sampling")


RUNS = {"generate": run_generate, "search": run_search, "learn": run_learn}


def run(args) -> dict:
    return RUNS[args.bench](args)
