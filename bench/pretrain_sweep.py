"""Pretraining recipes x seeds, each scored on training problems: how far a recipe's well-formed share
and accuracy move with the seed, measured on many runs at once (one GPU, one process per run).

    python bench/pretrain_sweep.py --recipes defaults,ema_miss25 --seeds 0-3 --workers 12 --out DIR

Every run trains the tiny model with `treedistill.pretrain` (value head not fitted: it does not
change the samples), then samples k completions per problem at T = 0.2 with the native engine in
float32 on TRAINING problems (train split [first, first + problems): never the test split) and
writes DIR/<recipe>_s<seed>.json as soon as it ends, so a run cut short keeps what finished.
Runs are ordered seed by seed, so every recipe gets its first seeds before any gets its last.
`--device cpu --steps 20 --problems 8` is a dry run of the same code on a CPU.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name -> PretrainConfig overrides. "defaults" is the shipped checkpoint's recipe; the others start
# from the first checkpoint's (2026-11-26, the recipes of bench/RESULTS.md's sweep table).
FIRST = {"step_format": "numbers", "miss_share": 0.0, "min_lr_ratio": 0.1, "ema": 0.0}
EMA = {**FIRST, "min_lr_ratio": 0.0, "ema": 0.995}
RECIPES: dict[str, dict] = {
    "defaults": {},
    "first": FIRST,
    "ema": EMA,
    "ema_miss10": {**EMA, "miss_share": 0.10},
    "ema_miss25": {**EMA, "miss_share": 0.25},
    "ema_solver10": {**EMA, "solver_share": 0.10},
    "ema_solver20": {**EMA, "solver_share": 0.20},
    "ema_lr2": {**EMA, "lr": 2e-3},
    "ema_b96": {**EMA, "batch": 96, "steps": 1000},
    "ema_miss10_solver10": {**EMA, "miss_share": 0.10, "solver_share": 0.10},
    "ema_lr2_miss10": {**EMA, "lr": 2e-3, "miss_share": 0.10},
}


def parse_seeds(text: str) -> list[int]:
    if "-" in text:
        low, high = text.split("-")
        return list(range(int(low), int(high) + 1))
    return [int(s) for s in text.split(",")]


def one_run(job: dict) -> dict:
    """One recipe and seed: train, score, write its record (an error is recorded, not raised)."""
    try:
        return _run(job)
    except Exception as exc:  # one failed run must not stop the others
        return _write(job, {"recipe": job["recipe"], "seed": job["seed"], "error": f"{type(exc).__name__}: {exc}"})


def _write(job: dict, record: dict) -> dict:
    """DIR/<recipe>_s<seed>.json and a line on stdout, as soon as the run ends."""
    path = Path(job["out"]) / f"{job['recipe']}_s{job['seed']}.json"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    print(json.dumps(record), flush=True)
    return record


def _run(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from treedistill.datasets import load_split
    from treedistill.engine import make_engine
    from treedistill.envs import get_env
    from treedistill.evaluate import evaluate
    from treedistill.models.load import load_policy
    from treedistill.pretrain import PretrainConfig, pretrain, save_model_folder

    overrides = dict(RECIPES[job["recipe"]])
    if job["steps"] is not None:
        overrides["steps"] = job["steps"]
    cfg = PretrainConfig(seed=job["seed"], value_fit=False, device=job["device"], **overrides)
    start = time.perf_counter()
    result = pretrain(cfg, exclude=load_split("countdown", "test"))
    train_s = time.perf_counter() - start
    problems = load_split("countdown", "train")[job["first"]:job["first"] + job["problems"]]
    with tempfile.TemporaryDirectory() as folder:
        save_model_folder(result, folder)
        policy = load_policy(folder, device=job["device"], dtype="float32", value_head=False)
        ev = evaluate(make_engine(policy, "native"), policy, get_env("countdown"), problems, k=job["k"],
                      temperature=0.2, max_new_tokens=512, seed=0)
    record = {"recipe": job["recipe"], "seed": job["seed"], "overrides": overrides,
              "final_loss": result.summary()["final_loss"], "train_seconds": round(train_s, 1),
              "well_formed": ev.format_rate, "accuracy": ev.accuracy, "stderr": ev.stderr,
              "pass_at_k": ev.pass_at_k, "problems": len(problems), "k": job["k"],
              "eval_seconds": round(ev.seconds, 1), "device": job["device"]}
    return _write(job, record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma list of {', '.join(RECIPES)}")
    parser.add_argument("--seeds", default="0-3", help="'0-3' or '0,5,7'")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=None, help="override every recipe's steps (dry runs)")
    parser.add_argument("--first", type=int, default=1000, help="first training problem scored")
    parser.add_argument("--problems", type=int, default=400)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--out", default=os.environ.get("OUT", "sweep_out"))
    args = parser.parse_args()
    recipes = args.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipes {unknown}: choose from {', '.join(RECIPES)}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    jobs = [{"recipe": r, "seed": s, "device": args.device, "steps": args.steps, "first": args.first,
             "problems": args.problems, "k": args.k, "out": args.out}
            for s in parse_seeds(args.seeds) for r in recipes]
    with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
        records = list(pool.imap_unordered(one_run, jobs))
    by_recipe: dict[str, list[dict]] = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        if "error" not in r:
            by_recipe.setdefault(r["recipe"], []).append(r)
    summary = {name: {"seeds": [r["seed"] for r in rs],
                      "well_formed": [round(100 * r["well_formed"], 1) for r in rs],
                      "accuracy": [round(100 * r["accuracy"], 2) for r in rs]}
               for name, rs in by_recipe.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
