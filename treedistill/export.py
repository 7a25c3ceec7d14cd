"""A trained policy as a model folder: from a run's checkpoint (state dicts) to a folder that
`transformers.AutoModelForCausalLM.from_pretrained`, serving tools and `treedistill eval --model` read.

Every run ends by writing RUN/final/ (`write_final`, called by `runs.finish_run`, which both the
one-process loop and the Ray loop end with); `treedistill export RUN [--step N] --out DIR` writes one
from any complete checkpoint (`export_checkpoint`): the newest that loads (a newer damaged one is
skipped with a warning, as `train --resume auto` does), or the one of --step. DIR is replaced only when
it is empty or holds nothing but what treedistill wrote there (`checkpoint.check_replaceable`); a
failed write (a full disk, a read-only folder) is one line and leaves DIR as it was.

The folder (`models.load.write_model_files`, written whole or not at all by `checkpoint.atomic_folder`):
config.json + model.safetensors + generation_config.json (save_pretrained), the tokenizer files with
the chat template, the value head in `value_head/` (out of the top level, where serving loaders read
every `*.safetensors` file as model weights), and treedistill.json: the preset name, compact_prompt,
and `trained` (run, step, method, base model, LoRA). LoRA runs are written with the adapter merged
into the weights (a plain model folder) unless adapter_only: then peft's adapter files
(adapter_config.json + adapter_model.safetensors, read by `peft.PeftModel.from_pretrained(base, DIR)`),
the tokenizer, the value head and treedistill.json.

The policy is rebuilt from the run's config (model, value head, LoRA: `learner.load_train_policy`) on the
CPU, in the dtype of the checkpoint's weights, and the checkpoint's state dicts are loaded into it:
the folder holds exactly the trained floats, whichever process wrote the checkpoint (the one-process
loop, the Ray driver's learner, or FSDP rank 0 with the gathered full state dict), and no GPU is needed.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError

from treedistill import checkpoint
from treedistill.config import load_config
from treedistill.errors import UsageError, cut, mount_point, os_reason
from treedistill.learner import load_train_policy
from treedistill.models.load import FINAL_FOLDER, META_FILE, write_model_files

__all__ = ["checkpoint_at", "export_checkpoint", "write_final"]

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def checkpoint_at(source: str | Path, step: int | None = None, *, warn=None) -> Path:
    """The complete checkpoint to export: `source` a run folder (its newest one that loads, a newer
    damaged one skipped with `warn(message)`, as `train --resume auto` does; or that of `step`) or a
    checkpoint folder itself. A damaged checkpoint named by `step` or `source` is a UsageError."""
    source = Path(source).expanduser()
    if (source / checkpoint.MARKER).is_file():
        if step is not None and source.name != f"step-{step:08d}":
            raise UsageError(f"{source} is the checkpoint of another step than --step {step}")
        _weights(source)
        return source
    found = checkpoint.list_checkpoints(source) if source.is_dir() else []
    if not found:
        raise UsageError(f"{source}: not a run folder holding a complete checkpoint (RUN/checkpoints/step-N/ "
                         f"with its '{checkpoint.MARKER}' marker), nor such a checkpoint")
    if step is None:
        return checkpoint.load_latest(source, warn=warn, load=_weights)[0]
    wanted = [path for path in found if path.name == f"step-{step:08d}"]
    if not wanted:
        steps = ", ".join(str(int(path.name.split("-")[1])) for path in found)
        raise UsageError(f"{source} has no complete checkpoint of step {step} (complete: {steps}; "
                         "keep_checkpoints sets how many are kept)")
    _weights(wanted[0])
    return wanted[0]


def _weights(ckpt: Path) -> dict:
    """The policy's entries of a checkpoint (model, value head if any), memory-mapped: the optimizer
    state (twice the model) is never read. UsageError when the checkpoint is damaged."""
    return checkpoint.load_checkpoint(ckpt, entries=("model", "value_head"), mmap=True)


def _run_config(ckpt: Path):
    """The run's config (RUN/config.yaml beside RUN/checkpoints/), validated as `train` loads it."""
    path = ckpt.parent.parent / "config.yaml"
    if not path.is_file():
        raise UsageError(f"{path} not found: a checkpoint is exported with its run's config.yaml "
                         "(RUN/config.yaml beside RUN/checkpoints/)")
    return load_config(path=path)


def _trained_policy(ckpt: Path):
    """(policy on the CPU holding the checkpoint's weights, config)."""
    saved = _weights(ckpt)
    state = saved["model"]
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPE_NAMES:
        raise UsageError(f"{ckpt}: model weights in {sorted(map(str, dtypes))}; expected one of "
                         f"{', '.join(_DTYPE_NAMES.values())}")
    cfg = _run_config(ckpt)
    cfg = dataclasses.replace(cfg, device="cpu", dtype=_DTYPE_NAMES[next(iter(dtypes))])
    policy = load_train_policy(cfg)
    policy.model.load_state_dict(state)
    if ("value_head" in saved) != (policy.value_head is not None):
        raise UsageError(f"{ckpt}: the checkpoint {'has' if 'value_head' in saved else 'lacks'} a value head "
                         "and the run's config.yaml says otherwise")
    if policy.value_head is not None:
        policy.value_head.load_state_dict(saved["value_head"])
    return policy, cfg


def export_checkpoint(ckpt: str | Path, out: str | Path, *, adapter_only: bool = False) -> dict:
    """Write checkpoint `ckpt`'s policy as the model folder `out` (see the module docstring); returns
    what was written: out, step, checkpoint, lora ("merged" | "adapter" | None), files. `out` must be
    absent, empty or a folder treedistill wrote (`checkpoint.check_replaceable`); a failed write (a full
    disk, a read-only folder) is a UsageError and leaves `out` as it was."""
    ckpt, out = Path(ckpt), Path(out)
    checkpoint.check_replaceable(out)  # before the model is loaded
    policy, cfg = _trained_policy(ckpt)
    if adapter_only and not policy.uses_lora:
        raise UsageError(f"--adapter-only: {ckpt.parent.parent} trained all weights (lora.r = 0), it has no adapter")
    lora = ("adapter" if adapter_only else "merged") if policy.uses_lora else None
    step = int(re.fullmatch(r"step-(\d+)", ckpt.name).group(1))
    meta = {"trained": {"run": str(ckpt.parent.parent.resolve()), "step": step, "method": cfg.method,
                        "base_model": cfg.model, "lora": lora}}
    try:
        if adapter_only:
            # peft's save_pretrained writes the adapter alone; the base model is cfg.model
            with checkpoint.atomic_folder(out) as tmp:
                write_model_files(tmp, policy.model, policy.tokenizer, policy.value_head, name=policy.name,
                                  compact_prompt=policy.compact_prompt, meta=meta)
        else:
            policy.save(out, meta=meta)  # a LoRA adapter merged into a copy of the weights
    except OSError as err:
        raise UsageError(f"cannot write {out}: {os_reason(err)}") from None
    except SafetensorError as err:  # safetensors' own I/O error, e.g. "... (os error 28)"
        why = (f"No space left on device (the disk mounted at {mount_point(str(out))})"
               if f"os error {errno.ENOSPC})" in str(err) else cut(str(err)))
        raise UsageError(f"cannot write {out}: {why}") from None
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return {"out": str(out), "step": step, "checkpoint": str(ckpt), "lora": lora, "files": files}


def write_final(run_dir: str | Path) -> Path | None:
    """RUN/final/ from the run's newest complete checkpoint (None: the run has none); kept as it is
    when it already holds that step."""
    run_dir = Path(run_dir)
    found = checkpoint.list_checkpoints(run_dir)
    if not found:
        return None
    final = run_dir / FINAL_FOLDER
    newest = checkpoint_at(run_dir)
    step = int(newest.name.split("-")[1])
    if _exported_step(final) == step:
        return final
    export_checkpoint(newest, final)
    return final


def _exported_step(folder: Path) -> int | None:
    """The step a model folder was exported from (its META_FILE), None when it says none or is damaged."""
    try:
        trained = json.loads((folder / META_FILE).read_text()).get("trained", {})
        return trained.get("step") if isinstance(trained, dict) else None
    except (OSError, ValueError, AttributeError):
        return None
