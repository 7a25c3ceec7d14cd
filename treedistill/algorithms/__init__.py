"""The pure algorithm layer: batches, advantages, losses and packed rows. Tensors in, tensors out; no model
loading, no logging, no files."""

from treedistill.algorithms.advantages import (
    ADVANTAGES,
    gae,
    group_normalized,
    reward_minus_value,
)
from treedistill.algorithms.batch import Batch, pad_rows, shift_right
from treedistill.algorithms.losses import (
    LOSSES,
    cispo_policy_loss,
    combine_metrics,
    k3_kl,
    kl_penalty,
    ppo_clip_policy_loss,
    token_entropy,
    token_logprobs,
    total_loss,
    value_loss,
)
from treedistill.algorithms.packing import Packing, pack_rows

__all__ = [
    "ADVANTAGES",
    "LOSSES",
    "Batch",
    "Packing",
    "cispo_policy_loss",
    "pad_rows",
    "combine_metrics",
    "gae",
    "group_normalized",
    "k3_kl",
    "kl_penalty",
    "pack_rows",
    "ppo_clip_policy_loss",
    "reward_minus_value",
    "shift_right",
    "token_entropy",
    "token_logprobs",
    "total_loss",
    "value_loss",
]
