"""INT8: an exported fixed-size model statically quantized by onnxruntime, calibrated on images.

``quantize_onnx`` runs ``onnxruntime.quantization.quantize_static`` in the QDQ format: weights
int8 per output channel, activations int8 with the scale and zero point of the range (minimum
to maximum) that each tensor reaches on the calibration images. Which runtime computes what in
int8 is then the runtime's choice (onnxruntime fuses QuantizeLinear/DequantizeLinear pairs
around its integer kernels; a runtime without them computes in float32 what the Q/DQ pairs
round, with the same labels).

The calibration images are a model's training images, read as evaluation reads them
(``fcnseg.engine.calibration.dataset_images``, which the caller passes): the checkpoint's
dataset config goes through ``fcnseg.data.trusted``'s allow-list, never through Hydra, and each
normalised image is resized to the model's fixed input size, as a deployment resizes its
frames. ``label_agreement`` says how often the INT8 labels equal the float32 model's on other
images.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fcnseg.deploy.export import INPUT_NAME, save_onnx
from fcnseg.deploy.optional import require
from fcnseg.deploy.session import OnnxModel
from fcnseg.errors import UserError


def quantize_onnx(
    fp32: str | Path, output: str | Path, calibration: Sequence[torch.Tensor]
) -> Path:
    """Writes the INT8 (QDQ) quantization of the fixed-size ONNX file ``fp32`` to ``output``.

    The metadata of ``fp32`` are kept, with ``quantization`` (JSON: format, types, calibration
    method and number of images) added.

    Args:
        fp32: an exported file with a fixed input size (``export_onnx(input_size=...)``).
        output: the file to write (atomically; replaced if it exists: callers check first).
        calibration: normalised images (3, H, W) at the file's input size.

    Raises:
        UserError: no calibration image, or onnxruntime's quantization not installed.
    """
    quantization = require("onnxruntime.quantization", "INT8 quantization")
    onnx = require("onnx", "INT8 quantization")
    if not calibration:
        raise UserError("calibration_images must be at least 1 for quantize=int8")
    fp32, output = Path(fp32), Path(output)
    reader = _Images(quantization.CalibrationDataReader, calibration)
    with tempfile.TemporaryDirectory(prefix="fcnseg-int8-") as folder, _quiet_quantizer():
        quantized = Path(folder) / "int8.onnx"
        quantization.quantize_static(
            str(fp32),
            str(quantized),
            reader,
            quant_format=quantization.QuantFormat.QDQ,
            per_channel=True,
            activation_type=quantization.QuantType.QInt8,
            weight_type=quantization.QuantType.QInt8,
            calibrate_method=quantization.CalibrationMethod.MinMax,
            nodes_to_exclude=unpooling_nodes(onnx.load(str(fp32), load_external_data=False)),
        )
        proto = onnx.load(str(quantized))
    meta = {p.key: p.value for p in onnx.load(str(fp32), load_external_data=False).metadata_props}
    meta["quantization"] = json.dumps(
        {
            "format": "QDQ",
            "weights": "int8 per channel",
            "activations": "int8",
            "calibration": "minmax",
            "calibration_images": len(calibration),
        }
    )
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    return save_onnx(proto, output)


def unpooling_nodes(proto: Any) -> list[str]:
    """The nodes of a fixed-size unpooling network's max poolings and unpoolings, kept in
    float32.

    They find where each maximum lies by comparing a map with its pooled maximum
    (``fcnseg.models.layers.max_pool2d_window_argmax``): quantized apart, the two would no
    longer be equal, and the decoder would put values in the wrong places. The exporter names
    each node's module classes in its metadata.
    """
    scopes = [
        (node.name, {p.key: p.value for p in node.metadata_props}.get(_SCOPE_KEY, ""))
        for node in proto.graph.node
    ]
    if not any("MaxUnpool2d" in scope for _, scope in scopes):
        return []
    return [name for name, scope in scopes if "MaxUnpool2d" in scope or "MaxPool2d" in scope]


_SCOPE_KEY = "pkg.torch.onnx.class_hierarchy"


def _Images(base: type, images: Sequence[torch.Tensor]):  # noqa: N802 - a class factory
    """onnxruntime's ``CalibrationDataReader`` over ``images``, one batch of one at a time."""

    class Images(base):
        def __init__(self) -> None:
            self.images = iter(images)

        def get_next(self) -> dict[str, np.ndarray] | None:
            image = next(self.images, None)
            if image is None:
                return None
            return {INPUT_NAME: image[None].float().contiguous().numpy()}

    return Images()


@contextlib.contextmanager
def _quiet_quantizer():
    """Silences the quantizer's advice to pre-process the model (shape inference and graph
    optimisation: the exported graph has had both) and its progress lines."""
    import logging
    import warnings

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def label_agreement(
    reference: OnnxModel, other: OnnxModel, images: Sequence[torch.Tensor]
) -> float:
    """The fraction of pixels of ``images`` where ``other``'s labels equal ``reference``'s."""
    equal = total = 0
    for image in images:
        a, b = (_labels(model(image[None])) for model in (reference, other))
        equal += int((a == b).sum())
        total += a.numel()
    return equal / total


def _labels(out: torch.Tensor) -> torch.Tensor:
    return out if out.dim() == 3 else out.argmax(1)
