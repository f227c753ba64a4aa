"""Predictions: ``Predictor`` turns RGB images of any size into label maps (and class
probabilities) exactly as evaluation does; ``predict_images`` writes them for image files."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from fcnseg.data.io import CorruptFileError, read_image, save_label_png
from fcnseg.data.transforms import build_transforms
from fcnseg.deploy.model_files import open_model
from fcnseg.deploy.session import OnnxModel
from fcnseg.engine.inference import Inference
from fcnseg.engine.runtime import Runtime
from fcnseg.errors import UserError
from fcnseg.models.info import ModelInfo
from fcnseg.utils.image_files import as_shown, exif_orientation, list_images
from fcnseg.utils.logging import progress
from fcnseg.utils.outputs import check_output_dir
from fcnseg.utils.visualize import Palette, overlay

#: What ``Predictor`` takes as an image: an (H, W, 3) uint8 RGB array (or (H, W) grey, or
#: (H, W, 4) whose alpha is dropped), a PIL image, or the path of an image file. Files and PIL
#: images are turned as viewers show them (their EXIF orientation); arrays are taken as given.
ImageInput = np.ndarray | Image.Image | str | Path


class Predictor:
    """Label maps for RGB images of any size, computed as ``scripts/evaluate.py`` computes them.

    The image is normalised as the model was trained (``ModelInfo.normalize``, with the data
    pipeline's own transform), run whole or in sliding windows, at the scales and mirrorings
    of ``inference`` (``evaluate.py``'s ``eval.*`` options), and the label map is the argmax of
    the logits averaged at the image's full resolution.

    >>> predictor = fcnseg.Predictor("RUN/checkpoints/best.pt")  # or "model.onnx"
    >>> labels = predictor("photo.jpg")                 # (H, W) int64, the photo's size
    >>> labels, probs = predictor(image, probabilities=True)  # probs: (C, H, W) float32
    >>> predictor.info.class_names

    Args:
        model: a network with an ``info`` attribute (``fcnseg.load_model``'s, or an
            ``fcnseg.deploy.OnnxModel``), any network with ``info`` given, or the path of a
            checkpoint or of an exported ONNX file (run by onnxruntime), whichever the file is
            (``fcnseg.deploy.open_model``).
        info: what the model expects and produces (default: ``model.info``).
        inference: whole image, sliding windows, scales and flip (default: one whole pass).
        device: ``auto``, ``cpu`` or ``cuda``.
        amp: ``none``, ``bf16`` or ``fp16`` autocast for the forward passes.

    Raises:
        UserError: no ``info`` for the model, or an unreadable model file.
    """

    def __init__(
        self,
        model: nn.Module | str | Path,
        info: ModelInfo | None = None,
        *,
        inference: Inference | None = None,
        device: str = "auto",
        amp: str = "none",
        channels_last: bool = False,
    ) -> None:
        if isinstance(model, str | Path):
            model = open_model(model)[0]
        info = info or getattr(model, "info", None)
        if not isinstance(info, ModelInfo):
            raise UserError(
                f"the {type(model).__name__} has no ModelInfo: load it with fcnseg.load_model, "
                "or pass info=fcnseg.ModelInfo.create(class_names=..., normalize=...)"
            )
        self.info = info
        self.inference = inference or Inference()
        # channels_last: NHWC tensors, what oneDNN's CPU convolutions run fastest on (the
        # fastest CPU path measured in docs/deploy.md); an exported model keeps its own layout.
        is_torch = not isinstance(model, OnnxModel)
        self.runtime = Runtime.setup(
            device, amp=amp, channels_last=channels_last and is_torch, distributed=False
        )
        self.model = (self.runtime.prepare(model) if is_torch else model.to(self.device)).eval()
        self.transform = build_transforms(train=False, normalize=info.normalize)

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def __call__(self, images: ImageInput | Sequence[ImageInput], *, probabilities: bool = False):
        """Predicts one image or a list of them.

        Args:
            images: one ``ImageInput`` or a list (or tuple) of them, of any sizes.
            probabilities: also return the softmax of the averaged logits, (C, H, W) float32.

        Returns:
            For one image its label map, (H, W) int64 at the image's size, or with
            ``probabilities`` the pair (labels, probabilities); for a list, a list of those.
        """
        if isinstance(images, list | tuple):
            return [self._one(image, probabilities) for image in images]
        return self._one(images, probabilities)

    predict = __call__

    def _one(self, image: ImageInput, probabilities: bool):
        rgb = as_rgb(image)
        x, _ = self.transform(rgb, np.zeros(rgb.shape[:2], np.uint8))
        x = self.runtime.inputs(x[None])
        autocast = self.runtime.autocast()
        with torch.no_grad():
            if not probabilities:
                return self.inference.predict(self.model, x, autocast=autocast)[0].cpu().numpy()
            logits = self.inference.logits(self.model, x, autocast=autocast)[0].float()
            # The labels are the logits' argmax, as evaluation's: the softmax could round two
            # close scores to one probability.
            labels = logits.argmax(0).cpu().numpy()
            return labels, logits.softmax(0).cpu().numpy()


def as_rgb(image: ImageInput) -> np.ndarray:
    """``image`` as an (H, W, 3) uint8 RGB array; a file or a PIL image as viewers show it
    (``read_photo``), an array as it is.

    Raises:
        CorruptFileError: a file that is missing or cannot be decoded.
        UserError: an array that is not uint8 (H, W), (H, W, 3) or (H, W, 4), or another type.
    """
    if isinstance(image, str | Path):
        return read_photo(image)
    if isinstance(image, Image.Image):
        return as_shown(np.asarray(image.convert("RGB")), exif_orientation(image))
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8 and image.ndim == 2:
            return np.repeat(image[..., None], 3, axis=2)
        if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] in (3, 4):
            return np.ascontiguousarray(image[..., :3])
        raise UserError(
            f"an image array must be uint8 of shape (H, W, 3) RGB, (H, W, 4) or (H, W), not "
            f"{image.dtype} of shape {image.shape}"
        )
    raise UserError(
        "an image is an RGB uint8 array, a PIL image or a file path, not an object of type "
        f"{type(image).__name__}"
    )


def read_photo(path: str | Path) -> np.ndarray:
    """The image file at ``path`` as (H, W, 3) uint8 RGB, turned as viewers show it: a phone
    stores a portrait photo as a landscape sensor image with an EXIF orientation tag, which
    this applies as ``PIL.ImageOps.exif_transpose`` does.

    The datasets read their files as stored (``fcnseg.data.io.read_image``), because their label
    maps carry no orientation and line up with the stored pixels; a photo to predict has no
    label map to stay aligned with, and its label map should line up with the photo its owner
    sees.

    Raises:
        CorruptFileError: the file is missing, empty, truncated or not an image.
    """
    return as_shown(read_image(path), exif_orientation(path))


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
    class_names: Sequence[str] | None = None,
    normalize: str | None = None,
    inference: Inference | None = None,
    device: str = "auto",
    channels_last: bool = False,
    colors: Palette | None = None,
    alpha: float = 0.5,
    overwrite: bool = False,
    on_unreadable: Callable[[CorruptFileError], None] | None = None,
) -> list[Path]:
    """Predicts every image of ``source`` (a file, or a folder searched recursively).

    For ``a/b.jpg`` below ``source`` it writes ``output_dir/a/b.png``, a palette PNG of class
    indices of the image's exact width and height, and ``output_dir/a/b_overlay.jpg``, the
    image blended with the class colours plus a legend of the classes present. The labels are
    ``Predictor``'s, for the image as viewers show it (``read_photo``). The images are taken in
    ``list_images`` order.

    Args:
        model: the network (put in eval mode); a checkpoint's or an exported file's carries
            its ``info``, which gives the defaults below.
        source: an image file or a folder of images.
        output_dir: where the outputs go (created).
        class_names: names for the legend; their number is the number of classes.
        normalize: the normalisation the model was trained with (default: ``imagenet``).
        inference: whole image, sliding windows, TTA.
        device: ``auto``, ``cpu`` or ``cuda``.
        channels_last: run the network on NHWC tensors (``Predictor``).
        colors: class colours (the VOC map by default).
        alpha: weight of the class colours in the overlay.
        overwrite: write into an ``output_dir`` that already holds files (see
            ``check_prediction_paths`` for the folders refused whatever this says).
        on_unreadable: called with the error (which names the file and why) of each image
            that cannot be read, which is then skipped; ``None``: the first such image stops
            the run with a ``UserError`` that says which outputs were written before it.

    Returns:
        The label maps written, in input order.
    """
    files = check_prediction_paths(source, output_dir, overwrite=overwrite)
    info: Any = getattr(model, "info", None)
    if class_names is None and info is None:
        raise UserError("predict_images needs class_names for a model without info")
    if colors is None and info is not None:
        colors = [list(c) for c in info.palette]
    info = ModelInfo.create(
        class_names=class_names if class_names is not None else info.class_names,
        palette=colors,
        normalize=normalize or (info.normalize if info is not None else "imagenet"),
    )
    predictor = Predictor(
        model, info, inference=inference, device=device, channels_last=channels_last
    )
    root = Path(source) if Path(source).is_dir() else Path(source).parent
    out = Path(output_dir)
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
    written: list[Path] = []
    for label_path, path in progress(list(targets.items()), desc="predict", unit="image"):
        try:
            image = read_photo(path)
        except CorruptFileError as err:
            if on_unreadable is None:
                raise UserError(f"{err}; {_stopped(written, out)}") from None
            on_unreadable(err)
            continue
        labels = predictor(image)
        save_label_png(labels, label_path, colors=colors)
        picture = overlay(image, labels, class_names=info.class_names, colors=colors, alpha=alpha)
        Image.fromarray(picture).save(
            label_path.with_name(label_path.stem + "_overlay.jpg"), quality=90
        )
        written.append(label_path)
    return written


def _stopped(written: Sequence[Path], out: Path) -> str:
    """What a run stopped by an unreadable image leaves: the outputs written before it."""
    done = (
        f"after writing the label maps and overlays of the {len(written)} image(s) before it "
        f"into {out} (the last {written[-1].relative_to(out)})"
        if written
        else f"before writing anything into {out}"
    )
    return f"stopped there, {done}; pass skip_unreadable=true to skip such images"
