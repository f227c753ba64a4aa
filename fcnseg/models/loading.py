"""``load_trained`` and ``load_model``: a trained network from a checkpoint file, the one reader
of checkpoints.

The network is rebuilt from the file's ``ModelDescription`` (registered names and plain values,
``fcnseg.models.description``), never from a name it imports or calls; its weights follow, read
with ``weights_only=True`` (``fcnseg.utils.checkpoint``). An exported ONNX file is opened by
``fcnseg.deploy.model_files.open_model``, which opens either kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fcnseg.errors import UserError
from fcnseg.models.builder import build_from_description
from fcnseg.models.description import ModelDescription
from fcnseg.models.info import ModelInfo
from fcnseg.models.segmentation import SegmentationModel
from fcnseg.utils.checkpoint import error_summary, load_checkpoint


def load_model(checkpoint_path: str | Path, map_location: str = "cpu") -> SegmentationModel:
    """Rebuilds a trained model from a checkpoint file alone, in eval mode.

    The model's ``info`` attribute is its ``ModelInfo``: class names, palette, ignore index,
    normalisation, iteration and mIoU.
    """
    return load_trained(checkpoint_path, map_location)[0]


def load_trained(
    checkpoint_path: str | Path, map_location: str = "cpu"
) -> tuple[SegmentationModel, dict[str, Any]]:
    """The trained model (in eval mode, its ``ModelInfo`` as ``model.info``) and its
    checkpoint: the training ``config`` (dataset, classes, normalisation), ``iteration``,
    ``best_miou``.

    Raises:
        UserError: the file is not a readable checkpoint, or not one that training wrote.
    """
    ckpt = load_checkpoint(checkpoint_path, map_location=map_location)  # a dict with "model"
    description = ModelDescription.from_checkpoint(ckpt, source=str(checkpoint_path))
    if not isinstance(ckpt.get("config", {}), dict):
        raise UserError(f"{checkpoint_path}: its 'config' entry is not a mapping")
    model = build_from_description(description)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as err:
        raise UserError(
            f"checkpoint {checkpoint_path}'s weights do not fit the model it describes "
            f"({error_summary(err)})"
        ) from err
    iteration, miou = ckpt.get("iteration", 0), ckpt.get("best_miou")
    try:
        model.info = ModelInfo.from_description(description, iteration=iteration, miou=miou)
    except (TypeError, ValueError) as err:
        raise UserError(f"checkpoint {checkpoint_path}: iteration or best_miou unreadable") from err
    model.description = description
    return model.eval(), ckpt
