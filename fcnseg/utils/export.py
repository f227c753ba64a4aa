"""Predictions on disk: palette PNG label maps, image listings, and checks of output paths.

Label maps are written losslessly at the input's exact size: a palette ("P" mode) PNG stores
the class index of every pixel and shows the class colours in any image viewer. Writing in a
dataset's own format (Cityscapes label IDs) is ``fcnseg.data.predictions``'s job, since it
needs the dataset's tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fcnseg.errors import UserError
from fcnseg.utils.image_files import IMAGE_SUFFIXES
from fcnseg.utils.visualize import Palette, full_palette


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
    (``dataset.data_folders()``). ``fcnseg.data.predictions.PredictionWriter`` checks its own
    folder."""
    folders = dataset.data_folders() if callable(getattr(dataset, "data_folders", None)) else []
    for key, path in (("out", out), ("eval.grid", grid)):
        if path:
            check_output_file(path, key=key, protected=folders)
    if tensorboard:
        refuse_overlap(tensorboard, folders, key="eval.tensorboard", what="the dataset folder")
