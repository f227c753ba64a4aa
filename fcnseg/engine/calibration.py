"""Images for calibrating an INT8 export, read from a checkpoint's own dataset.

``fcnseg.deploy.export_checkpoint`` quantizes; what it calibrates on comes from here, where
datasets may be read (the deploy package never reads one). The checkpoint's dataset config is
data from a file: it is built through ``fcnseg.data.trusted`` (fcnseg's own dataset classes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fcnseg.data.transforms import build_transforms
from fcnseg.data.trusted import dataset_builder
from fcnseg.engine.evaluator import evaluation_dataset
from fcnseg.errors import UserError


def dataset_images(
    config: Mapping[str, Any],
    *,
    split: str,
    count: int,
    input_size: Sequence[int],
    source: str,
    dataset_root: str | None = None,
    skip: Sequence[str] = (),
) -> tuple[list[torch.Tensor], list[str]]:
    """``count`` images of a checkpoint's dataset, normalised as evaluation does and resized
    (bilinear) to ``input_size``, with their names.

    The images are spread evenly over the split (consecutive frames of a video are alike).

    Args:
        config: the checkpoint's training config; its ``dataset.builder`` is built through
            ``fcnseg.data.trusted.dataset_builder`` (fcnseg's own dataset classes only).
        split: ``train_split`` or ``val_split`` (the dataset's key), or a split's own name.
        count: how many images (fewer if the split has fewer).
        input_size: (height, width) of the returned images.
        source: what ``config`` was read from, for messages.
        dataset_root: where the dataset is now, if it moved since training.
        skip: names (``describe``) of images not to take, e.g. the calibration images.

    Raises:
        UserError: a dataset config outside the allow-list, an unreadable dataset, an empty
            split.
    """
    trained = config.get("dataset") if isinstance(config, Mapping) else None
    if not isinstance(trained, Mapping):
        raise UserError(f"{source} has no dataset config to read calibration images from")
    ds = evaluation_dataset(trained, {"root": dataset_root}, chosen=False)
    split = ds.get(split, split)
    transform = build_transforms(
        train=False, normalize=ds["normalize"], ignore_index=ds.get("ignore_index", 255)
    )
    dataset = dataset_builder(ds.get("builder"), source=source)(split=split, transform=transform)
    names = [dataset.describe(i) for i in range(len(dataset))]
    free = [i for i, name in enumerate(names) if name not in set(skip)]
    if not free or count < 1:
        raise UserError(f"{source}: the {split} split of {ds.get('name')} has no image to use")
    picks = sorted({free[round(k)] for k in np.linspace(0, len(free) - 1, min(count, len(free)))})
    images = []
    for i in picks:
        image = dataset[i][0].float()[None]
        image = F.interpolate(image, size=tuple(input_size), mode="bilinear", align_corners=False)
        images.append(image[0])
    return images, [names[i] for i in picks]
