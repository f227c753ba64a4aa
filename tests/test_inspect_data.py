"""scripts/inspect_data.py and fcnseg.data.inspection on fixtures with known defects."""

from __future__ import annotations

import json
from collections import Counter

import fixtures as fx
import numpy as np
from conftest import run_script
from PIL import Image

from fcnseg.data import Cityscapes, VOCSegmentation
from fcnseg.data.inspection import format_report, inspect_dataset
from fcnseg.data.voc import CLASS_NAMES

TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
             25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip


def voc_with_defects(tmp_path):
    """The VOC fixture's train split with label value 30 (x5 pixels) in sample 0, a truncated
    JPEG as sample 1 and a label of the wrong size in sample 2, plus the labels expected."""
    root = fx.write_voc(tmp_path)
    base = root / "VOCdevkit/VOC2012"
    labels = {i: fx.sample_arrays(f"voc/{i}")[1].copy() for i in fx.VOC_TRAIN}
    labels[fx.VOC_TRAIN[0]][0, :5] = 30
    fx.save_palette_png(
        labels[fx.VOC_TRAIN[0]], base / "SegmentationClass" / f"{fx.VOC_TRAIN[0]}.png"
    )
    jpg = base / "JPEGImages" / f"{fx.VOC_TRAIN[1]}.jpg"
    jpg.write_bytes(jpg.read_bytes()[:200])
    labels[fx.VOC_TRAIN[2]] = labels[fx.VOC_TRAIN[2]][:-2]
    fx.save_palette_png(
        labels[fx.VOC_TRAIN[2]], base / "SegmentationClass" / f"{fx.VOC_TRAIN[2]}.png"
    )
    return root, labels


def test_statistics_and_problems_with_files(tmp_path):
    root, labels = voc_with_defects(tmp_path)
    ds = VOCSegmentation(root=root, split="train")
    stats = inspect_dataset(ds, class_names=CLASS_NAMES, ignore_index=255)
    readable = [labels[fx.VOC_TRAIN[0]], labels[fx.VOC_TRAIN[2]]]
    counts = sum(np.bincount(x.ravel(), minlength=256) for x in readable)
    assert stats["num_samples"] == 3
    assert stats["class_pixels"] == {name: int(counts[k]) for k, name in enumerate(CLASS_NAMES)}
    assert stats["ignored_pixels"] == counts[255] and stats["total_pixels"] == counts.sum()
    assert stats["out_of_range"] == {"30": {"pixels": 5, "samples": 1, "file": str(ds.labels[0])}}
    assert len(stats["unreadable"]) == 1 and str(ds.images[1]) in stats["unreadable"][0]["error"]
    (h, w), (lh, lw) = fx.sample_arrays(f"voc/{fx.VOC_TRAIN[2]}")[1].shape, readable[1].shape
    assert stats["size_mismatches"] == [
        {"file": ds.describe(2), "image": f"{w}x{h}", "label": f"{lw}x{lh}"}
    ]
    shapes = [fx.sample_arrays(f"voc/{fx.VOC_TRAIN[k]}")[1].shape for k in (0, 2)]
    assert stats["image_sizes"]["count"] == dict(Counter(f"{w}x{h}" for h, w in shapes))
    report = format_report(stats)
    line = "label value 30 is neither a class nor the ignore index 255: 5 pixels in 1 samples"
    assert f"{line}, e.g. {ds.labels[0]}" in report
    assert "3 problem(s) found" in report


def test_statistics_are_taken_on_train_ids(tmp_path):
    root = fx.write_cityscapes(tmp_path)
    ds = Cityscapes(root=root, split="val")
    stats = inspect_dataset(ds, class_names=ds.class_names, ignore_index=255)
    expected = np.zeros(256, np.int64)
    for name in fx.CITYSCAPES["val"]:
        ids = fx.sample_arrays(f"cityscapes/{name}", values=fx.CITYSCAPES_LABEL_IDS, border=None)[1]
        train = np.full(ids.shape, 255)
        for label_id, train_id in TRAIN_IDS.items():
            train[ids == label_id] = train_id
        expected += np.bincount(train.ravel(), minlength=256)
    assert list(stats["class_pixels"].values()) == expected[:19].tolist()
    assert stats["ignored_pixels"] == expected[255] and stats["out_of_range"] == {}


def test_script_writes_json_and_overlays(tmp_path):
    root = fx.write_voc(tmp_path / "voc")
    out, vis = tmp_path / "stats.json", tmp_path / "vis"
    run = run_script(
        "inspect_data.py", "dataset=voc", f"dataset.root={root}", "split=val", f"out={out}",
        f"vis={vis}", "num_workers=0", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    stats = json.loads(out.read_text())
    counts = sum(
        np.bincount(fx.sample_arrays(f"voc/{i}")[1].ravel(), minlength=256) for i in fx.VOC_VAL
    )
    assert stats["dataset"] == "voc" and stats["split"] == "val" and stats["num_samples"] == 2
    assert list(stats["class_pixels"].values()) == counts[:21].tolist()
    assert stats["ignored_pixels"] == counts[255]
    assert "no problems found" in run.stdout and "background" in run.stdout
    pictures = sorted(vis.glob("*.png"))
    assert [p.name for p in pictures] == [
        f"000000_{fx.VOC_VAL[0]}.png",
        f"000001_{fx.VOC_VAL[1]}.png",
    ]
    h, w = fx.sample_arrays(f"voc/{fx.VOC_VAL[0]}")[1].shape
    picture = np.asarray(Image.open(pictures[0]))
    assert picture.shape[1] > 3 * w and picture.shape[0] >= h  # image | labels | overlay + legend
    assert not list(tmp_path.glob("outputs"))  # nothing else written


def test_script_names_a_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    run = run_script(
        "inspect_data.py", "dataset=cityscapes", f"dataset.root={missing}", cwd=tmp_path
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"inspect_data.py: error: Cityscapes folder {missing}/leftImg8bit/val does not exist; "
        f"expected {missing}/leftImg8bit/val/CITY/*_leftImg8bit.png and "
        f"{missing}/gtFine/val/CITY/*_gtFine_labelIds.png "
        "(register and download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip at "
        "https://www.cityscapes-dataset.com)"
    ]


def test_script_exits_1_after_reporting_problems(tmp_path):
    root, _ = voc_with_defects(tmp_path / "voc")
    out = tmp_path / "stats.json"
    run = run_script(
        "inspect_data.py", "dataset=voc", f"dataset.root={root}", "split=train", f"out={out}",
        "num_workers=0", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr[-2000:]
    assert "3 problem(s) found" in run.stdout and "statistics written to" in run.stdout
    stats = json.loads(out.read_text())  # written before the exit
    assert len(stats["unreadable"]) == 1 and len(stats["size_mismatches"]) == 1


def test_an_empty_split_is_a_problem(tmp_path):
    out = tmp_path / "stats.json"
    run = run_script(
        "inspect_data.py", "dataset.builder.num_samples={train: 2, val: 0}", f"out={out}",
        "num_workers=0", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr[-2000:]
    assert "the split has no samples" in run.stdout and "1 problem(s) found" in run.stdout
    assert "no problems found" not in run.stdout
    assert json.loads(out.read_text())["num_samples"] == 0


def test_an_empty_or_unknown_voc_split_is_one_sentence(tmp_path):
    root = fx.write_voc(tmp_path / "voc")
    lists = root / "VOCdevkit/VOC2012/ImageSets/Segmentation"
    (lists / "val.txt").write_text("")
    run = run_script("inspect_data.py", "dataset=voc", f"dataset.root={root}", cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"inspect_data.py: error: VOC split file {lists / 'val.txt'} is empty; it must list one "
        "image id per line"
    ]
    run = run_script(
        "inspect_data.py", "dataset=voc", f"dataset.root={root}", "split=tarin", cwd=tmp_path
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"inspect_data.py: error: VOC split file {lists / 'tarin.txt'} does not exist; expected "
        "split= one of seg11valid, train, trainval, val (files of one image id per line)"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["voc"]  # nothing written
