"""Evaluation predictions saved one file per sample, in a palette PNG or a dataset's own format.

The Cityscapes format stores the official *label IDs* (not the 19 train IDs the network
predicts) as 8-bit grey PNGs named after the input image
(``frankfurt_000000_000294_leftImg8bit.png`` -> ``frankfurt_000000_000294_leftImg8bit.png``),
which is what the official ``cityscapesscripts`` evaluation looks for
(``{city}_{sequence}_{frame}*.png``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fcnseg.data.cityscapes import train_ids_to_label_ids
from fcnseg.data.io import save_label_png
from fcnseg.errors import UserError
from fcnseg.utils.outputs import check_output_dir
from fcnseg.utils.visualize import Palette

FORMATS = ("png", "cityscapes")


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

    The folder is checked when the writer is made, before any evaluation: it must lie outside
    the dataset's folders (``dataset.data_folders()``), and be empty or new unless
    ``overwrite``; and no two samples may get one file name.

    Args:
        out_dir: folder to write to.
        dataset: the evaluated dataset, for file names (``image_path(i)`` or ``images``);
            samples without a file are named by index (``000042.png``).
        format: ``png`` (palette PNG of class indices) or ``cityscapes`` (label IDs, official
            names).
        colors: class colours of the palette PNGs.
        overwrite: write into a folder that already holds files (those of the same name are
            replaced).
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        dataset: Any,
        format: str = "png",
        colors: Palette | None = None,
        overwrite: bool = False,
    ):
        if format not in FORMATS:
            raise UserError(f"eval.format={format!r} is not one of {', '.join(FORMATS)}")
        folders = getattr(dataset, "data_folders", None)
        self.out_dir = check_output_dir(
            out_dir,
            key="eval.save_predictions",
            protected=folders() if callable(folders) else [],
            overwrite=overwrite,
            overwrite_key="eval.overwrite",
        )
        self.dataset, self.format, self.colors = dataset, format, colors
        # Every name before the first prediction: two images of one file name in different
        # folders would be saved over one another.
        saved: dict[Path, int] = {}
        for index in range(len(dataset)):
            path = self.path(index)
            if path in saved:
                raise UserError(
                    f"eval.save_predictions={out_dir} would receive the predictions of "
                    f"{sample_path(dataset, saved[path])} and {sample_path(dataset, index)} under "
                    f"one name, {path.name}, as predictions are named after the image file alone"
                )
            saved[path] = index
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
            Image.fromarray(train_ids_to_label_ids(labels.cpu().numpy())).save(path)  # 8-bit grey
        else:
            save_label_png(labels, path, colors=self.colors)
