"""`treedistill env`: versions, device and thread count."""

from __future__ import annotations

import platform

HELP = "print the versions of Python, torch and transformers, the device and the thread count"


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")


def run(args) -> dict:
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": "cuda" if cuda else "cpu",
        "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    for key, value in info.items():
        print(f"{key:13s} {value}")
    return info
