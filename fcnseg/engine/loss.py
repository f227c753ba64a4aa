"""The training loss: per-pixel cross-entropy over the classes, optionally class-weighted."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fcnseg.errors import UserError

REDUCTIONS = ("mean", "sum")


class SegLoss(nn.Module):
    """Cross-entropy of (N, C, H, W) logits against (N, H, W) labels.

    Args:
        weight: one weight per class (e.g. median-frequency balancing), or ``None``.
        ignore_index: the label value that contributes nothing.
        reduction: ``mean`` over the valid pixels (weighted), or ``sum``, the FCN paper's
            unnormalised loss.
    """

    def __init__(
        self,
        *,
        weight: Sequence[float] | None = None,
        ignore_index: int = 255,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise UserError(f"loss.reduction={reduction!r} is not one of mean, sum")
        self.ignore_index, self.reduction = ignore_index, reduction
        tensor = None if weight is None else torch.tensor(list(weight), dtype=torch.float32)
        self.register_buffer("weight", tensor, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # The softmax in float32: in half precision the small probabilities underflow.
        return F.cross_entropy(
            logits.float(),
            targets,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
        )
