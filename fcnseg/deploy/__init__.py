"""Deployment: a trained model exported to ONNX with what it expects in the file, and run by
onnxruntime wherever fcnseg runs a network.

``export_checkpoint`` is what ``scripts/export.py`` calls; ``load_for_inference`` is how
``scripts/evaluate.py`` and ``scripts/predict.py`` get their network for ``runtime=torch`` (a
checkpoint) or ``runtime=onnx`` (an exported file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from fcnseg.deploy.onnx import OnnxModel, export_onnx, load_onnx, read_metadata
from fcnseg.errors import UserError
from fcnseg.models.builder import load_trained

FORMATS = ("onnx",)
RUNTIMES = ("torch", "onnx")

__all__ = [
    "FORMATS",
    "RUNTIMES",
    "OnnxModel",
    "export_checkpoint",
    "export_onnx",
    "load_for_inference",
    "load_onnx",
    "read_metadata",
]


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    format: str = "onnx",
    overwrite: bool = False,
    opset: int | None = None,
) -> Path:
    """Exports a training checkpoint's model, with its ``ModelInfo`` and training config.

    Args:
        checkpoint: a checkpoint written by training (``best.pt``, ``last.pt``) or by
            ``scripts/import_weights.py``.
        output: the file to write.
        format: ``onnx``.
        overwrite: replace an existing ``output``.
        opset: the ONNX opset (``None``: the exporter's default).

    Raises:
        UserError: an unknown format, an existing output without ``overwrite``, an unreadable
            checkpoint, or onnx not installed. Each is checked before any work.
    """
    check_export_output(output, checkpoint=checkpoint, format=format, overwrite=overwrite)
    model, ckpt = load_trained(checkpoint)
    return export_onnx(model, output, info=model.info, config=ckpt["config"], opset=opset)


def check_export_output(
    output: str | Path,
    *,
    checkpoint: str | Path | None = None,
    format: str = "onnx",
    overwrite: bool = False,
) -> None:
    """The checks ``export_checkpoint`` makes before reading the checkpoint (cheap): a known
    format, an output that is no folder, not the checkpoint, and new unless ``overwrite``, and
    the exporter's packages installed."""
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
    from fcnseg.deploy.onnx import require

    require("onnx", "ONNX export")
    require("onnxscript", "ONNX export")


def load_for_inference(
    *, runtime: str = "torch", checkpoint: str | Path | None = None, model: str | Path | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The network and its checkpoint (or the exported file's checkpoint-like metadata).

    ``runtime=torch`` rebuilds ``checkpoint`` in PyTorch; ``runtime=onnx`` runs the exported
    ``model`` with onnxruntime. Either way the network's ``info`` is its ``ModelInfo`` and the
    dict holds ``config`` (with its ``dataset``), ``iteration`` and ``best_miou``.

    Raises:
        UserError: an unknown runtime, or the file it needs not given.
    """
    if runtime not in RUNTIMES:
        raise UserError(f"runtime={runtime} is not one of {', '.join(RUNTIMES)}")
    if runtime == "onnx":
        if model is None:
            raise UserError(
                "runtime=onnx needs model=FILE.onnx, a file written by scripts/export.py"
            )
        return load_onnx(model)
    if checkpoint is None:
        raise UserError("checkpoint=PATH is required (or runtime=onnx model=FILE.onnx)")
    return load_trained(checkpoint)
