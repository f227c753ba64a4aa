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
from fcnseg.models.description import KEY as DESCRIPTION_KEY
from fcnseg.models.description import ModelDescription
from fcnseg.models.layers import (
    FullyConnectedConv2d,
    max_pool2d_window_argmax,
    max_unpool2d_window_argmax,
)
from fcnseg.utils.validate import size_pair

INPUT_NAME, OUTPUT_NAME = "images", "logits"
#: The dynamic axes of the input and output: one file for every batch size and image size.
DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}
#: The example the exporter traces. Its size is not baked in (the axes are dynamic); an odd,
#: non-square size keeps the trace off the special cases of 1 and of equal sides.
EXAMPLE_SIZE = (2, 3, 97, 131)
INSTALL_HINT = "pip install 'fcnseg[onnx]'"
#: What the graph outputs: ``logits`` (N, C, H, W) float32, or ``labels`` (N, H, W), their argmax.
OUTPUTS = ("logits", "labels")
LABELS_NAME = "labels"
#: The opsets a file can be written in: PyTorch's exporter writes its own (20 with PyTorch 2.14)
#: and ONNX's version converter takes fcnseg's networks from there to these (measured: below 15
#: it has no adapter for the dynamic graphs' Shape, below 14 none for Relu; the unpooling
#: heads' dynamic graphs pad by computed amounts, and Pad has none below 18).
OPSETS = range(15, 26)


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
def info_metadata(
    info: ModelInfo,
    config: Mapping[str, Any] | None = None,
    description: ModelDescription | None = None,
) -> dict[str, str]:
    """``info`` (the model's ``description`` and the training ``config``) as ONNX
    ``metadata_props``: strings only."""
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
    if description is not None:
        meta[DESCRIPTION_KEY] = json.dumps(description.to_dict())
    if config is not None:
        meta["config"] = json.dumps(config)
    return meta


def info_from_metadata(
    meta: Mapping[str, str], *, source: str | Path = "the ONNX file"
) -> tuple[ModelInfo, dict[str, Any] | None]:
    """The ``ModelInfo`` and training config that ``info_metadata`` wrote.

    The model description (``model_description``, or the ``config`` of files exported before
    it) is checked as a checkpoint's is (``ModelDescription``): a file naming anything but
    fcnseg's own builders is refused. Its classes and normalisation are those of the info.

    Raises:
        UserError: the metadata lack fcnseg's keys (a file not exported by fcnseg), or describe
            a model that is not fcnseg's.
    """
    missing = [key for key in ("class_names", "normalize") if key not in meta]
    if missing:
        raise UserError(
            f"{source} has no {' or '.join(missing)} in its metadata: it was not exported by "
            "fcnseg (fcnseg-export), so its classes and input normalisation are unknown"
        )
    description = ModelDescription.from_metadata(meta, source=str(source))
    try:
        if description is not None:
            info = ModelInfo.from_description(
                description,
                iteration=int(meta.get("iteration", 0)),
                miou=float(meta["miou"]) if "miou" in meta else None,
            )
        else:
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
    if config is not None and not isinstance(config, dict):
        raise UserError(f"{source}'s metadata 'config' is not a mapping")
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
    input_size: Sequence[int] | None = None,
    outputs: str = "logits",
) -> Path:
    """Exports ``model`` to the ONNX file ``path``, by default with dynamic batch, height and
    width.

    The file is written atomically (a temporary file renamed over ``path``), weights included
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
    portable = _as_portable_unpooling(model) if input_size else contextlib.nullcontext()
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
    """Writes the ``onnx.ModelProto`` ``proto`` to ``path`` atomically (a temporary file
    renamed over it), readable as the umask allows."""
    onnx = require("onnx", "writing an ONNX file")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(proto, tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


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


def deploy_metadata(*, outputs: str = "logits", input_size: Sequence[int] | None = None) -> dict:
    """What a deployment reads besides ``info_metadata``: ``outputs`` (``logits`` or
    ``labels``) and ``input_size`` (JSON ``[height, width]``, or ``null`` for any size)."""
    return {
        "outputs": outputs,
        "input_size": json.dumps(None if input_size is None else list(input_size)),
    }


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
def _as_portable_unpooling(model: nn.Module):
    """Runs the unpooling heads' max pooling with indices and max unpooling as
    ``max_pool2d_window_argmax`` and ``max_unpool2d_window_argmax`` while exporting.

    PyTorch exports ``MaxUnpool2d`` as ScatterND fed by MaxPool's second output, neither of
    which OpenCV's DNN module (4.x) reads; the window-argmax pair is comparisons, products and
    (transposed) convolutions, with the same result. It applies to 2x2 windows at stride 2
    (every fcnseg encoder); a model with other poolings keeps PyTorch's own export.
    """
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d) and m.return_indices]
    unpools = [m for m in model.modules() if isinstance(m, nn.MaxUnpool2d)]

    def is_2x2(m: nn.Module) -> bool:
        geometry = [m.kernel_size, m.stride, m.padding] + (
            [m.dilation, m.ceil_mode] if isinstance(m, nn.MaxPool2d) else []
        )
        return [_pair(v) for v in geometry[:3]] == [(2, 2), (2, 2), (0, 0)] and geometry[3:] in (
            [],
            [1, True],
            [(1, 1), True],
        )

    swap = bool(pools and unpools) and all(is_2x2(m) for m in pools + unpools)
    if swap:
        for pool in pools:
            pool.forward = types.MethodType(lambda self, x: max_pool2d_window_argmax(x), pool)
        for unpool in unpools:
            unpool.forward = types.MethodType(_unpool_forward, unpool)
    try:
        yield model
    finally:
        if swap:
            for m in pools + unpools:
                del m.forward


def _unpool_forward(
    self: nn.MaxUnpool2d,
    x: torch.Tensor,
    indices: torch.Tensor,
    output_size: Sequence[int] | None = None,
) -> torch.Tensor:
    size = output_size if output_size is not None else (2 * x.shape[-2], 2 * x.shape[-1])
    return max_unpool2d_window_argmax(x, indices, size)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def check_static(proto: Any) -> None:
    """Asserts that the graph ``proto`` computes no shape: no ``Shape``-like node is left, and
    ONNX's shape inference finds every dimension but the batch fixed.

    Raises:
        RuntimeError: a dynamic part left (a defect of the export, not of the user's input).
    """
    onnx = require("onnx", "ONNX export")
    dynamic_ops = {"Shape", "Size", "NonZero", "Range", "ConstantOfShape", "ScatterND"}
    left = sorted({n.op_type for n in proto.graph.node} & dynamic_ops)
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    graph = inferred.graph
    unknown = [
        v.name
        for v in list(graph.value_info) + list(graph.output)
        if v.type.HasField("tensor_type")
        and any(not d.HasField("dim_value") for d in v.type.tensor_type.shape.dim[1:])
    ]
    if left or unknown:
        raise RuntimeError(
            f"the fixed-size graph still computes shapes: {', '.join(left + unknown[:5])}"
        )


def convert_opset(proto: Any, opset: int) -> Any:
    """``proto`` in ONNX opset ``opset`` (ONNX's version converter), checked by ONNX's checker.

    Raises:
        UserError: the converter cannot express the graph in that opset.
    """
    onnx = require("onnx", "ONNX export")
    current = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if current == opset:
        return proto
    try:
        converted = onnx.version_converter.convert_version(proto, opset)
        onnx.checker.check_model(converted)
    except Exception as err:  # the converter raises RuntimeError, ValidationError, ...
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise UserError(
            f"opset={opset} cannot express this network ({reason}); use opset 18 or later, or "
            f"a fixed input_size=[HEIGHT,WIDTH], whose graph converts down to {OPSETS[0]}"
        ) from err
    return converted


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
        For a file that outputs labels, ``max_abs_diff`` is ``None`` and its labels are
        compared with the argmax of PyTorch's logits.
    """
    g = torch.Generator().manual_seed(seed)
    model = model.cpu().eval()
    rows = []
    for h, w in sizes:
        x = torch.randn(batch, 3, h, w, generator=g)
        with torch.no_grad():
            want = model(x).float()
        got = session(x)
        labels = got if session.outputs == "labels" else got.argmax(1)
        rows.append(
            {
                "size": (h, w),
                "max_abs_diff": (
                    None if session.outputs == "labels" else float((got - want).abs().max())
                ),
                "scale": float(want.abs().max()),
                "label_agreement": float((labels == want.argmax(1)).float().mean()),
            }
        )
    return rows


# ---------------------------------------------------------------------------- onnxruntime
class OnnxModel(nn.Module):
    """An exported file run by onnxruntime, usable where fcnseg takes a network.

    A module without parameters whose ``forward`` maps images (N, 3, H, W) to logits
    (N, C, H, W) on the input's device, so that ``fcnseg.engine.inference.Inference``, the
    evaluator and ``fcnseg.Predictor`` run it exactly as they run the PyTorch model (sliding
    windows, TTA). The arrays travel through the host; autocast does not apply. A file
    exported with ``outputs=labels`` gives the label maps (N, H, W) int64 instead, and one
    exported with ``input_size`` takes images of that size only.

    Args:
        path: the ``.onnx`` file.
        providers: onnxruntime execution providers, in order of preference (default: CUDA
            where onnxruntime has it, then the CPU).
        threads: onnxruntime's intra-op threads (``None``: its default, one per core).

    Attributes:
        info: the ``ModelInfo`` of the metadata (``None`` for a file without fcnseg's).
        config: the training configuration of the metadata, if any.
        outputs: ``logits`` or ``labels``, as the graph's output says.
        input_size: the (height, width) the graph is fixed to, or ``None`` for any size.
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
        # What the graph itself says (the metadata's "outputs" and "input_size" repeat it).
        output, image = self.session.get_outputs()[0], self.session.get_inputs()[0]
        self.outputs = "labels" if len(output.shape) == 3 else "logits"
        fixed = image.shape[2:] if len(image.shape) == 4 else []
        self.input_size = tuple(fixed) if all(isinstance(d, int) for d in fixed) else None

    def extra_repr(self) -> str:
        return f"{self.path}, providers={self.session.get_providers()}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.input_size is not None and tuple(images.shape[-2:]) != self.input_size:
            h, w = self.input_size
            raise UserError(
                f"{self.path} takes {h}x{w} images only (exported with input_size=[{h}, {w}]), "
                f"not {images.shape[-2]}x{images.shape[-1]}; resize the images, or export "
                "without input_size for any size"
            )
        x = images.detach().float().cpu().contiguous().numpy()
        (out,) = self.session.run(None, {self.input_name: x})
        out = np.asarray(out)
        if self.outputs == "labels":  # uint8 in the file; int64 as torch.argmax gives
            out = out.astype(np.int64)
        return torch.from_numpy(out).to(images.device)


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
    check_output_classes(model)
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


def check_output_classes(model: OnnxModel) -> None:
    """Refuses a file whose graph scores another number of classes than its metadata name.

    The output's channel dimension is read from the graph where it is fixed, else from one
    forward pass on a small image (at the input's own size where that is fixed). A graph that
    outputs labels (N, H, W) has no channel dimension to compare.

    Raises:
        UserError: the numbers differ.
    """
    output, image = model.session.get_outputs()[0], model.session.get_inputs()[0]
    if len(output.shape) != 4:
        return
    channels = output.shape[1]
    if not isinstance(channels, int):
        size = [d if isinstance(d, int) else s for d, s in zip(image.shape, (1, 3, 32, 32))]
        channels = model(torch.zeros(size)).shape[1]
    if channels != model.info.num_classes:
        raise UserError(
            f"{model.path} outputs {channels} classes but its metadata name "
            f"{model.info.num_classes} ({', '.join(model.info.class_names)}); the file is "
            "inconsistent, re-export it from its checkpoint"
        )


def _existing(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file")
    return path
