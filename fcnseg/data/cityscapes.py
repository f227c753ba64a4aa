"""Cityscapes (Cordts et al. 2016): 19 classes scored, read straight from the official layout.

``root/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png`` are the images and
``root/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png`` their labels, in the
official label IDs (0-33), which are mapped to the 19 train IDs on the fly (every other class ->
ignore), so no preprocessing step (``createTrainIdLabelImgs.py``) is needed. The other gtFine
files (``_color.png``, ``_instanceIds.png``, ``_polygons.json``) are never read.

The table below is ``cityscapesscripts/helpers/labels.py``; ``TRAIN_ID_TO_LABEL_ID`` maps
predictions back to label IDs for the official evaluation (``eval.format=cityscapes``).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from fcnseg.data.base import FilePairDataset
from fcnseg.data.io import read_label
from fcnseg.errors import UserError


class Label(NamedTuple):
    name: str
    id: int  # the official label ID, as stored in *_labelIds.png
    train_id: int  # 0-18 for the classes scored, 255 for the others


LABELS = (
    Label("unlabeled", 0, 255),
    Label("ego vehicle", 1, 255),
    Label("rectification border", 2, 255),
    Label("out of roi", 3, 255),
    Label("static", 4, 255),
    Label("dynamic", 5, 255),
    Label("ground", 6, 255),
    Label("road", 7, 0),
    Label("sidewalk", 8, 1),
    Label("parking", 9, 255),
    Label("rail track", 10, 255),
    Label("building", 11, 2),
    Label("wall", 12, 3),
    Label("fence", 13, 4),
    Label("guard rail", 14, 255),
    Label("bridge", 15, 255),
    Label("tunnel", 16, 255),
    Label("pole", 17, 5),
    Label("polegroup", 18, 255),
    Label("traffic light", 19, 6),
    Label("traffic sign", 20, 7),
    Label("vegetation", 21, 8),
    Label("terrain", 22, 9),
    Label("sky", 23, 10),
    Label("person", 24, 11),
    Label("rider", 25, 12),
    Label("car", 26, 13),
    Label("truck", 27, 14),
    Label("bus", 28, 15),
    Label("caravan", 29, 255),
    Label("trailer", 30, 255),
    Label("train", 31, 16),
    Label("motorcycle", 32, 17),
    Label("bicycle", 33, 18),
    Label("license plate", -1, 255),
)

#: label ID -> train ID (255 for the classes not scored), for the 34 IDs of the label files
#: and the license plate's -1.
LABEL_ID_TO_TRAIN_ID: dict[int, int] = {label.id: label.train_id for label in LABELS}
#: train ID (0-18) -> label ID.
TRAIN_ID_TO_LABEL_ID: tuple[int, ...] = tuple(
    label.id for label in sorted(LABELS, key=lambda x: x.train_id) if label.train_id != 255
)
CLASS_NAMES: tuple[str, ...] = tuple(
    label.name for label in sorted(LABELS, key=lambda x: x.train_id) if label.train_id != 255
)
#: the official colours of the 19 classes, in train ID order.
PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip


def _label_id_lut(ignore_index: int) -> np.ndarray:
    # A value that is no label ID (34-254) keeps its value, so that the label checks report it
    # as found in the file; 255 is -1 (license plate) written as a byte.
    lut = np.arange(256, dtype=np.int64)
    for label_id, train_id in LABEL_ID_TO_TRAIN_ID.items():
        lut[label_id % 256] = ignore_index if train_id == 255 else train_id
    return lut


def label_ids_to_train_ids(label_ids: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Maps a map of official label IDs (uint8) to train IDs, every unscored class to
    ``ignore_index``; uint8 out when ``ignore_index`` fits in a byte."""
    lut = _label_id_lut(ignore_index)
    if 0 <= ignore_index <= 255:
        lut = lut.astype(np.uint8)
    return lut[np.asarray(label_ids, dtype=np.uint8)]


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Maps train IDs (0-18) back to label IDs (uint8); any other value becomes 0
    ("unlabeled"), which the official evaluation never scores."""
    lut = np.zeros(256, np.uint8)
    lut[: len(TRAIN_ID_TO_LABEL_ID)] = TRAIN_ID_TO_LABEL_ID
    train_ids = np.asarray(train_ids).astype(np.int64)
    return lut[np.where((train_ids >= 0) & (train_ids < 256), train_ids, 0)]


def _splits_in(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []


ANNOTATIONS = ("gtFine", "gtCoarse")
LAYOUT = (
    "{root}/leftImg8bit/{split}/CITY/*_leftImg8bit.png and "
    "{root}/{ann}/{split}/CITY/*_{ann}_labelIds.png (register and download leftImg8bit_"
    "trainvaltest.zip and gtFine_trainvaltest.zip at https://www.cityscapes-dataset.com)"
)


class Cityscapes(FilePairDataset):
    """Cityscapes semantic segmentation with the 19 train IDs, 255 ignored.

    Args:
        root: the folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``train`` (2,975 images), ``val`` (500) or ``test`` (1,525, whose public
            labels are all void); ``train_extra`` with ``annotations="gtCoarse"``.
        annotations: ``gtFine`` or ``gtCoarse``.
        download: Cityscapes needs a login: ``True`` explains where to register.
        **kwargs: see ``SegmentationDataset``.
    """

    class_names = CLASS_NAMES
    palette = PALETTE

    def __init__(
        self, *, root: str | Path | None, split: str = "train", annotations: str = "gtFine",
        download: bool = False, **kwargs,
    ) -> None:  # fmt: skip
        if download:
            from fcnseg.data.download import download as fetch

            fetch("cityscapes", root)
        if annotations not in ANNOTATIONS:
            raise UserError(f"annotations={annotations!r} is not one of {', '.join(ANNOTATIONS)}")
        if root is None:
            raise UserError(
                "dataset.root is not set: pass dataset.root=DIR, the folder holding leftImg8bit/"
            )
        self.root, self.split, self.annotations = Path(root).expanduser(), split, annotations
        layout = LAYOUT.format(root=self.root, split=split, ann=annotations)
        image_dir = self.root / "leftImg8bit" / split
        label_dir = self.root / annotations / split
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                found = _splits_in(folder.parent)
                known = f"; {folder.parent} holds the splits {', '.join(found)}" if found else ""
                raise UserError(
                    f"Cityscapes folder {folder} does not exist; expected {layout}{known}"
                )
        images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
        if not images:
            raise UserError(
                f"{image_dir} holds no CITY/*_leftImg8bit.png images; expected {layout}"
            )
        suffix = f"_{annotations}_labelIds.png"
        labels = [
            label_dir / p.parent.name / p.name.replace("_leftImg8bit.png", suffix) for p in images
        ]
        kwargs.setdefault("num_classes", len(CLASS_NAMES))
        super().__init__(images=images, labels=labels, **kwargs)
        self._lut = _label_id_lut(self.ignore_index)
        if 0 <= self.ignore_index <= 255:
            self._lut = self._lut.astype(np.uint8)

    def read_label_file(self, path: Path) -> np.ndarray:
        label_ids = read_label(path)
        if label_ids.dtype != np.uint8:
            raise UserError(
                f"label {path} is not an 8-bit image of label IDs; Cityscapes labels are the "
                "*_labelIds.png files"
            )
        return self._lut[label_ids]
