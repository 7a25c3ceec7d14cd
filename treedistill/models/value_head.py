"""Value head: an MLP on the policy's final hidden state, tanh output in [-1, 1].

Shape of the reference: hidden -> 4*hidden -> hidden -> 1 with ReLU. The head reads the SAME tensor
in training and in search: the final hidden state as the causal LM returns it (after the model's own
final norm), with no extra normalisation anywhere (the reference trained its head behind a LayerNorm
that its search did not apply).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

FILENAME = "value_head.safetensors"


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
    path = Path(folder) / FILENAME
    tensors = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(tensors, str(path), metadata={"hidden_size": str(head.hidden_size)})
    return path


def load_value_head(folder: str | Path, hidden_size: int) -> ValueHead | None:
    """The head saved in `folder`, or None when the folder has none (a fresh head is then made)."""
    path = Path(folder) / FILENAME
    if not path.exists():
        return None
    head = ValueHead(hidden_size)
    head.load_state_dict(load_file(str(path)))
    return head
