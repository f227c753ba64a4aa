"""A procedurally generated segmentation dataset that ships as code.

Objects and background draw their colours from the same distribution, and every object class
takes every outline (disc, square, triangle), so neither a pixel's colour nor the outline around
it tells its class: only the texture in its neighbourhood does (plain, stripes, checks, dots on
a blotchy background), and the network has to look at spatial context. Samples are a pure
function of ``(seed, split, index)``, so every process and every run sees the same data.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import cv2
import numpy as np

from fcnseg.data.base import Sample, SegmentationDataset
from fcnseg.errors import UserError

CLASS_NAMES = ("background", "plain", "stripes", "checks", "dots")


class SyntheticShapes(SegmentationDataset):
    """Textured shapes on blotchy backgrounds, images of varying sizes.

    Args:
        split: ``train``, ``val`` or ``test``; each split has its own samples.
        num_samples: number of images in the split, or a mapping from split to number.
        min_size, max_size: image sides are drawn uniformly from this range.
        seed: base seed.
        **kwargs: see ``SegmentationDataset``.
    """

    class_names = CLASS_NAMES

    def __init__(
        self,
        *,
        split: str = "train",
        num_samples: int | Mapping[str, int] = 1000,
        min_size: int = 48,
        max_size: int = 80,
        seed: int = 0,
        **kwargs,
    ) -> None:
        kwargs.setdefault("num_classes", len(CLASS_NAMES))
        super().__init__(**kwargs)
        self.split = split
        if not isinstance(num_samples, int) and split not in num_samples:
            raise UserError(
                f"split={split!r} is not a split of the synthetic dataset; "
                f"dataset.builder.num_samples has {', '.join(map(str, num_samples))}"
            )
        self.num_samples = num_samples if isinstance(num_samples, int) else int(num_samples[split])
        # Shapes have radii from 7 px to the shorter side / 3.5, which needs sides of 25 px.
        if not 25 <= min_size <= max_size:
            raise UserError(
                f"dataset.builder.min_size={min_size} and max_size={max_size}: the synthetic "
                f"images need 25 <= min_size <= max_size"
            )
        self.min_size, self.max_size = min_size, max_size
        self.seed = seed
        self._split_key = zlib.crc32(split.encode())

    def __len__(self) -> int:
        return self.num_samples

    def describe(self, index: int) -> str:
        return f"synthetic {self.split} sample {index}"

    def load(self, index: int) -> Sample:
        rng = np.random.default_rng([self.seed, self._split_key, index])
        h, w = rng.integers(self.min_size, self.max_size + 1, size=2)
        image = _noise_background(rng, h, w)
        mask = np.zeros((h, w), np.uint8)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        for _ in range(rng.integers(1, 4)):
            cls = int(rng.integers(1, len(CLASS_NAMES)))
            r = rng.uniform(7, min(h, w) / 3.5)
            cy, cx = rng.uniform(r * 0.7, h - r * 0.7), rng.uniform(r * 0.7, w - r * 0.7)
            region = _shape(int(rng.integers(3)), rng, yy - cy, xx - cx, r)
            image[region] = _fill(cls, rng, yy[region], xx[region])
            mask[region] = cls
        return image, mask


def _noise_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = rng.uniform(0, 255, size=3)
    # Smooth colour blotches (coarse noise, bilinearly upsampled) plus pixel noise.
    coarse = rng.normal(0, 40, size=(h // 8 + 2, w // 8 + 2, 3)).astype(np.float32)
    blotches = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)
    image = base + blotches + rng.normal(0, 8, size=(h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _shape(
    kind: int, rng: np.random.Generator, dy: np.ndarray, dx: np.ndarray, r: float
) -> np.ndarray:
    """Pixels inside a disc (0), a rotated square (1) or a rotated triangle (2)."""
    if kind == 0:
        return dy**2 + dx**2 <= r**2
    theta = rng.uniform(0, np.pi)
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    if kind == 1:
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):
        a = 2 * np.pi * k / 3
        inside &= u * np.cos(a) + v * np.sin(a) <= r * 0.5
    return inside


def _fill(cls: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Colours of the pixels (yy, xx) of an object of class ``cls``: its texture."""
    colour = rng.uniform(0, 255, size=3)
    if cls == 1:  # plain
        return np.clip(colour + rng.normal(0, 6, size=(yy.size, 3)), 0, 255).astype(np.uint8)
    other = rng.uniform(0, 255, size=3)
    while np.abs(other - colour).sum() < 120:  # keep the texture visible
        other = rng.uniform(0, 255, size=3)
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 7)
    u = (xx * np.cos(angle) + yy * np.sin(angle)) / period
    v = (-xx * np.sin(angle) + yy * np.cos(angle)) / period
    if cls == 2:  # stripes
        on = np.floor(u) % 2 == 0
    elif cls == 3:  # checks
        on = (np.floor(u) + np.floor(v)) % 2 == 0
    else:  # dots
        on = (u - np.round(u)) ** 2 + (v - np.round(v)) ** 2 < 0.09
    return np.where(on[:, None], colour, other).astype(np.uint8)
