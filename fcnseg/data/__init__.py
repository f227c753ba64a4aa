"""Datasets (one module per family), transforms and loaders."""

from fcnseg.data.base import FilePairDataset, SegmentationDataset
from fcnseg.data.camvid import CamVid
from fcnseg.data.cityscapes import Cityscapes
from fcnseg.data.coco import COCOSegmentation
from fcnseg.data.folder import SegmentationFolder
from fcnseg.data.io import CorruptFileError
from fcnseg.data.loader import (
    BucketBatchSampler,
    InferenceSampler,
    PadCollate,
    TrainingSampler,
    eval_loader,
    train_loader,
)
from fcnseg.data.predictions import PredictionWriter
from fcnseg.data.synthetic import SyntheticShapes
from fcnseg.data.transforms import build_transforms
from fcnseg.data.voc import SBDSegmentation, VOCAugSegmentation, VOCSegmentation

__all__ = [
    "BucketBatchSampler",
    "COCOSegmentation",
    "CamVid",
    "Cityscapes",
    "CorruptFileError",
    "FilePairDataset",
    "InferenceSampler",
    "PadCollate",
    "PredictionWriter",
    "SBDSegmentation",
    "SegmentationDataset",
    "SegmentationFolder",
    "SyntheticShapes",
    "TrainingSampler",
    "VOCAugSegmentation",
    "VOCSegmentation",
    "build_transforms",
    "eval_loader",
    "train_loader",
]
