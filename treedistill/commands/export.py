"""`treedistill export`: a run's checkpoint as a model folder (what every run writes as RUN/final/ at
its end), for `AutoModelForCausalLM.from_pretrained`, serving, publishing or `treedistill eval --model`."""

from __future__ import annotations

import time

HELP = ("write a run's checkpoint as a Hugging Face model folder (model, tokenizer, chat template, value head); "
        "LoRA: adapter merged, or --adapter-only")


def add_arguments(parser) -> None:
    parser.add_argument("run", metavar="RUN", help="run folder (or one of its checkpoint folders)")
    parser.add_argument("--step", type=int, default=None,
                        help="the checkpoint of this step (default: the newest complete one)")
    parser.add_argument("--out", required=True, help="model folder to write (a folder already there is replaced only when empty or written by treedistill)")
    parser.add_argument("--adapter-only", action="store_true",
                        help="LoRA runs: write the adapter alone (peft's files) instead of merging it into the weights")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line last")


def run(args) -> dict:
    from treedistill.errors import UsageError
    from treedistill.export import checkpoint_at, export_checkpoint

    if args.step is not None and args.step < 0:
        raise UsageError(f"--step must be >= 0, got {args.step}")
    t0 = time.perf_counter()
    ckpt = checkpoint_at(args.run, args.step)
    result = export_checkpoint(ckpt, args.out, adapter_only=args.adapter_only)
    result["seconds"] = time.perf_counter() - t0
    how = {"merged": ", LoRA adapter merged", "adapter": ", LoRA adapter only", None: ""}[result["lora"]]
    print(f"step {result['step']} of {ckpt.parent.parent} -> {result['out']}{how} "
          f"({len(result['files'])} files, {result['seconds']:.1f} s)")
    return result
