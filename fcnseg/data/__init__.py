"""Datasets (one module per family), transforms and loaders."""

from fcnseg.data.base import SegmentationDataset
from fcnseg.data.loader import InferenceSampler, PadCollate, TrainingSampler, eval_loader, train_loader
from fcnseg.data.synthetic import SyntheticShapes
from fcnseg.data.transforms import build_transforms

__all__ = [
    "InferenceSampler",
    "PadCollate",
    "SegmentationDataset",
    "SyntheticShapes",
    "TrainingSampler",
    "build_transforms",
    "eval_loader",
    "train_loader",
]
