"""Models: backbones (what features exist), heads (how to score them), and builders."""

from fcnseg.models.builder import build_model, build_model_from_config
from fcnseg.models.info import ModelInfo
from fcnseg.models.loading import load_model
from fcnseg.models.segmentation import SegmentationModel

__all__ = [
    "ModelInfo",
    "SegmentationModel",
    "build_model",
    "build_model_from_config",
    "load_model",
]
