"""Predicting image files: label maps and overlays, for images of any size and number."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from fcnseg.data.io import read_image
from fcnseg.data.transforms import build_transforms
from fcnseg.engine.inference import Inference
from fcnseg.engine.runtime import Runtime
from fcnseg.errors import UserError
from fcnseg.utils.export import check_output_dir, list_images, save_label_png
from fcnseg.utils.logging import progress
from fcnseg.utils.visualize import Palette, overlay


def check_prediction_paths(
    source: str | Path, output_dir: str | Path, *, overwrite: bool = False
) -> list[Path]:
    """The images of ``source``, once ``output_dir`` is known to be a safe place for outputs.

    ``output_dir`` must not be a file, nor be, lie inside or contain ``source``, and must be
    empty or new unless ``overwrite``. Cheap: scripts call it before loading a model.

    Returns:
        ``list_images(source)``.
    """
    files = list_images(source)
    source = Path(source)
    what = "the input folder" if source.is_dir() else "the input image"
    check_output_dir(output_dir, key="output", protected=[source], what=what, overwrite=overwrite)
    return files


def predict_images(
    model: nn.Module,
    source: str | Path,
    output_dir: str | Path,
    *,
    class_names: Sequence[str],
    normalize: str = "imagenet",
    inference: Inference | None = None,
    device: str = "auto",
    colors: Palette | None = None,
    alpha: float = 0.5,
    overwrite: bool = False,
) -> list[Path]:
    """Predicts every image of ``source`` (a file, or a folder searched recursively).

    For ``a/b.jpg`` below ``source`` it writes ``output_dir/a/b.png``, a palette PNG of class
    indices of the image's exact width and height, and ``output_dir/a/b_overlay.jpg``, the
    image blended with the class colours plus a legend of the classes present.

    Args:
        model: the network, in any mode (it is put in eval mode).
        source: an image file or a folder of images.
        output_dir: where the outputs go (created).
        class_names: names for the legend; their number is the number of classes.
        normalize: the normalisation the model was trained with.
        inference: whole image, sliding windows, TTA.
        device: ``auto``, ``cpu`` or ``cuda``.
        colors: class colours (the VOC map by default).
        alpha: weight of the class colours in the overlay.
        overwrite: write into an ``output_dir`` that already holds files (see
            ``check_prediction_paths`` for the folders refused whatever this says).

    Returns:
        The label maps written, in input order.
    """
    inference = inference or Inference()
    files = check_prediction_paths(source, output_dir, overwrite=overwrite)
    root = Path(source) if Path(source).is_dir() else Path(source).parent
    out = Path(output_dir)
    dev = Runtime.setup(device, distributed=False).device
    model.to(dev).eval()
    transform = build_transforms(train=False, normalize=normalize)
    # Check every output name before predicting anything: a.png and a.jpg would collide.
    targets: dict[Path, Path] = {}
    for path in files:
        stem = out / path.relative_to(root).with_suffix("")
        label_path = stem.with_name(stem.name + ".png")
        if label_path in targets:
            raise UserError(
                f"{targets[label_path]} and {path} would both be predicted into {label_path}"
            )
        targets[label_path] = path
    for label_path, path in progress(list(targets.items()), desc="predict", unit="image"):
        image = read_image(path)
        x, _ = transform(image, np.zeros(image.shape[:2], np.uint8))
        with torch.no_grad():
            labels = inference.predict(model, x[None].to(dev))[0].cpu().numpy()
        save_label_png(labels, label_path, colors=colors)
        picture = overlay(image, labels, class_names=class_names, colors=colors, alpha=alpha)
        Image.fromarray(picture).save(
            label_path.with_name(label_path.stem + "_overlay.jpg"), quality=90
        )
    return list(targets)
