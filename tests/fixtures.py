"""Tiny datasets written on the fly in the real on-disk formats, for tests.

Every ``write_*`` function takes the folder to write into and returns the path to pass as
``dataset.root``. Sample contents are a pure function of a key (``sample_arrays``), so a test can
compute what a dataset must return without reading the files back: ``voc/<id>`` for VOC
labels, ``sbd/<id>`` for SBD, ``cityscapes/<name>``, ``camvid/<split>/<name>``,
``folder/<split>/<name>``.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

# The VOC layout is written by the library's writer, which the data benchmark uses too;
# save_palette_png is the tests' way to write a label file of their own.
from fcnseg.bench.voc_layout import save_palette_png, write_voc_layout  # noqa: F401

VOC_TRAIN = ("2007_000001", "2007_000002", "2008_000003")
VOC_VAL = ("2007_000033", "2007_000042")  # the first two ids of seg11valid
SBD_TRAIN = ("2007_000002", "2008_000010", "2008_000011")
SBD_VAL = ("2008_000003", "2007_000042", "2008_000012")
SIZES = ((24, 32), (32, 24), (28, 36))  # (height, width): landscape, portrait, another
CITYSCAPES = {
    "train": ("aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313"),
    "val": ("frankfurt_000000_000294", "lindau_000000_000019"),
}
# The values a Cityscapes *_labelIds.png may hold: 0-33 (license plate, -1, is written as 255).
CITYSCAPES_LABEL_IDS = tuple(range(34))


def _rng(key: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(key.encode()))


def sample_arrays(
    key: str,
    *,
    size: tuple[int, int] | None = None,
    values: Sequence[int] = tuple(range(21)),
    border: int | None = 255,
) -> tuple[np.ndarray, np.ndarray]:
    """The (image (H, W, 3) uint8, label (H, W) uint8) of sample ``key``.

    The label is ``values[0]`` with 2-4 rectangles of other ``values`` on it, each outlined by
    a 1-pixel ``border`` (VOC's ignored object outlines) unless ``border`` is None. ``size``
    defaults to one of ``SIZES``, chosen by the key.
    """
    rng = _rng(key)
    h, w = size if size is not None else SIZES[zlib.adler32(key.encode()) % len(SIZES)]
    label = np.full((h, w), values[0], np.uint8)
    for _ in range(int(rng.integers(2, 5))):
        y0, x0 = int(rng.integers(0, h - 6)), int(rng.integers(0, w - 6))
        y1, x1 = int(rng.integers(y0 + 4, h + 1)), int(rng.integers(x0 + 4, w + 1))
        if border is not None:
            label[y0:y1, x0:x1] = border
            label[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1] = values[int(rng.integers(1, len(values)))]
        else:
            label[y0:y1, x0:x1] = values[int(rng.integers(1, len(values)))]
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return image, label


def voc_palette() -> list[int]:
    """VOC's 256-colour map, flat, as in its SegmentationClass PNGs."""
    out = []
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out += [r, g, b]
    return out


def _save(array: np.ndarray, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def write_voc(
    root: str | Path,
    *,
    train: Sequence[str] = VOC_TRAIN,
    val: Sequence[str] = VOC_VAL,
    year: str = "2012",
) -> Path:
    """``root/VOCdevkit/VOC<year>``: JPEGImages/*.jpg, SegmentationClass/*.png (palette PNGs of
    ``sample_arrays("voc/<id>")`` labels, 255 outlines), ImageSets/Segmentation/{train,val,
    trainval}.txt. Returns ``root``."""
    return write_voc_layout(
        root,
        sample=lambda i: sample_arrays(f"voc/{i}"),
        splits={"train": train, "val": val, "trainval": (*train, *val)},
        year=year,
        quality=95,
    )


def write_sbd_mat(path: Path, segmentation: np.ndarray) -> None:
    """An SBD ``cls/*.mat``: struct GTcls with Boundaries (20x1 cell of sparse edge maps),
    Segmentation (uint8 class map) and CategoriesPresent, as the release stores them."""
    from scipy import sparse
    from scipy.io import savemat

    boundaries = np.empty((20, 1), dtype=object)
    for c in range(20):
        region = segmentation == c + 1
        edge = region & ~np.pad(region, 1)[2:, 1:-1]  # the region's lower edge will do
        boundaries[c, 0] = sparse.csc_matrix(edge)
    present = np.array([c for c in np.unique(segmentation) if 0 < c < 255], np.uint8).reshape(-1, 1)
    gt = {
        "Boundaries": boundaries,
        "Segmentation": segmentation.astype(np.uint8),
        "CategoriesPresent": present,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, {"GTcls": gt}, do_compression=True)


def write_sbd(
    root: str | Path, *, train: Sequence[str] = SBD_TRAIN, val: Sequence[str] = SBD_VAL
) -> Path:
    """``root/benchmark_RELEASE/dataset``: img/*.jpg, cls/*.mat (``sample_arrays("sbd/<id>")``
    labels, no ignored outlines, as SBD's), inst/ (empty), train.txt, val.txt. Returns ``root``."""
    root = Path(root)
    base = root / "benchmark_RELEASE" / "dataset"
    (base / "inst").mkdir(parents=True, exist_ok=True)
    for i in (*train, *val):
        image, label = sample_arrays(f"sbd/{i}", border=None)
        _save(image, base / "img" / f"{i}.jpg", quality=95)
        write_sbd_mat(base / "cls" / f"{i}.mat", label)
    (base / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (base / "val.txt").write_text("".join(f"{i}\n" for i in val))
    return root


def write_cityscapes(root: str | Path, *, splits: Mapping[str, Sequence[str]] = CITYSCAPES) -> Path:
    """``root/leftImg8bit/{split}/{city}/*_leftImg8bit.png`` and every gtFine file of the
    release: ``_gtFine_labelIds.png`` (``sample_arrays("cityscapes/<name>")`` over label IDs
    0-33), ``_color.png``, ``_instanceIds.png`` (16-bit, label ID x 1000 + 1),
    ``_polygons.json``. Returns ``root``."""
    root = Path(root)
    for split, names in splits.items():
        for name in names:
            city = name.split("_")[0]
            image, label_ids = sample_arrays(
                f"cityscapes/{name}", values=CITYSCAPES_LABEL_IDS, border=None
            )
            _save(image, root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
            gt = root / "gtFine" / split / city
            _save(label_ids, gt / f"{name}_gtFine_labelIds.png")
            ids = label_ids.astype(np.int64)
            colors = np.stack([ids * 7 % 256, ids * 13 % 256, ids * 29 % 256], -1)
            _save(colors.astype(np.uint8), gt / f"{name}_gtFine_color.png")
            instances = label_ids.astype(np.uint16) * 1000 + 1  # 16-bit grey, as released
            _save(instances, gt / f"{name}_gtFine_instanceIds.png")
            h, w = label_ids.shape
            polygons = {
                "imgHeight": h,
                "imgWidth": w,
                "objects": [{"label": "car", "polygon": [[0, 0], [w - 1, 0], [w - 1, h - 1]]}],
            }
            (gt / f"{name}_gtFine_polygons.json").write_text(json.dumps(polygons))
    return root


# COCO scenes: boxes are (x0, y0, x1, y1), half-open, written as rectangle polygons or as RLE.
# Category ids: 1 person (VOC 15), 3 car (VOC 7), 22 elephant (not in VOC), 18 dog (VOC 12).
COCO_SCENES = (
    {
        "id": 42, "file_name": "000000000042.jpg", "height": 24, "width": 32,
        "objects": (
            {"category_id": 1, "box": (2, 3, 12, 14), "segmentation": "polygon"},
            {"category_id": 3, "box": (10, 10, 20, 20), "segmentation": "rle"},  # overlaps person
            {"category_id": 22, "box": (20, 2, 30, 8), "segmentation": "polygon"},
            {"category_id": 1, "box": (0, 18, 8, 24), "segmentation": "rle", "iscrowd": 1},
            {"category_id": 1, "box": (4, 5, 8, 8), "segmentation": "polygon"},  # same class
        ),
    },
    {
        "id": 7, "file_name": "000000000007.jpg", "height": 30, "width": 20,
        "objects": (
            {"category_id": 18, "box": (1, 1, 15, 25), "segmentation": "compressed"},
            {"category_id": 22, "box": (5, 20, 20, 30), "segmentation": "rle", "iscrowd": 1},
            {"category_id": 3, "box": (16, 2, 19, 6), "segmentation": "polygon"},
        ),
    },
    {"id": 9, "file_name": "000000000009.jpg", "height": 20, "width": 24, "objects": ()},
)  # fmt: skip

COCO_THING_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27,
    28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53,
    54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80,
    81, 82, 84, 85, 86, 87, 88, 89, 90,
)  # fmt: skip


def box_mask(box: Sequence[int], height: int, width: int) -> np.ndarray:
    x0, y0, x1, y1 = box
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, zeros first."""
    flat = mask.flatten(order="F").astype(np.uint8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"counts": counts, "size": list(mask.shape)}


def write_coco(
    root: str | Path, *, split: str = "val", scenes: Sequence[dict] = COCO_SCENES
) -> Path:
    """``root/{split}2017/*.jpg`` and ``root/annotations/instances_{split}2017.json`` with the
    80 thing categories and ``scenes``' objects as polygons, uncompressed RLE and compressed
    RLE, crowds included. Returns ``root``."""
    from pycocotools import mask as mask_utils

    root = Path(root)
    images, annotations = [], []
    for scene in scenes:
        h, w = scene["height"], scene["width"]
        _save(_rng(f"coco/{scene['id']}").integers(0, 256, (h, w, 3), dtype=np.uint8),
              root / f"{split}2017" / scene["file_name"], quality=95)  # fmt: skip
        images.append({"id": scene["id"], "file_name": scene["file_name"], "height": h, "width": w})
        for obj in scene["objects"]:
            mask = box_mask(obj["box"], h, w)
            x0, y0, x1, y1 = obj["box"]
            if obj["segmentation"] == "polygon":
                segmentation = [
                    [x0, y0, x1, y0, x1, y1, x0, y1],
                    [1, 1, 2, 2],
                ]  # + a degenerate one
            elif obj["segmentation"] == "rle":
                segmentation = uncompressed_rle(mask)
            else:
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                segmentation = {"counts": rle["counts"].decode(), "size": [h, w]}
            annotations.append({
                "id": len(annotations) + 1, "image_id": scene["id"],
                "category_id": obj["category_id"], "iscrowd": obj.get("iscrowd", 0),
                "segmentation": segmentation, "area": float(mask.sum()),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
            })  # fmt: skip
    data = {
        "info": {"description": "fixture"},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i, "name": f"category {i}", "supercategory": "thing"} for i in COCO_THING_IDS
        ],
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    return root


def write_camvid(
    root: str | Path, *, splits: Mapping[str, int] = {"train": 3, "val": 2, "test": 2}
) -> Path:
    """``root/{split}/*.png`` and ``root/{split}annot/*.png`` (grey class indices 0-10, 11 =
    void; ``sample_arrays("camvid/<split>/<name>")``), SegNet's names. Returns ``root``."""
    root = Path(root)
    for split, n in splits.items():
        for k in range(n):
            name = f"0001TP_{6690 + 30 * k:06d}.png"
            image, label = sample_arrays(f"camvid/{split}/{name}", values=range(12), border=11)
            _save(image, root / split / name)
            _save(label, root / f"{split}annot" / name)
    return root


def write_folder(
    root: str | Path,
    *,
    splits: Mapping[str, int] = {"train": 3, "val": 2},
    num_classes: int = 3,
    layout: str = "split_first",
) -> Path:
    """A folder dataset: JPEG images and grey PNG masks (``sample_arrays("folder/<split>/<name>")``,
    classes 0..num_classes-1, 255 outlines). ``layout``: ``split_first`` (root/S/images,
    root/S/masks), ``split_last`` (root/images/S, root/masks/S) or ``list`` (root/images,
    root/masks, root/S.txt). Returns ``root``."""
    root = Path(root)
    for split, n in splits.items():
        names = [f"{split}_{k:03d}" for k in range(n)]
        for name in names:
            image, label = sample_arrays(f"folder/{split}/{name}", values=range(num_classes))
            if layout == "split_first":
                images, masks = root / split / "images", root / split / "masks"
            elif layout == "split_last":
                images, masks = root / "images" / split, root / "masks" / split
            else:
                images, masks = root / "images", root / "masks"
            _save(image, images / f"{name}.jpg", quality=95)
            _save(label, masks / f"{name}.png")
        if layout == "list":
            (root / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return root
