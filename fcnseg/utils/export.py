"""Predictions on disk: palette PNG label maps, overlays, and Cityscapes label-ID files.

Label maps are written losslessly at the input's exact size: a palette ("P" mode) PNG stores
the class index of every pixel and shows the class colours in any image viewer. The Cityscapes
format stores the official *label IDs* (not the 19 train IDs the network predicts) as 8-bit
grey PNGs named after the input image (``frankfurt_000000_000294_leftImg8bit.png`` ->
``frankfurt_000000_000294_leftImg8bit.png``), which is what the official
``cityscapesscripts`` evaluation looks for (``{city}_{sequence}_{frame}*.png``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fcnseg.data.io import IMAGE_SUFFIXES
from fcnseg.errors import UserError
from fcnseg.utils.visualize import Palette, full_palette

FORMATS = ("png", "cityscapes")


def _numpy(labels: torch.Tensor | np.ndarray) -> np.ndarray:
    return labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)


def save_label_png(
    labels: torch.Tensor | np.ndarray, path: str | Path, *, colors: Palette | None = None
) -> None:
    """Writes (H, W) class indices in [0, 255] as a palette PNG (W x H pixels)."""
    labels = _numpy(labels)
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"labels in [{labels.min()}, {labels.max()}] do not fit a palette PNG")
    image = Image.fromarray(labels.astype(np.uint8))  # "L"; a palette makes it "P"
    image.putpalette(full_palette(colors).flatten().tolist())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def read_label_png(path: str | Path) -> np.ndarray:
    """The (H, W) indices of a palette or grey PNG (the palette is not applied)."""
    with Image.open(path) as image:
        return np.asarray(image)


def list_images(path: str | Path) -> list[Path]:
    """``path`` itself if it is a file, else the images below it (recursively), sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"input {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"input {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def sample_path(dataset: Any, index: int) -> Path | None:
    """The image file behind sample ``index``, when the dataset tells (``image_path(i)`` or an
    ``images`` list); ``None`` for generated data."""
    if callable(getattr(dataset, "image_path", None)):
        return Path(dataset.image_path(index))
    images = getattr(dataset, "images", None)
    if isinstance(images, Sequence) and not isinstance(images, str) and len(images) > index:
        return Path(images[index])
    return None


def cityscapes_file_name(image_path: str | Path) -> str:
    """The official results naming: the input's own name, as ``.png``."""
    return Path(image_path).with_suffix(".png").name


class PredictionWriter:
    """Saves evaluation predictions, one file per sample (an ``on_prediction`` callback).

    Args:
        out_dir: folder to write to.
        dataset: the evaluated dataset, for file names (``image_path(i)`` or ``images``);
            samples without a file are named by index (``000042.png``).
        format: ``png`` (palette PNG of class indices) or ``cityscapes`` (label IDs, official
            names).
        colors: class colours of the palette PNGs.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        dataset: Any,
        format: str = "png",
        colors: Palette | None = None,
    ):
        if format not in FORMATS:
            raise UserError(f"eval.format={format!r} is not one of {', '.join(FORMATS)}")
        self.out_dir = Path(out_dir)
        self.dataset, self.format, self.colors = dataset, format, colors
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        source = sample_path(self.dataset, index)
        if self.format == "cityscapes":
            if source is None:
                raise UserError(
                    "eval.format=cityscapes needs a dataset of image files (Cityscapes)"
                )
            return self.out_dir / cityscapes_file_name(source)
        return self.out_dir / (
            f"{index:06d}.png" if source is None else source.with_suffix(".png").name
        )

    def __call__(self, index: int, labels: torch.Tensor) -> None:
        path = self.path(index)
        if self.format == "cityscapes":
            from fcnseg.data.cityscapes import train_ids_to_label_ids

            Image.fromarray(train_ids_to_label_ids(_numpy(labels))).save(path)  # 8-bit grey
        else:
            save_label_png(labels, path, colors=self.colors)
