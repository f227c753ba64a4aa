"""An exported file run by onnxruntime: ``OnnxModel``, a network wherever fcnseg takes one,
``load_onnx`` (the file and its metadata, checked as a checkpoint is) and ``compare_outputs``
(onnxruntime's outputs against PyTorch's)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fcnseg.deploy.metadata import existing_file, info_from_metadata
from fcnseg.deploy.optional import require
from fcnseg.errors import UserError
from fcnseg.models.info import ModelInfo


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
        self.path = existing_file(path)
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
