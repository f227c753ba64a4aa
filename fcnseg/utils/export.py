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


def refuse_overlap(
    path: str | Path, protected: Sequence[str | Path], *, key: str, what: str
) -> None:
    """Raises a ``UserError`` when ``path`` is, lies inside or contains one of ``protected``.

    Outputs never go among the files they were computed from: predictions named after the
    images would replace the images, or the ground truth they are scored against.

    Args:
        path: the output file or folder.
        protected: the folders (or files) to keep out of, e.g. ``dataset.data_folders()``.
        key: the option that gave ``path``, to name it.
        what: what ``protected`` holds, e.g. ``"the dataset folder"``.
    """
    out = Path(path).expanduser().resolve()
    for guarded in protected:
        inner = Path(guarded).expanduser().resolve()
        if out == inner:
            relation = "is"
        elif inner in out.parents:
            relation = "is inside"
        elif out in inner.parents:
            relation = "contains"
        else:
            continue
        raise UserError(
            f"{key}={path} {relation} {what} {guarded}, whose files must not be overwritten; "
            "choose a folder outside it"
        )


def check_output_dir(
    path: str | Path,
    *,
    key: str,
    protected: Sequence[str | Path] = (),
    what: str = "the dataset folder",
    overwrite: bool = False,
    overwrite_key: str = "overwrite",
) -> Path:
    """Checks, before anything is computed, that the folder ``path`` may receive outputs.

    It must not be a file, nor overlap ``protected`` (``refuse_overlap``), and it must be
    empty or missing unless ``overwrite`` (the outputs replace files of the same name).

    Returns:
        ``path`` as a ``Path``.
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{key}={path} is a file, not a folder; give a folder for the outputs")
    refuse_overlap(out, protected, key=key, what=what)
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise UserError(
            f"{key}={path} is not empty; choose an empty or new folder, or pass "
            f"{overwrite_key}=true to replace the files of the same name in it"
        )
    return out


def check_output_file(
    path: str | Path,
    *,
    key: str,
    protected: Sequence[str | Path] = (),
    what: str = "the dataset folder",
) -> Path:
    """Checks, before anything is computed, that the file ``path`` may be written: it is not
    a folder and lies outside ``protected`` (``refuse_overlap``)."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise UserError(f"{key}={path} is a folder; give the file to write")
    refuse_overlap(out, protected, key=key, what=what)
    return out


def check_evaluation_outputs(
    dataset: Any,
    *,
    out: str | Path | None = None,
    grid: str | Path | None = None,
    tensorboard: str | Path | None = None,
) -> None:
    """Checks an evaluation's output files before it runs: the metrics file ``out`` and the
    picture ``grid`` are not folders, and none of the three lies among the dataset's files
    (``dataset.data_folders()``). ``PredictionWriter`` checks its own folder."""
    folders = dataset.data_folders() if callable(getattr(dataset, "data_folders", None)) else []
    for key, path in (("out", out), ("eval.grid", grid)):
        if path:
            check_output_file(path, key=key, protected=folders)
    if tensorboard:
        refuse_overlap(tensorboard, folders, key="eval.tensorboard", what="the dataset folder")


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
    ``overwrite``.

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
