"""COCO 2017 instance annotations turned into semantic label maps, on the fly.

``root/{split}2017/*.jpg`` are the images and ``root/annotations/instances_{split}2017.json``
their instance annotations, decoded with pycocotools whatever their form (polygons, run-length
encoded or not). A label map starts as background (0); every object of a selected category
paints its class; pixels that objects of two different classes both claim are ambiguous and
ignored; crowd regions (``iscrowd=1``) of a selected category are ignored. Objects of the other
categories stay background.

``categories="voc"`` keeps the 20 PASCAL VOC categories (21 classes with background, the
classes of the VOC configs, in VOC's order), ``categories="all"`` the 80 COCO "things"
(81 classes, in COCO's category-id order).
"""

from __future__ import annotations

import json
import pickle
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fcnseg.data.base import SegmentationDataset
from fcnseg.data.io import CorruptFileError, read_image
from fcnseg.data.voc import CLASS_NAMES as VOC_CLASS_NAMES
from fcnseg.errors import UserError

#: COCO category id and name of each of the 80 "thing" categories.
THINGS = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"),
    (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)  # fmt: skip
#: COCO category ids of VOC's 20 classes, in VOC's order (aeroplane = airplane, ...).
VOC_CATEGORY_IDS = (5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72)
CATEGORY_SETS: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {
    "voc": (VOC_CATEGORY_IDS, VOC_CLASS_NAMES),
    "all": (tuple(i for i, _ in THINGS), ("background", *(n for _, n in THINGS))),
}
LAYOUT = "{root}/{split}{year}/ and {root}/annotations/instances_{split}{year}.json"


class _Packed:
    """A list of Python objects kept as one byte array.

    A list of dicts is touched by every DataLoader worker's reference counting, which copies the
    pages that hold it into each forked worker; one NumPy buffer is shared untouched.
    """

    def __init__(self, items: Sequence[Any]) -> None:
        blobs = [pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL) for x in items]
        self.offsets = np.cumsum([0] + [len(b) for b in blobs])
        self.buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Any:
        return pickle.loads(self.buffer[self.offsets[i] : self.offsets[i + 1]].tobytes())


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """One COCO annotation's ``segmentation`` (polygons, uncompressed or compressed RLE) as an
    (H, W) bool mask."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):  # polygons [[x1, y1, x2, y2, ...], ...]
        # pycocotools takes a list whose first entry has 4 numbers for boxes: drop the
        # degenerate polygons (fewer than 3 points) that COCO holds, which cover nothing.
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE (crowds)
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:  # compressed RLE
        rle = segmentation
    with warnings.catch_warnings():
        # pycocotools' Cython array predates NumPy 2's copy keyword; the result is unaffected.
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


class COCOSegmentation(SegmentationDataset):
    """COCO instances as semantic segmentation.

    Args:
        root: the folder holding ``train2017/``, ``val2017/`` and ``annotations/``.
        split: ``train`` or ``val``.
        categories: ``voc`` (20 categories + background) or ``all`` (80 + background).
        year: the release (``2017``).
        min_object_area: leave out images whose non-crowd objects of the selected categories
            cover fewer pixels than this in total (by the annotations' ``area``); torchvision's
            reference training uses 1000 on the training split. 0 keeps every image.
        download: fetch and verify the split's images and the annotations first if missing.
        **kwargs: see ``SegmentationDataset``; ``num_classes`` must match ``categories``.
    """

    def __init__(
        self,
        *,
        root: str | Path | None,
        split: str = "train",
        categories: str = "voc",
        year: str | int = "2017",
        min_object_area: float = 0,
        download: bool = False,
        **kwargs,
    ) -> None:
        if categories not in CATEGORY_SETS:
            raise UserError(
                f"dataset.categories={categories!r} is not one of {', '.join(CATEGORY_SETS)}"
            )
        if root is None:
            raise UserError(
                "dataset.root is not set: pass dataset.root=DIR, the folder holding "
                "annotations/ and val2017/"
            )
        ids, self.class_names = CATEGORY_SETS[categories]
        kwargs.setdefault("num_classes", len(self.class_names))
        if kwargs["num_classes"] != len(self.class_names):
            raise UserError(
                f"dataset.num_classes={kwargs['num_classes']} but dataset.categories={categories} "
                f"has {len(self.class_names)} classes (with background)"
            )
        super().__init__(**kwargs)
        if download:
            from fcnseg.data.download import download as fetch

            fetch("coco", root, split=split)
        self.root, self.split, self.categories = Path(root).expanduser(), split, categories
        layout = LAYOUT.format(root=self.root, split=split, year=year)
        self.image_dir = self.root / f"{split}{year}"
        self.ann_file = self.root / "annotations" / f"instances_{split}{year}.json"
        for path in (self.ann_file, self.image_dir):
            if not path.exists():
                found = sorted(
                    f.name[len("instances_") : -len(f"{year}.json")]
                    for f in (self.root / "annotations").glob(f"instances_*{year}.json")
                )
                known = f"; {self.root} holds the splits {', '.join(found)}" if found else ""
                raise UserError(f"COCO {path} does not exist; expected {layout}{known}")
        data = self._read_annotations()
        present = {c["id"] for c in data.get("categories", [])}
        if not set(ids) <= present:
            raise UserError(
                f"{self.ann_file} lacks the COCO categories {sorted(set(ids) - present)} of "
                f"dataset.categories={categories}"
            )
        class_of = {cat_id: k + 1 for k, cat_id in enumerate(ids)}
        objects: dict[int, list[tuple[int, int, Any]]] = {}
        area: dict[int, float] = {}
        for ann in data.get("annotations", []):
            cls = class_of.get(ann["category_id"])
            if cls is None:
                continue  # another category: background
            crowd = int(ann.get("iscrowd", 0))
            objects.setdefault(ann["image_id"], []).append((cls, crowd, ann["segmentation"]))
            if not crowd:
                area[ann["image_id"]] = area.get(ann["image_id"], 0.0) + float(ann.get("area", 0))
        records = [
            (img["id"], img["file_name"], img["height"], img["width"], objects.get(img["id"], []))
            for img in sorted(data["images"], key=lambda im: im["id"])
            if min_object_area <= 0 or area.get(img["id"], 0.0) >= min_object_area
        ]
        del data
        if not records:
            raise UserError(
                f"no image of {self.ann_file} has objects covering "
                f"dataset.min_object_area={min_object_area} pixels"
                if min_object_area > 0
                else f"{self.ann_file} lists no images"
            )
        self.samples = _Packed(records)
        self.sizes = np.array([(r[2], r[3]) for r in records], dtype=np.int64).reshape(-1, 2)
        self.files = [r[1] for r in records]
        self.image_ids = [r[0] for r in records]

    def _read_annotations(self) -> dict[str, Any]:
        try:
            with open(self.ann_file, "rb") as f:
                data = json.load(f)
        except (OSError, ValueError) as err:
            raise UserError(f"{self.ann_file} cannot be read as COCO annotations ({err})") from None
        if not isinstance(data, dict) or "images" not in data:
            raise UserError(f'{self.ann_file} holds no COCO "images" list')
        return data

    def __len__(self) -> int:
        return len(self.samples)

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.files[index]

    def data_folders(self) -> list[Path]:
        return [self.root, self.image_dir, self.ann_file.parent]

    def label_files(self) -> list[Path]:
        return [self.ann_file]

    def describe(self, index: int) -> str:
        return f"{self.image_path(index)} (image id {self.image_ids[index]} of {self.ann_file})"

    def describe_label(self, index: int) -> str:
        return f"the annotations of image id {self.image_ids[index]} in {self.ann_file}"

    def image_size(self, index: int) -> tuple[int, int]:
        h, w = self.sizes[index]
        return int(h), int(w)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image = read_image(self.image_path(index))
        return image, self.label(index)

    def label(self, index: int) -> np.ndarray:
        """The semantic label map of sample ``index``, built from its annotations."""
        _, _, h, w, objects = self.samples[index]
        dtype = np.uint8 if 0 <= self.ignore_index <= 255 else np.int64
        label = np.zeros((h, w), dtype)
        ambiguous = np.zeros((h, w), bool)
        crowd = np.zeros((h, w), bool)
        for cls, is_crowd, segmentation in objects:
            try:
                mask = decode_segmentation(segmentation, h, w)
            except Exception as err:  # pycocotools raises bare Exceptions on malformed input
                raise CorruptFileError(
                    f"{self.describe_label(index)}: a segmentation cannot be decoded ({err})",
                    self.ann_file,
                ) from None
            if is_crowd:
                crowd |= mask
                continue
            ambiguous |= mask & (label != 0) & (label != cls)
            label[mask] = cls
        label[ambiguous | crowd] = self.ignore_index
        return label
