"""scripts/evaluate.py and the evaluator: exact confusion matrices on 1, 2 and 3 processes,
predictions on disk, TensorBoard, and the metrics.json schema."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, SCRIPTS, compose_config, run_script
from fixtures import voc_palette
from omegaconf import OmegaConf
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fcnseg.data import SyntheticShapes, build_transforms, eval_loader
from fcnseg.engine.evaluator import evaluate
from fcnseg.metrics import SegMetrics
from fcnseg.models.builder import build_model_from_config
from fcnseg.utils.checkpoint import save_checkpoint

NUM_VAL = 5  # not a multiple of 2 or 3: shards of unequal size
SMALL_DATA = [
    "trainer.device=cpu",
    f"dataset.builder.num_samples={{train: 4, val: {NUM_VAL}, test: 2}}",
    "dataset.builder.min_size=32",
    "dataset.builder.max_size=44",
]
CPU = ["trainer.device=cpu", "trainer.num_workers=0"]


def make_checkpoint(path, *overrides, data=tuple(SMALL_DATA)):
    """A checkpoint as the trainer writes it (model, config, iteration), of a vgg_tiny FCN-8s
    whose zero-initialised score layers are randomised so that it predicts every class."""
    config = OmegaConf.to_container(compose_config([*data, *overrides]), resolve=True)
    model = build_model_from_config(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, 0.5)
    save_checkpoint({"model": model.state_dict(), "config": config, "iteration": 7}, path)
    return model.eval(), config


def val_set(config, split="val"):
    ds = config["dataset"]
    builder = {k: v for k, v in ds["builder"].items() if not k.startswith("_")}
    transform = build_transforms(
        train=False, normalize=ds["normalize"], ignore_index=ds["ignore_index"]
    )
    return SyntheticShapes(split=split, transform=transform, **builder)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The checkpoint, and the confusion matrix and predictions computed image by image here."""
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    model, config = make_checkpoint(path)
    confusion, preds = np.zeros((5, 5), np.int64), []
    with torch.no_grad():
        dataset = val_set(config)
        for image, mask in (dataset[i] for i in range(len(dataset))):
            pred = model(image[None]).argmax(1)[0]
            valid = mask != 255
            confusion += np.bincount((mask[valid] * 5 + pred[valid]).numpy(), minlength=25).reshape(
                5, 5
            )
            preds.append(pred.numpy())
    # The model is not trivial: it predicts several classes, right and wrong.
    assert (confusion.sum(0) > 0).sum() >= 3 and np.trace(confusion) < confusion.sum()
    return path, config, confusion, preds


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    """One evaluate.py run writing JSON, predictions and TensorBoard."""
    path = trained[0]
    out = tmp_path_factory.mktemp("eval")
    proc = run_script(
        "evaluate.py",
        f"checkpoint={path}",
        f"out={out / 'metrics.json'}",
        *CPU,
        f"eval.save_predictions={out / 'pred'}",
        f"eval.tensorboard={out / 'tb'}",
        "eval.num_vis=2",
        f"eval.grid={out / 'grid.png'}",
        cwd=out,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_metrics_are_exact_and_match_the_trainers_schema(trained, evaluated):
    _, config, confusion, _ = trained
    out, proc = evaluated
    m = json.loads((out / "metrics.json").read_text())
    np.testing.assert_array_equal(np.array(m["confusion_matrix"]), confusion)
    assert m["num_images"] == NUM_VAL
    assert m["num_pixels"] == confusion.sum()
    assert m["class_names"] == config["dataset"]["class_names"]
    assert set(m) == set(SegMetrics(5).compute())  # what the trainer writes to metrics.json
    iou = np.diag(confusion) / (confusion.sum(0) + confusion.sum(1) - np.diag(confusion))
    assert m["miou"] == pytest.approx(np.nanmean(iou))
    # The table and the four summary metrics on stdout; nothing left in the working folder.
    for label in ("mIoU", "pixel acc", "mean acc", "fwIoU", *config["dataset"]["class_names"]):
        assert label in proc.stdout
    assert f"{100 * m['miou']:6.2f}" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "metrics.json", "pred", "tb"]


def test_channels_last_gives_the_same_confusion_matrix(trained, tmp_path):
    """NHWC is a memory layout, not another network: the confusion matrix computed here."""
    path, _, confusion, _ = trained
    proc = run_script(
        "evaluate.py", f"checkpoint={path}", f"out={tmp_path / 'm.json'}", *CPU,
        "trainer.channels_last=true",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((tmp_path / "m.json").read_text())
    np.testing.assert_array_equal(np.array(m["confusion_matrix"]), confusion)


def test_predictions_are_label_pngs_of_each_image(trained, evaluated):
    preds = trained[3]
    files = sorted((evaluated[0] / "pred").iterdir())
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(NUM_VAL)]
    for file, pred in zip(files, preds):
        with Image.open(file) as image:
            assert image.mode == "P" and image.size == (pred.shape[1], pred.shape[0])
            np.testing.assert_array_equal(np.asarray(image), pred)


def test_grid_shows_image_truth_and_prediction(trained, evaluated):
    config, preds = trained[1], trained[3]
    with Image.open(evaluated[0] / "grid.png") as file:
        grid = np.asarray(file.convert("RGB")).astype(int)
    builder = {k: v for k, v in config["dataset"]["builder"].items() if not k.startswith("_")}
    raw = SyntheticShapes(split="val", **builder)
    colours = np.array(voc_palette()).reshape(256, 3)  # the devkit's rule, written independently
    top = 0
    for i in range(2):  # eval.num_vis=2: the first two images, one row each
        image, mask = raw.load(i)
        h, w = mask.shape
        row = grid[top : top + h]
        assert np.abs(row[:, :w] - image).max() <= 1  # denormalised back to the file's pixels
        for panel, labels in ((1, mask), (2, preds[i])):
            np.testing.assert_array_equal(row[:, panel * w : (panel + 1) * w], colours[labels])
        top += h
    assert grid.shape[0] == top


def test_tensorboard_has_the_evaluation(evaluated):
    acc = EventAccumulator(str(evaluated[0] / "tb"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("val/predictions", "val/confusion_matrix", "val/per_class_iou"):
        assert tag in tags["images"], tag
        assert acc.Images(tag)[0].step == 7  # the checkpoint's iteration
    assert "val/miou" in tags["scalars"] and "val/table/text_summary" in tags["tensors"]


def test_sharded_evaluation_sums_to_the_whole(trained):
    """Each rank's InferenceSampler shard evaluated alone (as the processes would) and the
    confusion matrices added: the whole split once, whatever the number of shards."""
    _, config, confusion, _ = trained
    model = build_model_from_config(config)
    model.load_state_dict(torch.load(trained[0], weights_only=True)["model"])
    dataset = val_set(config)
    total, images = np.zeros((5, 5), np.int64), 0
    for rank in range(3):
        loader = eval_loader(dataset, batch_size=1, num_workers=0, rank=rank, world_size=3)
        metrics, _ = evaluate(model, loader, SegMetrics(5), device=torch.device("cpu"))
        total += np.array(metrics["confusion_matrix"])
        images += metrics["num_images"]
    np.testing.assert_array_equal(total, confusion)
    assert images == NUM_VAL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_gives_the_single_process_confusion_matrix(trained, evaluated, nproc, tmp_path):
    out = tmp_path / "metrics.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={_free_port()}",
        str(SCRIPTS / "evaluate.py"),
        f"checkpoint={trained[0]}",
        f"out={out}",
        *CPU,
        f"eval.save_predictions={tmp_path / 'pred'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads((evaluated[0] / "metrics.json").read_text())
    multi = json.loads(out.read_text())
    np.testing.assert_array_equal(np.array(multi["confusion_matrix"]), trained[2])
    assert multi == single  # every number, num_images included
    assert proc.stdout.count("mIoU") == 1  # rank 0 reports
    # Every process wrote its own shard's predictions: all images, each once.
    for i in range(NUM_VAL):
        assert (tmp_path / "pred" / f"{i:06d}.png").read_bytes() == (
            evaluated[0] / "pred" / f"{i:06d}.png"
        ).read_bytes()


@pytest.mark.slow
def test_other_split_and_dataset_overrides(trained, tmp_path):
    """split= picks another split; dataset.* values override the checkpoint's dataset."""
    proc = run_script(
        "evaluate.py",
        f"checkpoint={trained[0]}",
        "split=test",
        f"out={tmp_path / 'm.json'}",
        *CPU,
        "eval.mode=slide",
        "eval.crop_size=64",
        "dataset.root=/nowhere",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["num_images"] == 2  # the test split's size in the checkpoint's config
    assert "synthetic test" in proc.stdout


def test_missing_checkpoint_argument_is_one_sentence(tmp_path):
    proc = run_script("evaluate.py", *CPU, cwd=tmp_path)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "evaluate.py: error: checkpoint=PATH is required: the checkpoint file to evaluate"
    )
    assert not list(tmp_path.iterdir())


def _metrics(names, ious, miou):
    return {
        "class_names": names,
        "iou": ious,
        "miou": miou,
        "pixel_acc": 0.9,
        "mean_acc": 0.8,
        "fwiou": 0.7,
        "num_images": 3,
    }


def test_compare_prints_runs_side_by_side(tmp_path, capsys):
    import importlib.util

    (tmp_path / "run_a").mkdir()
    (tmp_path / "run_a" / "metrics.json").write_text(
        json.dumps(_metrics(["road", "car"], [0.5, None], 0.5))
    )
    (tmp_path / "b.json").write_text(
        json.dumps(_metrics(["road", "car", "bus"], [0.75, 0.25, 0.125], 0.375))
    )
    spec = importlib.util.spec_from_file_location("compare_script", SCRIPTS / "compare.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main([str(tmp_path / "run_a"), str(tmp_path / "b.json")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["class", "run_a", "b", "delta"]
    assert lines[2].split() == ["road", "50.00", "75.00", "+25.00"]
    assert lines[3].split() == ["car", "-", "25.00", "-"]
    assert lines[4].split() == ["bus", "-", "12.50", "-"]
    assert lines[6].split() == ["mIoU", "50.00", "37.50", "-12.50"]
    script.main(
        [
            str(tmp_path / "run_a"),
            str(tmp_path / "b.json"),
            str(tmp_path / "run_a" / "metrics.json"),
        ]
    )
    assert "best" in capsys.readouterr().out.splitlines()[0]
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(tmp_path / "nothing")])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err.strip()
        == f"compare.py: error: {tmp_path / 'nothing'} does not exist"
    )


def test_dataset_overrides_reach_the_resolved_builder():
    from fcnseg.engine.evaluator import evaluation_dataset
    from fcnseg.errors import UserError

    trained = {
        "name": "city", "root": "/old", "num_classes": 19, "val_split": "val",
        "builder": {"_target_": "x.Dataset", "root": "/old", "num_classes": 19, "cache": "/old"},
    }  # fmt: skip
    ds = evaluation_dataset(trained, {"root": "/new"}, chosen=False)
    assert ds["root"] == ds["builder"]["root"] == "/new"
    assert ds["builder"]["cache"] == "/old"  # only the overridden key follows
    assert trained["root"] == "/old"  # the checkpoint's config is not modified
    assert evaluation_dataset(trained, {"root": None}, chosen=False) == trained
    with pytest.raises(
        UserError, match="dataset=voc has 21 classes but the checkpoint was trained on 19"
    ):
        evaluation_dataset(trained, {"name": "voc", "num_classes": 21}, chosen=True)


# The official table (cityscapesscripts/helpers/labels.py): label ID of each train ID 0-18.
OFFICIAL_LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
FRAMES = ["frankfurt_000000_000294", "frankfurt_000001_007973", "lindau_000000_000019"]


def write_cityscapes(root, split="val"):
    """A tiny Cityscapes in the official layout: label-ID maps with scored and unscored IDs."""
    rng = np.random.default_rng(1)
    for k, frame in enumerate(FRAMES):
        city = frame.split("_")[0]
        h, w = 24 + 4 * k, 40 - 2 * k
        for folder, name, pixels in (
            ("leftImg8bit", "leftImg8bit", rng.integers(0, 256, (h, w, 3), dtype=np.uint8)),
            (
                "gtFine",
                "gtFine_labelIds",
                rng.choice([0, 4, *OFFICIAL_LABEL_IDS], (h, w)).astype(np.uint8),
            ),
        ):
            path = root / folder / split / city / f"{frame}_{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)


def test_cityscapes_export_round_trips_through_the_train_ids(tmp_path):
    from fcnseg.data.cityscapes import Cityscapes
    from fcnseg.data.predictions import PredictionWriter

    write_cityscapes(tmp_path / "cs")
    dataset = Cityscapes(root=tmp_path / "cs", split="val")
    writer = PredictionWriter(tmp_path / "results", dataset=dataset, format="cityscapes")
    train_ids = torch.from_numpy(np.random.default_rng(0).choice([*range(19), 255], (24, 40)))
    writer(0, train_ids)
    path = tmp_path / "results" / "frankfurt_000000_000294_leftImg8bit.png"
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [path.name]
    with Image.open(path) as image:
        assert image.mode == "L" and image.size == (40, 24)
        label_ids = np.asarray(image)
    lut = np.zeros(256, np.uint8)  # unscored (255) -> 0, "unlabeled"
    lut[:19] = OFFICIAL_LABEL_IDS
    np.testing.assert_array_equal(label_ids, lut[train_ids.numpy()])
    # Read back as the dataset reads ground truth: the train IDs again, 255 where unscored.
    np.testing.assert_array_equal(dataset.read_label_file(path), train_ids.numpy())


@pytest.mark.slow
def test_evaluate_cityscapes_format_agrees_with_the_metrics(tmp_path):
    """The exported label IDs, scored against the ground truth as the official evaluation does
    (label IDs -> train IDs, unscored ignored), give evaluate.py's own confusion matrix."""
    from fcnseg.data.cityscapes import label_ids_to_train_ids

    write_cityscapes(tmp_path / "cs")
    # Trained where the data was; evaluated where it is now (the builder's root follows).
    make_checkpoint(
        tmp_path / "model.pt", "dataset=cityscapes", "dataset.root=/moved/away", data=()
    )
    proc = run_script(
        "evaluate.py", f"checkpoint={tmp_path / 'model.pt'}", *CPU, f"out={tmp_path / 'm.json'}",
        f"eval.save_predictions={tmp_path / 'results'}", "eval.format=cityscapes",
        f"dataset.root={tmp_path / 'cs'}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    confusion = np.zeros((19, 19), np.int64)
    for frame in FRAMES:
        gt = np.asarray(Image.open(next((tmp_path / "cs" / "gtFine").rglob(f"{frame}_*.png"))))
        pred = np.asarray(Image.open(tmp_path / "results" / f"{frame}_leftImg8bit.png"))
        t, p = (
            label_ids_to_train_ids(gt).astype(np.int64),
            label_ids_to_train_ids(pred).astype(np.int64),
        )
        assert (p[t != 255] != 255).all()  # every scored pixel got a scored class
        valid = t != 255
        confusion += np.bincount(t[valid] * 19 + p[valid], minlength=361).reshape(19, 19)
    m = json.loads((tmp_path / "m.json").read_text())
    np.testing.assert_array_equal(np.array(m["confusion_matrix"]), confusion)
    assert m["num_images"] == 3 and (confusion.sum(0) > 0).sum() >= 3


def test_pictures_show_images_spread_over_the_split():
    from fcnseg.engine.evaluator import spread

    assert spread(101, 4) == [0, 25, 50, 75] and spread(3, 4) == [0, 1, 2] and spread(5, 0) == []
    dataset = SyntheticShapes(split="val", num_samples=7, min_size=32, max_size=40,
                              transform=build_transforms(train=False))  # fmt: skip
    model = torch.nn.Conv2d(3, 5, 1)
    _, kept = evaluate(
        model, eval_loader(dataset, num_workers=0), SegMetrics(5), device=torch.device("cpu"),
        keep=spread(len(dataset), 3),
    )  # fmt: skip
    assert len(kept) == 3
    for (image, target, _), index in zip(kept, [0, 2, 4]):  # 7 images, 3 pictures
        torch.testing.assert_close(image, dataset[index][0], rtol=0, atol=0)
        torch.testing.assert_close(target, dataset[index][1], rtol=0, atol=0)
