"""Models: backbones (what features exist), heads (how to score them), and builders."""

from fcnseg.models.builder import ModelInfo, build_model, build_model_from_config, load_model
from fcnseg.models.segmentation import SegmentationModel

__all__ = [
    "ModelInfo",
    "SegmentationModel",
    "build_model",
    "build_model_from_config",
    "load_model",
]
