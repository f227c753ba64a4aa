"""Datasets written in the PASCAL VOC 2012 layout and formats, for measurements and tests.

``write_voc_layout`` writes any samples as VOC stores them; ``write_synthetic_voc`` fills it
with pictures that cost what photographs cost to decode, which is what the data benchmark reads
when no dataset is given. Both are read by ``fcnseg.data.VOCSegmentation``, as the real VOC is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fcnseg.utils.visualize import palette

VOC_SIZE = (500, 375)  # width, height of the typical PASCAL VOC image
Sample = tuple[np.ndarray, np.ndarray]


def save_palette_png(label: np.ndarray, path: str | Path) -> None:
    """A palette ("P") PNG whose indices are ``label``, coloured like VOC's."""
    image = Image.fromarray(np.asarray(label).astype(np.uint8), mode="P")
    image.putpalette(palette(256).reshape(-1).tolist())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def write_voc_layout(
    root: str | Path,
    *,
    sample: Callable[[str], Sample],
    splits: Mapping[str, Sequence[str]],
    year: str = "2012",
    quality: int = 95,
) -> Path:
    """Writes ``root/VOCdevkit/VOC<year>`` and returns ``root``.

    ``JPEGImages/<id>.jpg`` (RGB JPEG at ``quality``), ``SegmentationClass/<id>.png`` (palette
    PNG of class indices, 255 ignored) and ``ImageSets/Segmentation/<split>.txt`` (one id a
    line) for every id of ``splits``.

    Args:
        root: the folder to write into (``dataset.root``).
        sample: image id -> (image (H, W, 3) uint8 RGB, label (H, W) class indices).
        splits: split name -> its image ids; an id in several splits is written once.
        year: the devkit's year.
        quality: JPEG quality.
    """
    base = Path(root) / "VOCdevkit" / f"VOC{year}"
    (base / "JPEGImages").mkdir(parents=True, exist_ok=True)
    for i in dict.fromkeys(i for ids in splits.values() for i in ids):
        image, label = sample(i)
        Image.fromarray(image).save(base / "JPEGImages" / f"{i}.jpg", quality=quality)
        save_palette_png(label, base / "SegmentationClass" / f"{i}.png")
    lists = base / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    for name, ids in splits.items():
        (lists / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return Path(root)


def photo_like_sample(
    rng: np.random.Generator, *, size: tuple[int, int] = VOC_SIZE, num_classes: int = 21
) -> Sample:
    """A (width, height) ``size`` picture of smooth gradients with 1-3 textured objects, and
    its label: the objects' classes on background 0, 255 on a 5-pixel band along their borders
    as in VOC. Smooth and textured, so that JPEG decoding costs what it costs on photographs,
    not on noise."""
    import cv2

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.empty((h, w, 3), np.float32)
    for c in range(3):
        a, b, d = rng.uniform(-0.3, 0.3, size=3)
        image[..., c] = 128 + 100 * np.sin(a * xx / 20 + b * yy / 20 + d * 10)
    label = np.zeros((h, w), np.uint8)
    for _ in range(rng.integers(1, 4)):
        cls = int(rng.integers(1, num_classes))
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        ry, rx = rng.uniform(0.1, 0.3) * h, rng.uniform(0.1, 0.3) * w
        region = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        image[region] = rng.uniform(0, 255, 3) + 30 * np.sin(xx[region, None] / rng.uniform(2, 6))
        label[region] = cls
    edges = cv2.morphologyEx(label, cv2.MORPH_GRADIENT, np.ones((5, 5), np.uint8)) > 0
    label[edges] = 255
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    return image, label


def write_synthetic_voc(
    root: str | Path,
    *,
    num_images: int = 16,
    size: tuple[int, int] = VOC_SIZE,
    num_classes: int = 21,
    seed: int = 0,
    quality: int = 90,
) -> Path:
    """``num_images`` ``photo_like_sample`` pictures of (width, height) ``size`` in the VOC 2012
    layout (ids ``2007_000000``, ...): the first half is ``train``, the rest ``val``. Returns
    ``root``."""
    ids = [f"2007_{k:06d}" for k in range(num_images)]
    half = max(1, num_images // 2)
    return write_voc_layout(
        root,
        sample=lambda i: photo_like_sample(
            np.random.default_rng([seed, ids.index(i)]), size=size, num_classes=num_classes
        ),
        splits={"train": ids[:half], "val": ids[half:] or ids[:1]},
        quality=quality,
    )
