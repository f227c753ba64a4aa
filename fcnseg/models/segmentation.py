"""The model: a backbone that tells what it computes, and a head that asks."""

from __future__ import annotations

import torch
from torch import nn


class SegmentationModel(nn.Module):
    """Backbone + head; maps normalised images (N, 3, H, W) to logits (N, C, H, W)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images), tuple(images.shape[-2:]))
