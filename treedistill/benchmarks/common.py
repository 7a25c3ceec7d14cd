"""What every benchmark uses: argument checks, a clock that waits for the device, the policy, prompts."""

from __future__ import annotations

import random
import time

__all__ = ["Clock", "check_positive", "load_bench_policy", "random_prompts"]


def check_positive(**values) -> None:
    from treedistill.errors import UsageError

    for name, v in values.items():
        if v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


class Clock:
    """Wall time that waits for the device (CUDA kernels run asynchronously)."""

    def __init__(self, device):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self) -> float:
        self.sync()
        return time.perf_counter()


def load_bench_policy(args):
    from treedistill.models.load import load_policy

    return load_policy(args.model, dtype=args.dtype, device=args.device, value_head=True)


def random_prompts(vocab: int, batch: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    top = min(vocab, 256)  # byte-range ids: plain text for every tokenizer the presets use
    return [[rng.randrange(top) for _ in range(length)] for _ in range(batch)]
