"""Pictures: overlays with legends, figures, and what TensorBoard receives of them (read back)."""

import io

import numpy as np
import pytest
import torch
from conftest import compose_config, train_settings
from omegaconf import OmegaConf
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from fcnseg.data import SyntheticShapes, build_transforms
from fcnseg.engine.loggers import Evaluation
from fcnseg.engine.loggers.tensorboard import write_evaluation
from fcnseg.engine.loss import SegLoss
from fcnseg.engine.record import RunRecord
from fcnseg.engine.trainer import Trainer
from fcnseg.metrics import SegMetrics
from fcnseg.models.builder import build_model_from_config
from fcnseg.utils.normalization import denormalize
from fcnseg.utils.visualize import (
    colorize,
    confusion_figure,
    iou_figure,
    overlay,
    palette,
    sample_rows,
)

COLORS = [(10, 200, 30), (200, 10, 30), (30, 10, 200), (250, 250, 0), (0, 250, 250)]
NAMES = ["background", "plain", "stripes", "checks", "dots"]


def test_overlay_blends_and_lists_the_classes_present():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    labels = np.full((40, 30), 1, np.uint8)
    labels[10:20] = 3
    labels[:2] = 255
    out = overlay(image, labels, class_names=NAMES, colors=COLORS, alpha=0.25)
    left, panel = out[:40, :30], out[:, 30:]
    want = np.round(0.75 * image + 0.25 * np.array(COLORS)[labels % 5]).astype(np.uint8)
    want[:2] = image[:2]  # ignored pixels keep the image
    np.testing.assert_array_equal(left, want)
    swatches = {tuple(c) for c in panel.reshape(-1, 3)}
    assert COLORS[1] in swatches and COLORS[3] in swatches
    assert not {COLORS[0], COLORS[2], COLORS[4]} & swatches
    assert overlay(image, labels, class_names=NAMES, legend=False).shape == image.shape


def test_confusion_figure_normalises_rows():
    conf = np.array([[8, 2, 0], [1, 1, 2], [0, 0, 0]])
    fig = confusion_figure(conf, ["a", "b", "c"])
    shown = np.asarray(fig.axes[0].images[0].get_array())
    np.testing.assert_allclose(shown, [[0.8, 0.2, 0], [0.25, 0.25, 0.5], [0, 0, 0]])


def test_iou_figure_bars():
    metrics = {"class_names": ["a", "b", "c"], "iou": [0.5, None, 0.25], "miou": 0.375}
    ax = iou_figure(metrics).axes[0]
    assert [p.get_width() for p in ax.patches] == [50.0, 0.0, 25.0]
    assert "n/a" in [t.get_text() for t in ax.texts]


def decode(event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


def test_an_evaluation_writes_images_figures_text_and_scalars(tmp_path):
    metrics_obj = SegMetrics(5, class_names=NAMES)
    samples = []
    for i, (h, w) in enumerate([(20, 30), (24, 16)]):
        img = torch.randn(3, h, w)
        tgt = torch.randint(0, 5, (h, w))
        tgt[0] = 255
        pred = (tgt + i) % 5
        metrics_obj.update(pred[None], tgt[None])
        samples.append((img, tgt, pred))
    metrics = metrics_obj.compute()
    with SummaryWriter(tmp_path) as writer:
        write_evaluation(writer, Evaluation(metrics, samples, "imagenet"), 12)
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"val/predictions", "val/confusion_matrix", "val/per_class_iou"} <= set(tags["images"])
    assert {"val/miou", "val/pixel_acc", "val/mean_acc", "val/fwiou", "val/iou/plain"} <= set(
        tags["scalars"]
    )
    assert acc.Scalars("val/miou")[0].value == pytest.approx(metrics["miou"])
    assert acc.Scalars("val/miou")[0].step == 12
    table = acc.Tensors("val/table/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "mIoU" in table and "stripes" in table
    # The grid, rebuilt here: rows of input | ground truth | prediction, padded to the widest.
    grid = decode(acc.Images("val/predictions")[0])
    assert grid.shape == (20 + 24, 3 * 30, 3)
    img, tgt, pred = samples[1]
    vis = palette()
    row = np.concatenate(
        [denormalize(img[None], "imagenet")[0].permute(1, 2, 0).numpy(), vis[tgt], vis[pred]], 1
    )
    np.testing.assert_array_equal(grid[20:, : 3 * 16], row)
    assert (grid[20:, 3 * 16 :] == 0).all()
    figure = decode(acc.Images("val/confusion_matrix")[0])
    assert figure.shape[0] > 200 and figure.std() > 0  # a rendered figure, not a blank


def test_large_samples_are_shrunk():
    img, tgt = torch.randn(3, 300, 1200), torch.zeros(300, 1200, dtype=torch.long)
    rows = sample_rows([(img, tgt, tgt)], "imagenet", max_side=400)
    assert rows.shape == (3, 100, 3 * 400)
    assert torch.equal(colorize(tgt[None, :1, :1])[0, :, 0, 0], rows[:, 0, 400])


def test_training_tensorboard_has_the_figures(tmp_path):
    overrides = [
        "dataset.builder.num_samples={train: 4, val: 2, test: 2}",
        "dataset.builder.min_size=32",
        "dataset.builder.max_size=40",
        "dataset.crop_size=32",
    ]
    cfg = compose_config(overrides)
    config = OmegaConf.to_container(cfg, resolve=True)
    ds = config["dataset"]
    builder = {k: v for k, v in ds["builder"].items() if not k.startswith("_")}
    tf = build_transforms(train=False, normalize=ds["normalize"])
    trainer = Trainer(
        train_settings(
            max_iters=1, eval_interval=1, batch_size=2, num_workers=0, device="cpu", num_vis=2
        ),
        model=build_model_from_config(config),
        train_set=SyntheticShapes(
            split="train", transform=build_transforms(train=True, crop_size=32), **builder
        ),
        val_set=SyntheticShapes(split="val", transform=tf, **builder),
        optimizer=lambda params: torch.optim.SGD(params, lr=1e-3),
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
        run_dir=tmp_path,
        record=RunRecord.from_config(config),
        loss=SegLoss(),
    )
    trainer.fit()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    for tag in ("val/predictions", "val/confusion_matrix", "val/per_class_iou"):
        assert tag in acc.Tags()["images"], tag
        assert acc.Images(tag)[0].step == 1
