"""What every dataset shares: label checks with file names, and the transform call."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from fcnseg.errors import UserError

Sample = tuple[np.ndarray, np.ndarray]


class SegmentationDataset(Dataset):
    """Base class. Subclasses implement ``__len__``, ``load`` and ``describe``.

    ``load(i)`` returns the image (H, W, 3) uint8 RGB and the label map (H, W) of class indices
    as the model sees them (``ignore_index`` for unlabelled pixels); ``describe(i)`` names the
    files behind sample ``i`` for error messages.

    Args:
        num_classes: labels must lie in ``[0, num_classes)`` or equal ``ignore_index``.
        ignore_index: label value that is not scored.
        transform: callable ``(image, mask) -> (image tensor (3, H, W), mask tensor (H, W))``.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        ignore_index: int = 255,
        transform: Callable[[np.ndarray, np.ndarray], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.transform = transform

    def load(self, index: int) -> Sample:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f"sample {index}"

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``key``, or ``(index, seed)`` to draw its random augmentation from ``seed``."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, mask = self.load(index)
        self.check(index, image, mask)
        if self.transform is not None:
            if seed is not None:
                self.transform.reseed(seed)
            return self.transform(image, mask)
        return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(mask.astype(np.int64))

    def check(self, index: int, image: np.ndarray, mask: np.ndarray) -> None:
        """Raises a ``UserError`` naming the file when a label or a size is wrong."""
        if image.shape[:2] != mask.shape[:2]:
            raise UserError(
                f"{self.describe(index)}: image is {image.shape[1]}x{image.shape[0]} but its label "
                f"is {mask.shape[1]}x{mask.shape[0]}"
            )
        values = np.unique(mask)
        bad = values[((values < 0) | (values >= self.num_classes)) & (values != self.ignore_index)]
        if bad.size:
            raise UserError(
                f"{self.describe(index)}: label value {int(bad[0])} is neither a class in "
                f"[0, {self.num_classes}) nor the ignore index {self.ignore_index}"
            )
