"""What every dataset shares: label checks with file names, unreadable samples, the transform."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fcnseg.data.io import CorruptFileError, image_size, read_image, read_label
from fcnseg.errors import UserError
from fcnseg.utils.logging import get_logger

Sample = tuple[np.ndarray, np.ndarray]


class SegmentationDataset(Dataset):
    """Base class. Subclasses implement ``__len__``, ``load`` and ``describe``.

    ``load(i)`` returns the image (H, W, 3) uint8 RGB and the label map (H, W) of class indices
    as the model sees them (``ignore_index`` for unlabelled pixels); ``describe(i)`` names the
    files behind sample ``i`` for error messages.

    Every sample is checked before it is transformed, so that a label value outside
    ``[0, num_classes)`` or an image and label of different sizes stop the run with the file's
    name before the network ever sees them.

    Args:
        num_classes: labels must lie in ``[0, num_classes)`` or equal ``ignore_index``.
        ignore_index: label value that is not scored.
        transform: callable ``(image, mask) -> (image tensor (3, H, W), mask tensor (H, W))``.
        skip_corrupt: a sample whose file is missing or cannot be decoded is replaced by the
            next readable one, with a warning naming the file, instead of stopping the run.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        ignore_index: int = 255,
        transform: Callable[[np.ndarray, np.ndarray], tuple[torch.Tensor, torch.Tensor]]
        | None = None,
        skip_corrupt: bool = False,
    ) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.skipped: set[int] = set()  # samples found unreadable in this process

    def load(self, index: int) -> Sample:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f"sample {index}"

    def describe_label(self, index: int) -> str:
        """The label file of sample ``index`` (for label value errors)."""
        return self.describe(index)

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) of sample ``index`` as stored; file datasets read only the header."""
        return tuple(self.load(index)[0].shape[:2])

    def data_folders(self) -> list[Path]:
        """The folders holding this dataset's files, its root first; outputs (predictions,
        reports) must stay out of them. None for generated data."""
        return []

    def label_files(self) -> list[Path]:
        """The files the label maps are read from (what label statistics depend on)."""
        return []

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``key``, or ``(index, seed)`` to draw its random augmentation from ``seed``."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} is out of range for {len(self)} samples")
        index %= len(self)
        image, mask = self.load_readable(index)
        if self.transform is not None:
            if seed is not None:
                self.transform.reseed(seed)
            return self.transform(image, mask)
        return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(mask.astype(np.int64))

    def load_readable(self, index: int) -> Sample:
        """``load(index)``, checked; with ``skip_corrupt``, the next readable sample in place of
        an unreadable one."""
        for offset in range(len(self)):
            i = (index + offset) % len(self)
            try:
                image, mask = self.load(i)
            except CorruptFileError as err:
                if not self.skip_corrupt:
                    raise
                if i not in self.skipped:
                    self.skipped.add(i)
                    get_logger().warning(
                        "dataset.skip_corrupt: skipping sample %d (%s); the next readable "
                        "sample takes its place",
                        i,
                        err,
                    )
                continue
            self.check(i, image, mask)
            return image, mask
        raise UserError(f"dataset.skip_corrupt: none of the {len(self)} samples can be read")

    def check(self, index: int, image: np.ndarray, mask: np.ndarray) -> None:
        """Raises a ``UserError`` naming the file when a label or a size is wrong."""
        if image.shape[:2] != mask.shape[:2]:
            raise UserError(
                f"{self.describe(index)}: image is {image.shape[1]}x{image.shape[0]} but its label "
                f"is {mask.shape[1]}x{mask.shape[0]}"
            )
        bad = invalid_labels(mask, self.num_classes, self.ignore_index)
        if bad.size:
            raise UserError(
                f"{self.describe_label(index)}: label value {int(bad[0])} is neither a class in "
                f"[0, {self.num_classes}) nor the ignore index {self.ignore_index}"
            )


def label_counts(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values, pixel counts) of a label map; a bincount for 8-bit maps (several times faster
    than ``np.unique``'s sort on a VOC-sized map)."""
    if mask.dtype == np.uint8:
        counts = np.bincount(mask.ravel(), minlength=256)
        values = np.flatnonzero(counts)
        return values, counts[values]
    return np.unique(mask, return_counts=True)


def invalid_labels(mask: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """The values of ``mask`` that are neither a class nor ``ignore_index``, ascending."""
    values = label_counts(mask)[0]
    return values[((values < 0) | (values >= num_classes)) & (values != ignore_index)]


class FilePairDataset(SegmentationDataset):
    """Samples stored as one image file and one label file each.

    Subclasses fill ``images`` and ``labels`` (parallel lists of paths) and may override
    ``read_label_file`` to decode or remap their label format.

    Args:
        images, labels: the image and label file of every sample.
        **kwargs: see ``SegmentationDataset``.
    """

    def __init__(
        self, *, images: Sequence[str | Path], labels: Sequence[str | Path], **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = [Path(p) for p in images]
        self.labels = [Path(p) for p in labels]

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, index: int) -> str:
        return f"{self.images[index]} (label {self.labels[index]})"

    def describe_label(self, index: int) -> str:
        return str(self.labels[index])

    def image_path(self, index: int) -> Path:
        return self.images[index]

    def image_size(self, index: int) -> tuple[int, int]:
        return image_size(self.images[index])

    def data_folders(self) -> list[Path]:
        """``root`` (when the subclass sets one), then every folder holding an image or a label."""
        root = getattr(self, "root", None)
        roots = [Path(root)] if root is not None else []
        return list(dict.fromkeys([*roots, *(p.parent for p in (*self.images, *self.labels))]))

    def label_files(self) -> list[Path]:
        return list(self.labels)

    def read_label_file(self, path: Path) -> np.ndarray:
        """The label map in ``path`` as the model sees it (class indices, ``ignore_index``)."""
        return read_label(path)

    def load(self, index: int):
        return read_image(self.images[index]), self.read_label_file(self.labels[index])


def missing_layout(what: str, path: Path, layout: str) -> UserError:
    """The one-sentence error for a dataset folder or split file that is not where expected."""
    return UserError(f"{what} {path} does not exist; expected {layout}")
