"""How pixels are presented to the networks, and back: the normalisation table and its inverse.

The data pipeline normalises with these entries (``fcnseg.data.transforms``) and the pictures
of predictions undo them (``fcnseg.utils.visualize``); both read this one table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fcnseg.errors import UserError


@dataclass(frozen=True)
class Normalization:
    """How pixels are presented to the network: ``(pixel * scale - mean) / std`` per channel."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_pixel_value: float
    bgr: bool = False


NORMALIZATIONS = {
    # torchvision's ImageNet models: RGB in [0, 1], ImageNet mean and std.
    "imagenet": Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 255.0),
    # The Caffe VGG16 the FCN paper fine-tuned: BGR, 0-255, mean pixel subtracted. The mean is
    # listed here in RGB order; the channels are swapped after normalisation.
    "caffe": Normalization(
        (122.67891434, 116.66876762, 104.00698793), (1.0, 1.0, 1.0), 1.0, bgr=True
    ),
    # Pixels in [0, 1], nothing subtracted.
    "none": Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 255.0),
}


def get_normalization(name: str) -> Normalization:
    if name not in NORMALIZATIONS:
        raise UserError(f"dataset.normalize={name!r} is not one of {sorted(NORMALIZATIONS)}")
    return NORMALIZATIONS[name]


def denormalize(images: torch.Tensor, normalize: str) -> torch.Tensor:
    """Inverse of the normalisation: (N, 3, H, W) network input -> RGB uint8."""
    n = get_normalization(normalize)
    if n.bgr:
        images = images.flip(1)
    mean = torch.tensor(n.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(n.std, device=images.device).view(1, 3, 1, 1)
    # albumentations computes (pixel - mean * max) / (std * max); undo that.
    pixels = (images.float() * std + mean) * n.max_pixel_value
    return pixels.clamp(0, 255).round().to(torch.uint8)
