"""Class weights for the loss: median-frequency balancing, computed once per dataset and cached.

Median-frequency balancing (Eigen & Fergus, 2015; SegNet's CamVid setup) weights class ``c`` by
``median_freq / freq(c)``, where ``freq(c)`` is the number of pixels of class ``c`` divided by
the number of labelled pixels in the training images that contain ``c``, and the median is
taken over the classes that occur. Rare classes get weights above 1, dominant ones below 1.
Pixels equal to ``ignore_index`` are counted nowhere. A class absent from every training label
has no frequency; it gets weight 1, which never enters the loss since no pixel carries it.

Counting means reading every training label once, so the counts and weights are cached in
``$FCNSEG_CACHE/class_weights`` (default ``~/.cache/fcnseg/class_weights``) under a key made of
the dataset's class, configuration, length and sample names, and the size and times of every
label file, so that a label edited in place is counted again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fcnseg.data.base import SegmentationDataset
from fcnseg.errors import UserError
from fcnseg.utils.atomic import write_atomic
from fcnseg.utils.logging import get_logger, progress

MEDIAN_FREQUENCY = "median_frequency"


def label_counts(
    dataset: SegmentationDataset, *, num_classes: int, ignore_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per class: its pixel count, and the labelled-pixel count of the images it occurs in.

    Labels are read raw (``dataset.load``), before any augmentation, and checked like training
    samples, so a bad label value raises a ``UserError`` naming its file.
    """
    class_pixels = np.zeros(num_classes, np.int64)
    image_pixels = np.zeros(num_classes, np.int64)
    for i in progress(range(len(dataset)), desc="counting labels"):
        image, mask = dataset.load(i)
        dataset.check(i, image, mask)
        valid = mask[mask != ignore_index].astype(np.int64)
        counts = np.bincount(valid.ravel(), minlength=num_classes)
        class_pixels += counts
        image_pixels[counts > 0] += valid.size
    return class_pixels, image_pixels


def median_frequency_weights(
    class_pixels: Sequence[int], image_pixels: Sequence[int]
) -> list[float]:
    """``median(freq) / freq(c)`` with ``freq(c) = class_pixels[c] / image_pixels[c]``.

    Classes that never occur get 1.0 and are left out of the median.
    """
    class_pixels = np.asarray(class_pixels, np.float64)
    image_pixels = np.asarray(image_pixels, np.float64)
    present = class_pixels > 0
    if not present.any():
        raise UserError(
            "median-frequency class weights: the training labels contain no labelled pixel"
        )
    freq = np.divide(class_pixels, image_pixels, out=np.zeros_like(class_pixels), where=present)
    median = float(np.median(freq[present]))
    weights = np.ones_like(freq)
    weights[present] = median / freq[present]
    return [float(w) for w in weights]


def default_cache_dir() -> Path:
    """``$FCNSEG_CACHE``, else ``$XDG_CACHE_HOME/fcnseg``, else ``~/.cache/fcnseg``."""
    if os.environ.get("FCNSEG_CACHE"):
        return Path(os.environ["FCNSEG_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fcnseg"


def label_file_state(paths: Sequence[str | Path]) -> str:
    """A hash of each file's path, size, modification and status-change times (ns).

    One ``stat`` per file instead of reading the labels: editing a file changes its size or
    modification time, and every write or ``touch`` (even one that restores the old
    modification time, as ``cp -p`` or ``rsync -t`` do) sets the status-change time, which no
    user call can set back. A copy of the dataset elsewhere is counted again, which costs one
    pass and is never wrong.
    """
    digest = hashlib.sha256()
    for path in paths:
        try:
            st = os.stat(path)
            state = f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}"
        except OSError:
            state = "unreadable"  # counting will name the file
        digest.update(f"{path}\t{state}\n".encode())
    return digest.hexdigest()


def dataset_key(
    dataset: SegmentationDataset,
    identity: Mapping[str, Any],
    *,
    num_classes: int,
    ignore_index: int,
) -> str:
    """A hash of what determines the training labels: class, configuration, samples, and the
    state of every label file (``label_file_state``)."""
    samples = hashlib.sha256("\n".join(dataset.describe(i) for i in range(len(dataset))).encode())
    description = {
        "class": f"{type(dataset).__module__}.{type(dataset).__qualname__}",
        "identity": identity,
        "length": len(dataset),
        "samples": samples.hexdigest(),
        "label_files": label_file_state(dataset.label_files()),
        "num_classes": num_classes,
        "ignore_index": ignore_index,
    }
    return hashlib.sha256(
        json.dumps(description, sort_keys=True, default=str).encode()
    ).hexdigest()[:20]


def cached_median_frequency(
    dataset: SegmentationDataset,
    *,
    num_classes: int,
    ignore_index: int,
    identity: Mapping[str, Any],
    cache_dir: str | Path | None = None,
) -> list[float]:
    """Median-frequency weights of ``dataset``'s labels, read from or written to the cache.

    Args:
        dataset: the training split (its raw labels are read).
        num_classes, ignore_index: as in the dataset config.
        identity: what configures the dataset (root, split, builder arguments); part of the key.
        cache_dir: folder of the cache; ``default_cache_dir() / "class_weights"`` if ``None``.
    """
    log = get_logger()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "class_weights"
    key = dataset_key(dataset, identity, num_classes=num_classes, ignore_index=ignore_index)
    path = folder / f"{MEDIAN_FREQUENCY}-{key}.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            weights = [float(w) for w in cached["weights"]]
            if len(weights) == num_classes and all(math.isfinite(w) for w in weights):
                log.info("median-frequency class weights from %s: %s", path, _fmt(weights))
                return weights
        except (OSError, ValueError, KeyError, TypeError):
            pass
        log.warning("ignoring the unreadable class-weight cache %s; recounting", path)
    class_pixels, image_pixels = label_counts(
        dataset, num_classes=num_classes, ignore_index=ignore_index
    )
    weights = median_frequency_weights(class_pixels, image_pixels)
    absent = [c for c in range(num_classes) if class_pixels[c] == 0]
    if absent:
        log.warning("classes %s never occur in the training labels; their weight is 1", absent)
    record = {
        "identity": identity,
        "num_classes": num_classes,
        "ignore_index": ignore_index,
        "class_pixels": class_pixels.tolist(),
        "image_pixels": image_pixels.tolist(),
        "weights": weights,
    }
    try:
        # Written whole then renamed, so concurrent processes never read half a file.
        write_atomic(path, json.dumps(record, indent=2, default=str))
        log.info("median-frequency class weights (cached in %s): %s", path, _fmt(weights))
    except OSError as err:  # the weights are used all the same, only not cached
        log.warning("could not cache the class weights (%s)", err)
    return weights


def resolve_class_weights(
    spec: str | Sequence[float] | None,
    *,
    dataset: SegmentationDataset,
    num_classes: int,
    ignore_index: int,
    identity: Mapping[str, Any],
    cache_dir: str | Path | None = None,
    power: float = 1.0,
) -> list[float] | None:
    """The loss weights that ``loss.class_weights`` and ``loss.class_weight_power`` ask for.

    Args:
        spec: ``None`` (unweighted), one non-negative weight per class, or
            ``"median_frequency"`` (computed from ``dataset``'s labels, cached).
        dataset, num_classes, ignore_index, identity, cache_dir: see ``cached_median_frequency``.
        power: each weight is raised to it: 1 keeps them, 0.5 takes their square roots (a
            milder balance: median-frequency weights span 59x on CamVid, their roots 7.7x), 0
            makes them all 1.
    """
    try:
        power = float(power)
    except (TypeError, ValueError):
        raise UserError(f"loss.class_weight_power={power!r} is not a number") from None
    if not 0 <= power <= 4:
        raise UserError(f"loss.class_weight_power={power} must lie in [0, 4]")
    if isinstance(spec, str) and spec == MEDIAN_FREQUENCY:
        weights = cached_median_frequency(
            dataset, num_classes=num_classes, ignore_index=ignore_index, identity=identity,
            cache_dir=cache_dir,
        )  # fmt: skip
    else:
        weights = _given_weights(spec, num_classes=num_classes)
    if weights is None or power == 1:
        return weights
    weights = [w**power for w in weights]
    get_logger().info("class weights to the power %g: %s", power, _fmt(weights))
    return weights


def _given_weights(spec: str | Sequence[float] | None, *, num_classes: int) -> list[float] | None:
    """``spec`` checked as ``None`` or one finite non-negative weight per class."""
    if spec is None:
        return None
    if isinstance(spec, str):
        raise UserError(
            f"loss.class_weights={spec!r} is not null, {MEDIAN_FREQUENCY} or a list of "
            f"{num_classes} weights"
        )
    if not isinstance(spec, Sequence):
        raise UserError(f"loss.class_weights={spec!r} is not null, {MEDIAN_FREQUENCY} or a list")
    try:
        weights = [float(w) for w in spec]
    except (TypeError, ValueError):
        raise UserError(
            f"loss.class_weights={list(spec)} holds a value that is not a number"
        ) from None
    if len(weights) != num_classes:
        raise UserError(
            f"loss.class_weights has {len(weights)} weights but dataset.num_classes is "
            f"{num_classes}"
        )
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise UserError(f"loss.class_weights={weights} must be finite and non-negative")
    return weights


def _fmt(weights: Sequence[float]) -> str:
    return "[" + ", ".join(f"{w:.4f}" for w in weights) + "]"
