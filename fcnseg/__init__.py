"""fcnseg: fully convolutional semantic segmentation networks, trained and evaluated right."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fcnseg.models import ModelInfo, build_model, load_model

if TYPE_CHECKING:
    from fcnseg.engine.predictor import Predictor

__version__ = "0.1.0"
__all__ = ["ModelInfo", "Predictor", "build_model", "load_model"]


def __getattr__(name: str):
    # Imported on first use: the predictor brings the data pipeline (albumentations, OpenCV),
    # which ``import fcnseg`` for a model alone does not need.
    if name == "Predictor":
        from fcnseg.engine.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'fcnseg' has no attribute {name!r}")
