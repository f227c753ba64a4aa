"""Datasets refuse empty splits and unknown split names in one sentence that names the file or
the splits there are, decode errors name the file, and every file dataset tells its folders."""

from __future__ import annotations

import fixtures as fx
import pytest
from conftest import ROOT, TINY_RUN, run_script

from fcnseg.data import (
    CamVid,
    Cityscapes,
    COCOSegmentation,
    CorruptFileError,
    SBDSegmentation,
    SegmentationFolder,
    SyntheticShapes,
    VOCSegmentation,
)
from fcnseg.data.io import read_image, read_label, read_mat_label
from fcnseg.errors import UserError


def test_an_empty_voc_split_file_is_named(tmp_path):
    root = fx.write_voc(tmp_path)
    listing = root / "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt"
    listing.write_text("\n")
    with pytest.raises(UserError) as err:
        VOCSegmentation(root=root, split="train")
    assert str(err.value) == (
        f"VOC split file {listing} is empty; it must list one image id per line"
    )
    VOCSegmentation(root=root, split="val")  # the other splits still load


def test_an_empty_sbd_split_file_and_folder_listing_are_named(tmp_path):
    root = fx.write_sbd(tmp_path / "sbd")
    (root / "benchmark_RELEASE/dataset/val.txt").write_text("")
    with pytest.raises(UserError, match=r"^SBD split file .*dataset/val.txt is empty"):
        SBDSegmentation(root=root, split="val")
    folder = fx.write_folder(tmp_path / "folder", layout="list")
    (folder / "val.txt").write_text("")
    with pytest.raises(UserError, match=f"^{folder / 'val.txt'} lists no images"):
        SegmentationFolder(root=folder, split="val", class_names=["a", "b", "c"])


def test_training_on_an_empty_split_file_is_one_sentence(tmp_path):
    """It once failed deep in the sampler with "cannot sample from an empty dataset"."""
    root = fx.write_voc(tmp_path / "voc")
    listing = root / "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt"
    listing.write_text("")
    run = run_script(
        "train.py", "dataset=voc", f"dataset.root={root}", "backbone.pretrained=false",
        *[o for o in TINY_RUN if not o.startswith("dataset.builder")],
        f"hydra.run.dir={tmp_path / 'run'}", cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.strip().splitlines() == [
        f"train.py: error: VOC split file {listing} is empty; it must list one image id per line"
    ]


def test_unknown_splits_name_the_splits_there_are(tmp_path):
    camvid = fx.write_camvid(tmp_path / "camvid")
    with pytest.raises(UserError) as err:
        CamVid(root=camvid, split="valid")
    message = str(err.value)
    assert message.startswith(f"CamVid folder {camvid / 'valid'} does not exist; expected")
    assert message.endswith(f"; {camvid} holds the splits test, train, val")
    cityscapes = fx.write_cityscapes(tmp_path / "cityscapes")
    with pytest.raises(UserError) as err:
        Cityscapes(root=cityscapes, split="tset")
    assert str(err.value).startswith(
        f"Cityscapes folder {cityscapes / 'leftImg8bit/tset'} does not exist"
    )
    assert str(err.value).endswith(f"; {cityscapes / 'leftImg8bit'} holds the splits train, val")
    coco = fx.write_coco(tmp_path / "coco", split="val")
    with pytest.raises(UserError) as err:
        COCOSegmentation(root=coco, split="train")
    assert str(err.value).startswith(
        f"COCO {coco / 'annotations/instances_train2017.json'} does not exist"
    )
    assert str(err.value).endswith(f"; {coco} holds the splits val")


def test_a_coco_split_without_images_is_named(tmp_path):
    coco = fx.write_coco(tmp_path, scenes=fx.COCO_SCENES[2:])  # no object at all
    ann = coco / "annotations/instances_val2017.json"
    with pytest.raises(UserError) as err:
        COCOSegmentation(root=coco, split="val", min_object_area=1)
    assert str(err.value) == (
        f"no image of {ann} has objects covering dataset.min_object_area=1 pixels"
    )


@pytest.mark.parametrize(
    "read, content",
    [
        (read_image, b"not an image"),
        (read_label, b"not an image"),
        (read_label, b"\x89PNG\r\n\x1a\n" + b"\x00" * 40),  # a PNG signature, then nothing
        (read_mat_label, b"MATLAB 5.0 MAT-file" + b"\x00" * 200),
    ],
)
def test_decode_errors_name_the_file_not_a_buffer(tmp_path, read, content):
    path = tmp_path / "sample.bin"
    path.write_bytes(content)
    with pytest.raises(CorruptFileError) as err:
        read(path)
    message = str(err.value)
    assert str(path) in message and "BytesIO" not in message and "<_io" not in message
    assert "\n" not in message and err.value.path == path


def test_file_datasets_tell_their_folders_root_first(tmp_path):
    voc = VOCSegmentation(root=fx.write_voc(tmp_path / "voc"), split="val")
    base = tmp_path / "voc/VOCdevkit/VOC2012"
    assert voc.data_folders() == [base, base / "JPEGImages", base / "SegmentationClass"]
    camvid = CamVid(root=fx.write_camvid(tmp_path / "camvid"), split="val")
    root = tmp_path / "camvid"
    assert camvid.data_folders() == [root, root / "val", root / "valannot"]
    assert camvid.label_files() == camvid.labels
    assert SyntheticShapes(split="val", num_samples=2).data_folders() == []
