"""ONNX: export with a dynamic batch, height and width, and the exported file run by onnxruntime.

The exported graph maps ``images`` (N, 3, H, W), float32, normalised as in training, to
``logits`` (N, C, H, W): one file serves every image size, as the network does. The file's
metadata (``metadata_props``, string to string) carries what a consumer needs besides the
graph, so that nothing else has to travel with it:

=================  ==============================================================================
key                value
=================  ==============================================================================
``class_names``    JSON list, one name per output channel
``palette``        JSON list of ``[r, g, b]``, one per class
``ignore_index``   the label value of unlabelled pixels in training
``normalize``      ``imagenet``, ``caffe`` or ``none`` (fcnseg's names)
``normalization``  JSON ``{"mean", "std", "max_pixel_value", "channel_order"}``: the input is
                   ``(pixel / max_pixel_value - mean) / std`` per RGB channel, then reordered
                   to ``channel_order``
``iteration``      the training step of the weights
``miou``           the best validation mIoU training recorded (a fraction), when it evaluated
``config``         JSON: the training configuration (dataset, model), as in a checkpoint
=================  ==============================================================================

The exporter is PyTorch's ``torch.export``-based one (``torch.onnx.export(dynamo=True)``). The
TorchScript-based one cannot export the unpooling heads: it traces ``MaxUnpool2d``'s
``output_size`` as a tensor, which ``F.max_unpool2d``'s size check rejects.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import os
import tempfile
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fcnseg.errors import UserError
from fcnseg.models.builder import ModelInfo
from fcnseg.models.layers import FullyConnectedConv2d

INPUT_NAME, OUTPUT_NAME = "images", "logits"
#: The dynamic axes of the input and output: one file for every batch size and image size.
DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}
#: The example the exporter traces. Its size is not baked in (the axes are dynamic); an odd,
#: non-square size keeps the trace off the special cases of 1 and of equal sides.
EXAMPLE_SIZE = (2, 3, 97, 131)
INSTALL_HINT = "pip install 'fcnseg[onnx]'"


def require(module: str, purpose: str) -> types.ModuleType:
    """Imports an optional dependency, or says in one sentence how to install it.

    Raises:
        UserError: ``module`` is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UserError(
            f"{purpose} needs the {module} package, which is not installed: {INSTALL_HINT}"
        ) from err


# ---------------------------------------------------------------------------- metadata
def info_metadata(info: ModelInfo, config: Mapping[str, Any] | None = None) -> dict[str, str]:
    """``info`` (and the training ``config``) as ONNX ``metadata_props``: strings only."""
    n = info.normalization
    meta = {
        "class_names": json.dumps(list(info.class_names)),
        "palette": json.dumps([list(c) for c in info.palette]),
        "ignore_index": str(info.ignore_index),
        "normalize": info.normalize,
        "normalization": json.dumps(
            {
                "mean": list(n.mean),
                "std": list(n.std),
                "max_pixel_value": n.max_pixel_value,
                "channel_order": "BGR" if n.bgr else "RGB",
            }
        ),
        "iteration": str(info.iteration),
    }
    if info.miou is not None:
        meta["miou"] = repr(info.miou)
    if config is not None:
        meta["config"] = json.dumps(config)
    return meta


def info_from_metadata(
    meta: Mapping[str, str], *, source: str | Path = "the ONNX file"
) -> tuple[ModelInfo, dict[str, Any] | None]:
    """The ``ModelInfo`` and training config that ``info_metadata`` wrote.

    Raises:
        UserError: the metadata lack fcnseg's keys (a file not exported by fcnseg).
    """
    missing = [key for key in ("class_names", "normalize") if key not in meta]
    if missing:
        raise UserError(
            f"{source} has no {' or '.join(missing)} in its metadata: it was not exported by "
            "fcnseg (scripts/export.py), so its classes and input normalisation are unknown"
        )
    try:
        info = ModelInfo.create(
            class_names=json.loads(meta["class_names"]),
            palette=json.loads(meta["palette"]) if "palette" in meta else None,
            ignore_index=int(meta.get("ignore_index", 255)),
            normalize=meta["normalize"],
            iteration=int(meta.get("iteration", 0)),
            miou=float(meta["miou"]) if "miou" in meta else None,
        )
        config = json.loads(meta["config"]) if "config" in meta else None
    except (ValueError, TypeError) as err:
        raise UserError(f"{source}'s fcnseg metadata cannot be read ({err})") from err
    return info, config


def read_metadata(path: str | Path) -> tuple[ModelInfo, dict[str, Any] | None]:
    """The ``ModelInfo`` and training config stored in the ONNX file ``path``."""
    onnx = require("onnx", "reading an ONNX file")
    path = _existing(path)
    model = onnx.load(str(path), load_external_data=False)
    return info_from_metadata({p.key: p.value for p in model.metadata_props}, source=path)


# ---------------------------------------------------------------------------- export
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


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    info: ModelInfo | None = None,
    config: Mapping[str, Any] | None = None,
    opset: int | None = None,
    input_channels: int = 3,
) -> Path:
    """Exports ``model`` to the ONNX file ``path`` with dynamic batch, height and width.

    The file is written atomically (a temporary file renamed over ``path``), weights included
    (no external data file; the ONNX protobuf limit of 2 GB holds every fcnseg network).

    Args:
        model: maps (N, ``input_channels``, H, W) to (N, ...) for any H, W; copied, not changed.
        path: the ``.onnx`` file to write (replaced if it exists: callers check first).
        info: written into the metadata (``info_metadata``); ``None`` writes none (e.g. for a
            classifier).
        config: the training configuration, written beside ``info``.
        opset: the ONNX opset (``None``: the exporter's default).
        input_channels: channels of the traced example.

    Returns:
        ``path`` as a ``Path``.
    """
    require("onnx", "ONNX export")
    require("onnxscript", "ONNX export")
    path = Path(path)
    model = copy.deepcopy(model).cpu().eval()
    example = torch.zeros(EXAMPLE_SIZE[0], input_channels, *EXAMPLE_SIZE[2:])
    with _as_plain_convolutions(model), _quiet():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            # Axis names, not Dims: the exporter reads them as Dim.DYNAMIC, which reports a
            # specialisation to the example's size instead of silently making it.
            dynamic_shapes={INPUT_NAME: dict(DYNAMIC_AXES)},
            opset_version=opset,
            verbose=False,
        )
    fixed = [
        DYNAMIC_AXES[axis]
        for axis, dim in enumerate(program.model.graph.inputs[0].shape)
        if axis in DYNAMIC_AXES and isinstance(dim, int)
    ]
    if fixed:  # a guard of the trace fixed an axis: the file would serve one size only
        raise RuntimeError(f"the exported graph has a fixed {', '.join(fixed)}")
    if info is not None:
        program.model.metadata_props.update(info_metadata(info, config))
    program.model.doc_string = (
        f"{INPUT_NAME}: float32 (N, {input_channels}, H, W), normalised as the metadata's "
        f"'normalization' says; {OUTPUT_NAME}: float32 (N, C, H, W) class scores, whose argmax "
        "over C is the label map"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        program.save(tmp, external_data=False)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def _quiet():
    """Silences the exporter's progress lines and the warnings of its graph passes (its own
    errors still raise)."""
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export")]
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def compare_outputs(
    model: nn.Module,
    session: OnnxModel,
    sizes: Sequence[tuple[int, int]],
    *,
    batch: int = 1,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """PyTorch's and onnxruntime's outputs for random inputs of each (height, width).

    Returns:
        Per size: ``size``, ``max_abs_diff``, ``scale`` (the largest absolute PyTorch output)
        and ``label_agreement`` (the fraction of positions whose argmax over dim 1 agrees).
    """
    g = torch.Generator().manual_seed(seed)
    model = model.cpu().eval()
    rows = []
    for h, w in sizes:
        x = torch.randn(batch, 3, h, w, generator=g)
        with torch.no_grad():
            want = model(x).float()
        got = session(x)
        rows.append(
            {
                "size": (h, w),
                "max_abs_diff": float((got - want).abs().max()),
                "scale": float(want.abs().max()),
                "label_agreement": float((got.argmax(1) == want.argmax(1)).float().mean()),
            }
        )
    return rows


# ---------------------------------------------------------------------------- onnxruntime
class OnnxModel(nn.Module):
    """An exported file run by onnxruntime, usable where fcnseg takes a network.

    A module without parameters whose ``forward`` maps images (N, 3, H, W) to logits
    (N, C, H, W) on the input's device, so that ``fcnseg.engine.inference.Inference``, the
    evaluator and ``fcnseg.Predictor`` run it exactly as they run the PyTorch model (sliding
    windows, TTA). The arrays travel through the host; autocast does not apply.

    Args:
        path: the ``.onnx`` file.
        providers: onnxruntime execution providers, in order of preference (default: CUDA
            where onnxruntime has it, then the CPU).
        threads: onnxruntime's intra-op threads (``None``: its default, one per core).

    Attributes:
        info: the ``ModelInfo`` of the metadata (``None`` for a file without fcnseg's).
        config: the training configuration of the metadata, if any.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        super().__init__()
        ort = require("onnxruntime", "running an ONNX file")
        self.path = _existing(path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        available = ort.get_available_providers()
        if providers is None:
            providers = [
                p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available
            ]
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=list(providers))
        except Exception as err:  # onnxruntime raises its own classes for a bad file
            raise UserError(f"{self.path} is not a readable ONNX model ({err})") from err
        meta = self.session.get_modelmeta().custom_metadata_map
        self.info: ModelInfo | None = None
        self.config: dict[str, Any] | None = None
        if "class_names" in meta:
            self.info, self.config = info_from_metadata(meta, source=self.path)
        self.input_name = self.session.get_inputs()[0].name

    def extra_repr(self) -> str:
        return f"{self.path}, providers={self.session.get_providers()}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().float().cpu().contiguous().numpy()
        (out,) = self.session.run(None, {self.input_name: x})
        return torch.from_numpy(np.asarray(out)).to(images.device)


def load_onnx(path: str | Path, **options: Any) -> tuple[OnnxModel, dict[str, Any]]:
    """The exported model and a checkpoint-like dict of its metadata, as ``load_trained``
    returns a checkpoint's: ``config``, ``iteration``, ``best_miou``.

    Raises:
        UserError: a missing or unreadable file, or one without fcnseg's metadata.
    """
    model = OnnxModel(path, **options)
    if model.info is None:
        info_from_metadata({}, source=model.path)  # raises, naming what is missing
    info = model.info
    config = model.config or {}
    if "dataset" not in config:  # a file exported without the training config
        config = {
            **config,
            "dataset": {
                "class_names": list(info.class_names),
                "num_classes": info.num_classes,
                "ignore_index": info.ignore_index,
                "normalize": info.normalize,
                "palette": [list(c) for c in info.palette],
            },
        }
    return model, {"config": config, "iteration": info.iteration, "best_miou": info.miou}


def _existing(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file")
    return path
