"""Albumentations pipelines for image + label pairs.

Labels stay integer class maps: every geometric step resizes them with nearest-neighbour
interpolation and pads them with ``ignore_index``, so ignored pixels survive every transform and
padding is never scored.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch

from fcnseg.errors import UserError
from fcnseg.utils.normalization import (
    NORMALIZATIONS,
    Normalization,
    denormalize,
    get_normalization,
)
from fcnseg.utils.validate import size_pair

# The normalisation table lives in fcnseg.utils.normalization (the pictures of predictions
# undo it too); its names stay importable from here.
__all__ = [
    "NORMALIZATIONS",
    "Normalization",
    "SegTransform",
    "build_transforms",
    "denormalize",
    "get_normalization",
]


class SegTransform:
    """An albumentations pipeline followed by conversion to tensors (and BGR if asked).

    Masks go through OpenCV as uint8 when their values and the ignore index fit in a byte,
    else as int32 (OpenCV has no int64 images), and come out as int64 tensors.
    """

    def __init__(self, steps: Sequence[A.BasicTransform], normalization: Normalization) -> None:
        n = normalization
        self.normalization = n
        self.pipeline = A.Compose(
            [*steps, A.Normalize(mean=n.mean, std=n.std, max_pixel_value=n.max_pixel_value)]
        )

    def reseed(self, seed: int) -> None:
        """Makes the next random draws a function of ``seed`` alone."""
        self.pipeline.set_random_seed(seed)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if mask.dtype not in (np.uint8, np.int32):
            mask = mask.astype(np.int32)
        out = self.pipeline(image=image, mask=mask)
        img = out["image"].transpose(2, 0, 1)
        if self.normalization.bgr:
            img = img[::-1]
        return torch.from_numpy(np.ascontiguousarray(img)), torch.from_numpy(
            out["mask"].astype(np.int64)
        )


def build_transforms(
    *,
    train: bool,
    normalize: str = "imagenet",
    ignore_index: int = 255,
    crop_size: int | Sequence[int] | None = None,
    scale_range: Sequence[float] = (0.5, 2.0),
    hflip: bool = True,
    color_jitter: float = 0.0,
) -> SegTransform:
    """The training pipeline (random scale, crop with ignore padding, flip, jitter) or the
    evaluation one (normalisation only, full resolution).

    Args:
        train: training or evaluation pipeline.
        normalize: a key of ``NORMALIZATIONS``.
        ignore_index: label value used to pad masks.
        crop_size: side (or (height, width)) of training crops; ``None`` keeps whole images.
        scale_range: range of the random rescaling factor.
        hflip: random horizontal flips.
        color_jitter: strength of brightness/contrast/saturation jitter (0 disables it).
    """
    norm = get_normalization(normalize)
    steps: list[A.BasicTransform] = []
    if train:
        lo, hi = _scale_range(scale_range)
        crop_size = None if crop_size is None else size_pair(crop_size, name="dataset.crop_size")
        if not 0 <= color_jitter <= 1:
            raise UserError(f"dataset.color_jitter={color_jitter} must lie in [0, 1]")
        if (lo, hi) != (1.0, 1.0):
            steps.append(
                A.RandomScale(
                    scale_limit=(lo - 1.0, hi - 1.0),
                    interpolation=cv2.INTER_LINEAR,
                    # OpenCV's INTER_NEAREST samples pixel corners while INTER_LINEAR samples
                    # pixel centres, which shifts labels against the image by up to half an input
                    # pixel. NEAREST_EXACT samples centres too (tests/test_transforms.py catches
                    # the difference).
                    mask_interpolation=cv2.INTER_NEAREST_EXACT,
                    p=1.0,
                )
            )
        if crop_size is not None:
            ch, cw = crop_size
            steps += [
                A.PadIfNeeded(
                    min_height=ch,
                    min_width=cw,
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=0,
                    fill_mask=ignore_index,
                ),
                A.RandomCrop(height=ch, width=cw),
            ]
        if hflip:
            steps.append(A.HorizontalFlip(p=0.5))
        if color_jitter > 0:
            j = color_jitter
            steps.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=0.0, p=0.8))
    return SegTransform(steps, norm)


def _scale_range(scale_range: Sequence[float]) -> tuple[float, float]:
    values = list(scale_range) if isinstance(scale_range, Sequence | np.ndarray) else None
    if values is None or len(values) != 2 or not 0 < values[0] <= values[1]:
        raise UserError(
            f"dataset.scale_range={scale_range} must be [low, high] with 0 < low <= high"
        )
    return float(values[0]), float(values[1])
