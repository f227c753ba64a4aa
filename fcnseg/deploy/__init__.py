"""Deployment: a trained model exported to ONNX with what it expects in the file, and run by
onnxruntime wherever fcnseg runs a network.

``export_checkpoint`` is what ``fcnseg-export`` (``scripts/export.py``) calls: a file for any
image size, or for one size with every shape folded (OpenCV's DNN module loads it), giving
logits or labels, in float32 or INT8. ``open_model`` opens a checkpoint or an exported file,
whichever it is; ``load_for_inference`` is how ``scripts/evaluate.py`` and
``scripts/predict.py`` get their network for ``runtime=torch`` (a checkpoint) or
``runtime=onnx`` (an exported file).

The modules, by what they hold: ``export`` (the graph written), ``portable`` (fixed shapes,
unpooling without scatter, older opsets), ``metadata`` (what the file says about the model),
``session`` (the file run by onnxruntime), ``quantize`` (INT8), ``model_files`` (opening
either kind of model file), ``optional`` (the packages they need).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fcnseg.deploy.export import check_export_options, export_onnx
from fcnseg.deploy.metadata import read_metadata
from fcnseg.deploy.model_files import RUNTIMES, load_for_inference, open_model
from fcnseg.deploy.optional import require
from fcnseg.deploy.session import OnnxModel, compare_outputs, load_onnx
from fcnseg.errors import UserError
from fcnseg.models.loading import load_trained

FORMATS = ("onnx",)

__all__ = [
    "FORMATS",
    "RUNTIMES",
    "Exported",
    "OnnxModel",
    "check_export_output",
    "compare_outputs",
    "export_checkpoint",
    "export_onnx",
    "load_for_inference",
    "load_onnx",
    "open_model",
    "read_metadata",
]


@dataclass
class Exported:
    """What ``export_checkpoint`` wrote, and how the INT8 model compares.

    Attributes:
        path: the file written.
        model: the checkpoint's PyTorch model (what the file was exported from).
        calibration: the names of the calibration images (INT8 only).
        heldout: the names of the held-out images compared (INT8 only).
        agreement: the fraction of the held-out images' pixels where the INT8 labels equal
            the float32 model's (INT8 only).
        splits: the (calibration, held-out) splits read (INT8 only).
    """

    path: Path
    model: nn.Module
    calibration: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)
    agreement: float | None = None
    splits: tuple[str, str] | None = None


#: ``(config, *, split, count, input_size, source, dataset_root, skip) -> (images, names)``:
#: images of a checkpoint's dataset at the export's input size, and their names.
ImageReader = Callable[..., tuple[list[torch.Tensor], list[str]]]


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    format: str = "onnx",
    overwrite: bool = False,
    opset: int | None = None,
    input_size: Sequence[int] | None = None,
    outputs: str = "logits",
    quantize: str | None = None,
    calibration_images: int = 32,
    heldout_images: int = 8,
    dataset_root: str | None = None,
    read_images: ImageReader | None = None,
) -> Exported:
    """Exports a training checkpoint's model, with its ``ModelInfo`` and training config.

    With ``quantize=int8`` the file is the INT8 (QDQ) quantization of the float32 export
    (``fcnseg.deploy.quantize``), calibrated on ``calibration_images`` images of the
    checkpoint's training split and compared with float32 on ``heldout_images`` images of its
    validation split (training images not used for calibration where the validation split is
    not there).

    Args:
        checkpoint: a checkpoint written by training (``best.pt``, ``last.pt``) or by
            ``fcnseg-import-weights``.
        output: the file to write.
        format: ``onnx``.
        overwrite: replace an existing ``output``.
        opset: the ONNX opset (``None``: the exporter's own; see ``OPSETS``).
        input_size: ``(height, width)`` to fix (portable to runtimes that need static shapes),
            or ``None`` for any size.
        outputs: ``logits`` or ``labels`` (the argmax in the graph).
        quantize: ``int8`` or ``None``; INT8 needs ``input_size``.
        calibration_images: training images that calibrate the INT8 activation ranges.
        heldout_images: validation images on which INT8's labels are compared with float32's.
        dataset_root: where the checkpoint's dataset is now, if it moved since training.
        read_images: reads the calibration and held-out images of the checkpoint's dataset
            (``fcnseg.engine.calibration.dataset_images``); needed for ``quantize``.

    Raises:
        UserError: an unknown format or option, an existing output without ``overwrite``, an
            unreadable checkpoint, or onnx not installed. Each is checked before any work.
    """
    graph = {"opset": opset, "input_size": input_size, "outputs": outputs}
    check_export_output(
        output,
        checkpoint=checkpoint,
        format=format,
        overwrite=overwrite,
        quantize=quantize,
        **graph,
    )
    model, ckpt = load_trained(checkpoint)
    options = {"info": model.info, "config": ckpt["config"], **graph}
    if quantize is None:
        return Exported(export_onnx(model, output, **options), model)
    from fcnseg.deploy.quantize import label_agreement, quantize_onnx

    if read_images is None:
        raise UserError("quantize=int8 needs calibration images: pass read_images")
    dataset_images = read_images

    size = check_export_options(input_size=input_size, quantize=quantize)
    source = f"checkpoint {checkpoint}"
    read = {"input_size": size, "source": source, "dataset_root": dataset_root}
    config = ckpt["config"]
    calibration, names = dataset_images(
        config, split="train_split", count=calibration_images, **read
    )
    splits = (config["dataset"].get("train_split", "train"), "")
    try:
        heldout, heldout_names = dataset_images(
            config, split="val_split", count=heldout_images, **read
        )
        splits = (splits[0], config["dataset"].get("val_split", "val"))
    except UserError:  # no validation split: training images not used for calibration
        heldout, heldout_names = dataset_images(
            config, split="train_split", count=heldout_images, skip=names, **read
        )
        splits = (splits[0], splits[0])
    out = Path(output).expanduser()
    with tempfile.TemporaryDirectory(prefix="fcnseg-export-") as folder:
        fp32 = export_onnx(model, Path(folder) / "fp32.onnx", **options)
        path = quantize_onnx(fp32, out, calibration)
        agreement = label_agreement(OnnxModel(fp32), OnnxModel(path), heldout)
    return Exported(path, model, names, heldout_names, agreement, splits)


def check_export_output(
    output: str | Path,
    *,
    checkpoint: str | Path | None = None,
    format: str = "onnx",
    overwrite: bool = False,
    **options: Any,
) -> None:
    """The checks ``export_checkpoint`` makes before reading the checkpoint (cheap): a known
    format, an output that is no folder, not the checkpoint, and new unless ``overwrite``, the
    ``options`` (``opset``, ``input_size``, ``outputs``, ``quantize``) in range
    (``check_export_options``, whose signature they follow), and the exporter's packages
    installed."""
    if format not in FORMATS:
        why = (
            "TorchScript is deprecated in PyTorch 2 and its tracer cannot export the "
            "unpooling heads"
            if format == "torchscript"
            else f"the formats are {', '.join(FORMATS)}"
        )
        raise UserError(f"format={format} is not supported: {why}; use format=onnx")
    out = Path(output).expanduser()
    if out.is_dir():
        raise UserError(f"output={output} is a folder; give the file to write")
    if checkpoint is not None and out.resolve() == Path(checkpoint).expanduser().resolve():
        raise UserError(f"output={output} is the checkpoint itself; choose another file")
    if out.exists() and not overwrite:
        raise UserError(f"output={output} exists; pass overwrite=true to replace it")
    check_export_options(**options)
    require("onnx", "ONNX export")
    require("onnxscript", "ONNX export")
    if options.get("quantize") is not None:
        require("onnxruntime", "INT8 quantization")
