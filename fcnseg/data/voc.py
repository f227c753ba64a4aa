"""PASCAL VOC 2012, the Semantic Boundaries Dataset (SBD) and their "train_aug" union.

- VOC 2012 (``VOCdevkit/VOC2012``): JPEGImages/<id>.jpg, SegmentationClass/<id>.png (palette
  PNGs whose *indices* are the classes; 255 marks object borders and difficult regions, not
  scored), ImageSets/Segmentation/{train,val,trainval}.txt (1,464 / 1,449 / 2,913 ids).
- SBD (``benchmark_RELEASE/dataset``, Hariharan et al. 2011): img/<id>.jpg, cls/<id>.mat
  (``GTcls.Segmentation``, class indices without ignored borders), train.txt / val.txt
  (8,498 / 2,857 ids), drawn from VOC 2011's images.
- ``seg11valid``: the 736 VOC 2011 segmentation val images that are not in SBD train, the
  validation set the FCN paper reports on (list from the reference fcn.berkeleyvision.org
  repository's ``data/pascal/seg11valid.txt``, shipped in ``fcnseg/data/splits``). It is scored
  on VOC's own labels, so it needs the VOC devkit even when training on SBD.
- ``voc_aug`` train: VOC 2012 train + SBD train + SBD val, minus VOC 2012 val (10,582 images
  on the real data). An image with a VOC label keeps it (with VOC's ignored borders); the
  others take SBD's.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from fcnseg.data.base import FilePairDataset, missing_layout
from fcnseg.data.io import read_label, read_mat_label
from fcnseg.errors import UserError

CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
VOID = 255  # VOC's value for object borders and difficult regions
SEG11VALID_FILE = Path(__file__).parent / "splits" / "seg11valid.txt"

VOC_LAYOUT = (
    "{root}/VOCdevkit/VOC{year} (or {root}/VOC{year}, or {root} itself) holding JPEGImages/, "
    "SegmentationClass/ and ImageSets/Segmentation/"
)
SBD_LAYOUT = (
    "{root}/benchmark_RELEASE/dataset (or {root}/dataset, or {root} itself) holding img/, cls/, "
    "train.txt and val.txt"
)


def seg11valid_ids() -> list[str]:
    """The 736 image ids of the FCN paper's seg11valid set."""
    return SEG11VALID_FILE.read_text().split()


def find_voc(root: str | Path | None, year: str = "2012", key: str = "dataset.root") -> Path:
    """The ``VOC<year>`` folder under ``root``; a ``UserError`` describing the layout if none."""
    if root is None:
        raise UserError(f"{key} is not set: pass {key}=DIR, the folder holding VOCdevkit/")
    root = Path(root).expanduser()
    for base in (root / "VOCdevkit" / f"VOC{year}", root / f"VOC{year}", root):
        if (base / "JPEGImages").is_dir() and (base / "SegmentationClass").is_dir():
            return base
    raise UserError(
        f"{key}={root} holds no VOC {year}: expected {VOC_LAYOUT.format(root=root, year=year)}"
    )


def find_sbd(root: str | Path | None, key: str = "dataset.root") -> Path:
    """SBD's ``dataset`` folder under ``root``; a ``UserError`` describing the layout if none."""
    if root is None:
        raise UserError(f"{key} is not set: pass {key}=DIR, the folder holding benchmark_RELEASE/")
    root = Path(root).expanduser()
    for base in (root / "benchmark_RELEASE" / "dataset", root / "dataset", root):
        if (base / "img").is_dir() and (base / "cls").is_dir():
            return base
    raise UserError(f"{key}={root} holds no SBD: expected {SBD_LAYOUT.format(root=root)}")


def read_ids(path: Path, what: str, known: Iterable[str]) -> list[str]:
    """The ids listed in split file ``path``."""
    if not path.is_file():
        raise missing_layout(
            f"{what} split file", path,
            f"split= one of {', '.join(sorted(set(known)))} (files of one image id per line)",
        )  # fmt: skip
    ids = path.read_text().split()
    if not ids:
        # An empty split would only fail later, far from its cause ("cannot sample from an
        # empty dataset").
        raise UserError(f"{what} split file {path} is empty; it must list one image id per line")
    return ids


def voc_ids(base: Path, split: str) -> list[str]:
    """The ids of VOC split ``split`` (an ImageSets/Segmentation list, or ``seg11valid``)."""
    if split == "seg11valid":
        return seg11valid_ids()
    folder = base / "ImageSets" / "Segmentation"
    known = [p.stem for p in folder.glob("*.txt")] + ["seg11valid"]
    return read_ids(folder / f"{split}.txt", "VOC", known)


def sbd_ids(base: Path, split: str) -> list[str]:
    known = [p.stem for p in base.glob("*.txt")] + ["seg11valid"]
    return read_ids(base / f"{split}.txt", "SBD", known)


class _VOCFamily(FilePairDataset):
    """VOC-style samples: JPEG images with VOC palette PNG or SBD .mat labels."""

    class_names = CLASS_NAMES

    def __init__(self, *, pairs: list[tuple[Path, Path]], **kwargs) -> None:
        kwargs.setdefault("num_classes", len(CLASS_NAMES))
        super().__init__(images=[p[0] for p in pairs], labels=[p[1] for p in pairs], **kwargs)

    def data_folders(self) -> list[Path]:
        bases = [getattr(self, name, None) for name in ("base", "voc_base", "sbd_base")]
        return list(dict.fromkeys([*(b for b in bases if b is not None), *super().data_folders()]))

    def read_label_file(self, path: Path) -> np.ndarray:
        mask = read_mat_label(path) if path.suffix == ".mat" else read_label(path)
        if self.ignore_index != VOID:
            mask = np.where(mask == VOID, self.ignore_index, mask.astype(np.int64))
        return mask


def _voc_pairs(base: Path, ids: Iterable[str]) -> list[tuple[Path, Path]]:
    return [
        (base / "JPEGImages" / f"{i}.jpg", base / "SegmentationClass" / f"{i}.png") for i in ids
    ]


def _sbd_pairs(base: Path, ids: Iterable[str]) -> list[tuple[Path, Path]]:
    return [(base / "img" / f"{i}.jpg", base / "cls" / f"{i}.mat") for i in ids]


def _download(name: str, root: str | Path | None, key: str) -> None:
    from fcnseg.data.download import download

    if root is None:
        raise UserError(f"dataset.download=true needs {key}=DIR, the folder to download into")
    download(name, root)


class VOCSegmentation(_VOCFamily):
    """PASCAL VOC segmentation: 21 classes (background + 20), 255 ignored.

    Args:
        root: the folder holding ``VOCdevkit/VOC2012`` (or that folder itself).
        split: an ``ImageSets/Segmentation`` list (``train``, ``val``, ``trainval``) or
            ``seg11valid``.
        year: the devkit's year (``2012``; ``2011`` for the FCN paper's own devkit).
        download: fetch and verify the VOC 2012 archive into ``root`` first if it is missing.
        **kwargs: see ``SegmentationDataset``.
    """

    def __init__(
        self, *, root: str | Path | None, split: str = "train", year: str | int = "2012",
        download: bool = False, **kwargs,
    ) -> None:  # fmt: skip
        year = str(year)
        if download:
            _download("voc", root, "dataset.root")
        self.base = find_voc(root, year)
        self.split = split
        self.ids = voc_ids(self.base, split)
        super().__init__(pairs=_voc_pairs(self.base, self.ids), **kwargs)


class SBDSegmentation(_VOCFamily):
    """The Semantic Boundaries Dataset's class segmentations (VOC's 21 classes).

    Args:
        root: SBD's ``benchmark_RELEASE/dataset`` folder or any parent of it.
        split: ``train`` or ``val`` (SBD's lists), or ``seg11valid`` (VOC images and labels,
            read from ``voc_root``).
        voc_root: the folder holding ``VOCdevkit/VOC2012`` for ``seg11valid``; ``None``
            looks under ``root``.
        download: fetch and verify SBD (and VOC 2012 for ``seg11valid``) first if missing.
        **kwargs: see ``SegmentationDataset``.
    """

    def __init__(
        self, *, root: str | Path | None, split: str = "train", voc_root: str | Path | None = None,
        download: bool = False, **kwargs,
    ) -> None:  # fmt: skip
        self.split = split
        if split == "seg11valid":
            key = "dataset.voc_root" if voc_root is not None else "dataset.root"
            voc_root = root if voc_root is None else voc_root
            if download:
                _download("voc", voc_root, key)
            try:
                self.base = find_voc(voc_root, key=key)
            except UserError as err:
                raise UserError(
                    f"split=seg11valid is scored on VOC's own images and labels: set "
                    f"dataset.voc_root=DIR to the folder holding VOCdevkit/VOC2012 ({err})"
                ) from None
            self.ids = seg11valid_ids()
            pairs = _voc_pairs(self.base, self.ids)
        else:
            if download:
                _download("sbd", root, "dataset.root")
            self.base = find_sbd(root)
            self.ids = sbd_ids(self.base, split)
            pairs = _sbd_pairs(self.base, self.ids)
        super().__init__(pairs=pairs, **kwargs)


class VOCAugSegmentation(_VOCFamily):
    """VOC 2012 augmented with SBD: the "train_aug" training set and VOC's validation sets.

    Args:
        root: a folder holding both ``VOCdevkit/`` and ``benchmark_RELEASE/``, used for
            whichever of ``voc_root`` and ``sbd_root`` is ``None``.
        voc_root: the folder holding ``VOCdevkit/VOC2012``.
        sbd_root: SBD's ``benchmark_RELEASE/dataset`` folder or any parent of it.
        split: ``train`` (train_aug: VOC train + SBD train + SBD val - VOC val), ``seg11valid``,
            or a VOC list (``val``, ``trainval``: VOC images and labels only).
        download: fetch and verify VOC 2012 and SBD first if missing.
        **kwargs: see ``SegmentationDataset``.
    """

    def __init__(
        self, *, root: str | Path | None = None, voc_root: str | Path | None = None,
        sbd_root: str | Path | None = None, split: str = "train", download: bool = False, **kwargs,
    ) -> None:  # fmt: skip
        voc_key = "dataset.voc_root" if voc_root is not None else "dataset.root"
        sbd_key = "dataset.sbd_root" if sbd_root is not None else "dataset.root"
        voc_root = root if voc_root is None else voc_root
        sbd_root = root if sbd_root is None else sbd_root
        if download:
            _download("voc", voc_root, voc_key)
        self.split = split
        self.voc_base = find_voc(voc_root, key=voc_key)
        if split != "train":
            self.ids = voc_ids(self.voc_base, split)
            super().__init__(pairs=_voc_pairs(self.voc_base, self.ids), **kwargs)
            return
        if download:
            _download("sbd", sbd_root, sbd_key)
        self.sbd_base = find_sbd(sbd_root, key=sbd_key)
        voc_train = set(voc_ids(self.voc_base, "train"))
        voc_val = set(voc_ids(self.voc_base, "val"))
        sbd = set(sbd_ids(self.sbd_base, "train")) | set(sbd_ids(self.sbd_base, "val"))
        self.ids = sorted((voc_train | sbd) - voc_val)
        pairs = [
            _voc_pairs(self.voc_base, [i])[0]
            if i in voc_train
            else _sbd_pairs(self.sbd_base, [i])[0]
            for i in self.ids
        ]
        super().__init__(pairs=pairs, **kwargs)
