"""What makes an exported file load in runtimes other than onnxruntime: a fixed size with every
shape folded, max unpooling without scatter, and older opsets.

OpenCV's DNN module (4.x) and other runtimes that need static shapes cannot load a ``Shape``
node, ScatterND or MaxPool's indices output; ``portable_unpooling`` swaps the unpooling heads'
layers for an equivalent without them while exporting, ``check_static`` asserts that nothing
dynamic is left, and ``convert_opset`` writes the graph in an older opset.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fcnseg.deploy.optional import require
from fcnseg.errors import UserError
from fcnseg.models.layers import max_pool2d_window_argmax, max_unpool2d_window_argmax

#: The opsets a file can be written in: PyTorch's exporter writes its own (20 with PyTorch 2.14)
#: and ONNX's version converter takes fcnseg's networks from there to these (measured: below 15
#: it has no adapter for the dynamic graphs' Shape, below 14 none for Relu; the unpooling
#: heads' dynamic graphs pad by computed amounts, and Pad has none below 18).
OPSETS = range(15, 26)


@contextlib.contextmanager
def portable_unpooling(model: nn.Module):
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
