"""ONNX export: a network written to a file with dynamic batch, height and width, or with a
fixed size (``fcnseg.deploy.portable``), its ``ModelInfo`` in the metadata
(``fcnseg.deploy.metadata``).

The exported graph maps ``images`` (N, 3, H, W), float32, normalised as in training, to
``logits`` (N, C, H, W): one file serves every image size, as the network does; with
``outputs=labels`` to their argmax, ``labels`` (N, H, W).

The exporter is PyTorch's ``torch.export``-based one (``torch.onnx.export(dynamo=True)``). The
TorchScript-based one cannot export the unpooling heads: it traces ``MaxUnpool2d``'s
``output_size`` as a tensor, which ``F.max_unpool2d``'s size check rejects.
"""

from __future__ import annotations

import contextlib
import copy
import os
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fcnseg.deploy.metadata import deploy_metadata, info_metadata
from fcnseg.deploy.optional import require
from fcnseg.deploy.portable import OPSETS, check_static, convert_opset, portable_unpooling
from fcnseg.errors import UserError
from fcnseg.models.info import ModelInfo
from fcnseg.models.layers import FullyConnectedConv2d
from fcnseg.utils.atomic import atomic_path
from fcnseg.utils.validate import size_pair

INPUT_NAME, OUTPUT_NAME = "images", "logits"
#: The dynamic axes of the input and output: one file for every batch size and image size.
DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}
#: The example the exporter traces. Its size is not baked in (the axes are dynamic); an odd,
#: non-square size keeps the trace off the special cases of 1 and of equal sides.
EXAMPLE_SIZE = (2, 3, 97, 131)
#: What the graph outputs: ``logits`` (N, C, H, W) float32, or ``labels`` (N, H, W), their argmax.
OUTPUTS = ("logits", "labels")
LABELS_NAME = "labels"


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    info: ModelInfo | None = None,
    config: Mapping[str, Any] | None = None,
    opset: int | None = None,
    input_channels: int = 3,
    input_size: Sequence[int] | None = None,
    outputs: str = "logits",
) -> Path:
    """Exports ``model`` to the ONNX file ``path``, by default with dynamic batch, height and
    width.

    The file is written atomically (``save_onnx``), weights included
    (no external data file; the ONNX protobuf limit of 2 GB holds every fcnseg network).

    With ``input_size`` the height and width are fixed and every shape computation is folded
    into constants: the graph holds no ``Shape`` node, which OpenCV's DNN module (4.x) and
    other runtimes that need static shapes cannot load, and max unpooling is exported without
    scatter and without MaxPool's indices output (``max_pool2d_window_argmax``), which they
    cannot load either. The batch stays free.

    Args:
        model: maps (N, ``input_channels``, H, W) to (N, ...) for any H, W; copied, not changed.
        path: the ``.onnx`` file to write (replaced if it exists: callers check first).
        info: written into the metadata (``info_metadata``); ``None`` writes none (e.g. for a
            classifier).
        config: the training configuration, written beside ``info``.
        opset: the ONNX opset, one of ``OPSETS`` (``None``: the exporter's own).
        input_channels: channels of the traced example.
        input_size: ``(height, width)`` to fix, or ``None`` for any size.
        outputs: ``logits`` (N, C, H, W) float32, or ``labels``: their argmax over C in the
            graph, (N, H, W) uint8 for up to 256 classes, else int64. The metadata's
            ``outputs`` says which.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        UserError: an option out of range (``check_export_options``).
    """
    require("onnx", "ONNX export")
    require("onnxscript", "ONNX export")
    input_size = check_export_options(opset=opset, input_size=input_size, outputs=outputs)
    path = Path(path)
    model = copy.deepcopy(model).cpu().eval()
    example = torch.zeros(EXAMPLE_SIZE[0], input_channels, *(input_size or EXAMPLE_SIZE[2:]))
    axes = {0: DYNAMIC_AXES[0]} if input_size else dict(DYNAMIC_AXES)
    net = model
    if outputs == "labels":
        net = LabelsOutput(model, _num_classes(model, info, example))
    output_name = OUTPUT_NAME if outputs == "logits" else LABELS_NAME
    portable = portable_unpooling(model) if input_size else contextlib.nullcontext()
    with _as_plain_convolutions(model), portable, _quiet():
        program = torch.onnx.export(
            net,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[output_name],
            # Axis names, not Dims: the exporter reads them as Dim.DYNAMIC, which reports a
            # specialisation to the example's size instead of silently making it.
            dynamic_shapes={INPUT_NAME: axes},
            verbose=False,
        )
    fixed = [
        axes[axis]
        for axis, dim in enumerate(program.model.graph.inputs[0].shape)
        if axis in axes and isinstance(dim, int)
    ]
    if fixed:  # a guard of the trace fixed an axis: the file would serve one size only
        raise RuntimeError(f"the exported graph has a fixed {', '.join(fixed)}")
    if info is not None:
        description = getattr(model, "description", None)
        program.model.metadata_props.update(info_metadata(info, config, description))
    program.model.metadata_props.update(deploy_metadata(outputs=outputs, input_size=input_size))
    h, w = input_size or ("H", "W")
    program.model.doc_string = (
        f"{INPUT_NAME}: float32 (N, {input_channels}, {h}, {w}), normalised as the metadata's "
        "'normalization' says; "
        + (
            f"{OUTPUT_NAME}: float32 (N, C, {h}, {w}) class scores, whose argmax over C is the "
            "label map"
            if outputs == "logits"
            else f"{LABELS_NAME}: (N, {h}, {w}) class indices, the argmax of the class scores"
        )
    )
    proto = program.model_proto
    if input_size is not None:
        check_static(proto)
    if opset is not None:
        proto = convert_opset(proto, opset)
    return save_onnx(proto, path)


def save_onnx(proto: Any, path: str | Path) -> Path:
    """Writes the ``onnx.ModelProto`` ``proto`` to ``path`` atomically (``atomic_path``): a
    reader, or a process killed at any moment, finds the previous file or the new one.

    Raises:
        AtomicWriteError: the file could not be written (a read-only folder, a full disk).
    """
    onnx = require("onnx", "writing an ONNX file")
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return Path(path)


def check_export_options(
    *,
    opset: int | None = None,
    input_size: Sequence[int] | None = None,
    outputs: str = "logits",
    quantize: str | None = None,
) -> tuple[int, int] | None:
    """Checks the export options before any work; returns ``input_size`` as (height, width).

    Raises:
        UserError: an unknown ``outputs`` or ``quantize``, an opset outside ``OPSETS``, a
            malformed ``input_size``, or INT8 without a fixed size.
    """
    if outputs not in OUTPUTS:
        raise UserError(f"outputs={outputs} is not one of {', '.join(OUTPUTS)}")
    if opset is not None and (isinstance(opset, bool) or opset not in OPSETS):
        raise UserError(
            f"opset={opset} is not supported: fcnseg writes opsets {OPSETS[0]} to "
            f"{OPSETS[-1]} (ONNX's version converter takes its networks no lower)"
        )
    if quantize is not None and quantize != "int8":
        raise UserError(f"quantize={quantize} is not supported; use quantize=int8 or null")
    size = None if input_size is None else size_pair(input_size, name="input_size")
    if quantize is not None and size is None:
        raise UserError(
            f"quantize={quantize} needs a fixed input_size=[HEIGHT,WIDTH]: the calibration "
            "runs, and the quantized model computes, at one size"
        )
    return size


class LabelsOutput(nn.Module):
    """``model``'s label map: the argmax over classes of its logits, (N, H, W), uint8 for up
    to 256 classes (a quarter of int64's bytes, and what an image library takes), else int64.
    Of equal scores the first class wins, as ``torch.argmax`` and ONNX's ArgMax decide."""

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.model = model
        self.dtype = torch.uint8 if num_classes <= 256 else torch.int64

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).argmax(1).to(self.dtype)


def _num_classes(model: nn.Module, info: ModelInfo | None, example: torch.Tensor) -> int:
    if info is not None:
        return info.num_classes
    with torch.no_grad(), _as_plain_convolutions(model):
        return int(model(example[:1]).shape[1])


@contextlib.contextmanager
def _as_plain_convolutions(model: nn.Module):
    """Runs ``FullyConnectedConv2d`` layers as the ``nn.Conv2d`` they are while exporting.

    Their unfold-and-multiply path is a speed trick of eager PyTorch on the CPU; exported, it
    would be dozens of shape-dependent nodes instead of one ``Conv``, which every ONNX runtime
    computes well, and it doubles the export's time.
    """
    layers = [m for m in model.modules() if isinstance(m, FullyConnectedConv2d)]
    for layer in layers:
        layer.forward = types.MethodType(nn.Conv2d.forward, layer)
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward


@contextlib.contextmanager
def _quiet():
    """Silences the exporter's progress lines and the warnings of its graph passes (such as
    onnx_ir's "Attribute type is ambiguous" for an empty list); its own errors still raise."""
    import logging
    import warnings

    loggers = [
        logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir", "torch.export")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(open(os.devnull, "w")) as sink,  # noqa: SIM115
        ):
            warnings.simplefilter("ignore")
            try:
                yield
            finally:
                sink.close()
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
