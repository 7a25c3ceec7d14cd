"""Value head: an MLP on the policy's final hidden state, tanh output in [-1, 1].

Shape of the reference: hidden -> 4*hidden -> hidden -> 1 with ReLU. The head reads the SAME tensor
in training and in search: the final hidden state as the causal LM returns it (after the model's own
final norm), with no extra normalisation anywhere (the reference trained its head behind a LayerNorm
that its search did not apply).

Saved in a subfolder of the model folder, `value_head/value_head.safetensors`: loaders that read
every `*.safetensors` file beside `config.json` (vLLM) would otherwise take the head's `net.*` tensors
for the model's and refuse the folder. Folders written before the move hold `value_head.safetensors`
at the top level; they load too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from treedistill.errors import UsageError, cut

FILENAME = "value_head.safetensors"
SUBFOLDER = "value_head"


class ValueHead(nn.Module):
    """hidden [..., H] -> value [...] in [-1, 1]."""

    def __init__(self, hidden_size: int, *, expansion: int = 4):
        super().__init__()
        self.hidden_size = hidden_size
        self.net = nn.Sequential(
            nn.Linear(hidden_size, expansion * hidden_size),
            nn.ReLU(),
            nn.Linear(expansion * hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, 1),
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(hidden.to(self.net[0].weight.dtype))).squeeze(-1)  # [...]


def save_value_head(head: ValueHead, folder: str | Path) -> Path:
    """Write the head into FOLDER/value_head/value_head.safetensors; returns that path."""
    path = Path(folder) / SUBFOLDER / FILENAME
    path.parent.mkdir(exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(tensors, str(path), metadata={"hidden_size": str(head.hidden_size)})
    return path


def load_value_head(folder: str | Path, hidden_size: int) -> ValueHead | None:
    """The head saved in `folder` (value_head/value_head.safetensors, or the earlier layout's
    value_head.safetensors beside the model), or None when the folder has none (a fresh head is then made)."""
    path = next((p for p in (Path(folder) / SUBFOLDER / FILENAME, Path(folder) / FILENAME) if p.is_file()), None)
    if path is None:
        return None
    head = ValueHead(hidden_size)
    try:
        head.load_state_dict(load_file(str(path)))
    except (SafetensorError, OSError, RuntimeError) as e:  # RuntimeError: a head of another hidden size
        raise UsageError(f"{path} cannot be read as a value head ({cut(str(e).strip())})") from None
    return head
