"""`treedistill sft`: a format warm-up (treedistill/sft.py), a short supervised fine-tune on training
solutions in the environment's text format; writes OUT/final/, a model folder every command takes as
`--model OUT` (or OUT/final)."""

from __future__ import annotations

import sys

from treedistill.commands import add_format_arguments, check_choice, check_counts

HELP = ("format warm-up: fine-tune a model on training solutions in the environment's step/answer format "
        "(GSM8K worked solutions, Countdown solver traces); writes OUT/final")


def add_arguments(parser) -> None:
    from treedistill.sft import SFTConfig

    d = SFTConfig()
    parser.add_argument("--model", default="smollm2-135m",
                        help="preset name, model folder or hub id (default smollm2-135m)")
    parser.add_argument("--env", default="gsm8k", help="environment (default gsm8k)")
    add_format_arguments(parser)
    parser.add_argument("--data", default=None,
                        help="JSONL file (or GSM8K folder) of training problems (default: the environment's train "
                             "split: Countdown's shipped one; GSM8K from the hub through `datasets`)")
    parser.add_argument("--out", required=True, help="run folder; the model is written to OUT/final")
    parser.add_argument("--examples", type=int, default=d.examples,
                        help=f"training solutions learned (default {d.examples})")
    parser.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over them (default {d.epochs})")
    parser.add_argument("--batch", type=int, default=d.batch, help=f"examples per optimizer step (default {d.batch})")
    parser.add_argument("--lr", type=float, default=d.lr,
                        help=f"peak learning rate, 10%% warm-up then linear decay (default {d.lr:g})")
    parser.add_argument("--lora-r", type=int, default=0,
                        help="train a LoRA adapter of this rank (merged into the saved weights); 0 = all weights "
                             "(default 0)")
    parser.add_argument("--max-tokens", type=int, default=d.max_tokens,
                        help=f"prompt + solution tokens at most; longer examples are skipped (default {d.max_tokens})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"seed of the problems drawn and their order (default {d.seed})")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line last")


def _config(args):
    from treedistill.errors import UsageError
    from treedistill.sft import SFTConfig

    cfg = SFTConfig(examples=args.examples, epochs=args.epochs, batch=args.batch, lr=args.lr,
                    max_tokens=args.max_tokens, seed=args.seed)
    problems = cfg.errors()
    if problems:
        raise UsageError("; ".join(f"--{p.replace('_', '-')}" for p in problems))
    return cfg


def check_arguments(args) -> None:
    """Refuse bad values before anything is loaded."""
    from pathlib import Path

    from treedistill.checkpoint import check_replaceable
    from treedistill.errors import UsageError
    from treedistill.models.load import FINAL_FOLDER

    check_counts(args, ("examples", "epochs", "batch", "max_tokens"))
    if args.lora_r < 0:
        raise UsageError(f"--lora-r must be >= 0, got {args.lora_r}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    check_choice(args, "device", ("cpu", "cuda"))
    _config(args)
    check_replaceable(Path(args.out) / FINAL_FOLDER)  # before the model is loaded, not when saving


def _progress(every: int = 10):
    def report(step: int, steps: int, metrics: dict) -> None:
        if step % every == 0 or step == steps:
            print(f"step {step}/{steps}: " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
                  file=sys.stderr, flush=True)

    return report


def run(args) -> dict:
    check_arguments(args)
    from pathlib import Path

    from treedistill.datasets import load_split
    from treedistill.envs import get_env
    from treedistill.errors import UsageError
    from treedistill.models.load import FINAL_FOLDER, load_policy
    from treedistill.sft import sft, solution_examples

    cfg = _config(args)
    env = get_env(args.env, step=args.step, answer=args.answer)
    if getattr(env, "solution", None) is None:
        raise UsageError(f"environment {args.env!r} writes no training solutions (it has no `solution` hook)")
    problems = load_split(args.env, "train", path=args.data)
    lora = {"r": args.lora_r, "alpha": 2 * args.lora_r, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                             "gate_proj", "up_proj", "down_proj"]}
    policy = load_policy(args.model, device=args.device, dtype=args.dtype, value_head=False,
                         lora=lora if args.lora_r else None)
    examples, counts = solution_examples(policy, env, problems, cfg)
    if not examples:
        raise UsageError(f"no training example: of {counts['drawn']} problems drawn, {counts['no_solution']} have no "
                         f"solution and {counts['too_long']} are longer than --max-tokens {cfg.max_tokens}")
    print(f"sft {args.model} on {len(examples)} {args.env} solutions (steps: {args.step}, answer: {args.answer}), "
          f"{cfg.epochs} epoch(s), {cfg.steps} steps at most, batch {cfg.batch}, lr {cfg.lr:g}"
          + (f", LoRA r={args.lora_r}" if args.lora_r else ", all weights"), flush=True)
    summary = sft(policy, examples, cfg, progress=_progress())
    final = Path(args.out) / FINAL_FOLDER
    meta = {"sft": {"base_model": args.model, "env": args.env, "step": args.step, "answer": args.answer,
                    "lora_r": args.lora_r, "examples": summary["examples"], "steps": summary["steps"]}}
    policy.save(final, meta=meta)
    out = {"model": args.model, "env": args.env, "step": args.step, "answer": args.answer, "lora_r": args.lora_r,
           "out": str(final), **counts, **summary}
    print(f"  {summary['steps']} steps on {summary['examples']} examples ({summary['completion_tokens']} solution "
          f"tokens, {summary['tokens']} in all): loss {summary['loss_first']:.3f} -> {summary['loss_last_10_mean']:.3f} "
          f"(mean of the last 10 steps)")
    print(f"  wall {summary['wall_s']:.0f} s, {summary['learner_tokens_per_s']:.0f} tokens/s")
    print(f"saved to {final} (use --model {args.out})")
    return out
