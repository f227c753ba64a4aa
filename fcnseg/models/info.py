"""``ModelInfo``: what a trained model expects and produces (classes, palette, ignore index,
input normalisation, training state), everything a caller needs besides the weights.

A loaded model carries it as ``model.info``, whether rebuilt from a checkpoint
(``fcnseg.models.loading``) or run from an exported file (``fcnseg.deploy.session``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fcnseg.models.description import ModelDescription
from fcnseg.utils.normalization import Normalization, get_normalization
from fcnseg.utils.visualize import full_palette


@dataclass(frozen=True)
class ModelInfo:
    """What a trained model expects and produces: everything a caller needs besides weights.

    The model maps images normalised with ``normalization`` (N, 3, H, W) to logits
    (N, ``num_classes``, H, W) of the classes ``class_names``, drawn in ``palette``.

    Attributes:
        class_names: one name per output channel.
        palette: one RGB colour per class (the dataset's own, else the VOC map's).
        ignore_index: the label value that marked unlabelled pixels in training.
        normalize: the name of the input normalisation (``imagenet``, ``caffe``, ``none``).
        iteration: the training step of the weights.
        miou: the best validation mIoU recorded in training (a fraction), if it evaluated.
    """

    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int = 255
    normalize: str = "imagenet"
    iteration: int = 0
    miou: float | None = None

    @classmethod
    def create(
        cls,
        *,
        class_names: Sequence[str],
        palette: Any = None,
        ignore_index: int = 255,
        normalize: str = "imagenet",
        iteration: int = 0,
        miou: float | None = None,
    ) -> ModelInfo:
        """A ``ModelInfo`` with its fields checked; ``palette=None`` gives the VOC map's colours.

        Raises:
            UserError: an unknown normalisation.
        """
        get_normalization(normalize)
        names = tuple(str(n) for n in class_names)
        colors = full_palette(palette)[: len(names)]
        valid = miou is not None and math.isfinite(miou) and miou >= 0  # training's -1: none
        return cls(
            class_names=names,
            palette=tuple(tuple(int(c) for c in rgb) for rgb in colors),
            ignore_index=int(ignore_index),
            normalize=str(normalize),
            iteration=int(iteration),
            miou=float(miou) if valid else None,
        )

    @classmethod
    def from_description(
        cls, description: ModelDescription, *, iteration: int = 0, miou: float | None = None
    ) -> ModelInfo:
        """The info of a ``ModelDescription`` and the training state of its weights."""
        return cls.create(
            class_names=description.class_names,
            palette=description.palette,
            ignore_index=description.ignore_index,
            normalize=description.normalize,
            iteration=iteration,
            miou=miou,
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def normalization(self) -> Normalization:
        """Per channel ``(pixel / max_pixel_value - mean) / std``, then BGR if ``bgr``."""
        return get_normalization(self.normalize)
