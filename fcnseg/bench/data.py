"""The training data pipeline, timed: the dataset's reader, the training transform and the
training loader that ``scripts/train.py`` uses, on the configured dataset or on a generated
VOC 2012 folder of 500x375 JPEG/palette-PNG pairs."""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fcnseg.bench.common import PeakMemory, Timed, make_report, summarize, time_calls, use_threads
from fcnseg.bench.voc_layout import write_synthetic_voc
from fcnseg.data.base import SegmentationDataset
from fcnseg.data.loader import train_loader
from fcnseg.data.transforms import build_transforms
from fcnseg.data.voc import VOCSegmentation
from fcnseg.errors import UserError


def decoder_speeds(files: Sequence[Path], *, repeat: int = 3) -> dict[str, float]:
    """Milliseconds per JPEG (median) for Pillow, OpenCV and torchvision.io, to RGB uint8."""
    import cv2
    from PIL import Image

    decoders: dict[str, Callable[[Path], Any]] = {
        "pil": lambda p: np.asarray(Image.open(p).convert("RGB")),
        "opencv": lambda p: cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB),
    }
    with contextlib.suppress(ImportError):
        from torchvision.io import decode_jpeg, read_file

        decoders["torchvision.io"] = lambda p: (
            decode_jpeg(read_file(str(p))).permute(1, 2, 0).numpy()
        )
    times: dict[str, list[float]] = {name: [] for name in decoders}
    for _ in range(repeat):
        for path in files:
            for name, decode in decoders.items():  # interleaved, as in time_calls
                start = time.perf_counter()
                decode(path)
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def time_data_pipeline(
    *,
    dataset: SegmentationDataset,
    batch: int,
    num_workers: int,
    warmup: int,
    iters: int,
    ignore_index: int = 255,
    batching: str = "pad",
    jpeg_files: Sequence[Path] = (),
    threads: int | None = None,
) -> dict[str, Any]:
    """The training data pipeline alone: decode, label check, augmentation and tensors.

    In this process, one image at a time, each stage is timed separately: images/s is then the
    rate of one CPU core (one loader worker). With ``num_workers > 0`` the training loader
    (``fcnseg.data.loader.train_loader``) with that many workers, collation included, is timed
    too, per batch of ``batch`` images.

    Args:
        dataset: read with ``load`` and ``check``, transformed by its ``transform``.
        batch: images per loader batch; ``iters`` batches of images are timed in process.
        num_workers: loader workers (0: the in-process stages only).
        warmup, iters: untimed images, timed batches.
        ignore_index, batching: as the training loader takes them.
        jpeg_files: JPEGs to time Pillow, OpenCV and torchvision.io decoding on.
        threads: PyTorch's and OpenCV's CPU threads (``None``: their defaults).
    """
    use_threads(threads)
    transform = dataset.transform
    if transform is None:
        raise UserError("bench=data needs a dataset with a training transform")
    stages: dict[str, list[float]] = {"decode": [], "check": [], "augment": [], "total": []}
    memory = PeakMemory(torch.device("cpu"))
    count = warmup + iters * batch
    memory.reset()
    for k in range(count):
        i = k % len(dataset)
        t0 = time.perf_counter()
        image, mask = dataset.load(i)
        t1 = time.perf_counter()
        dataset.check(i, image, mask)
        t2 = time.perf_counter()
        transform.reseed(k)
        transform(image, mask)
        t3 = time.perf_counter()
        if k >= warmup:
            for name, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                stages[name].append(seconds)
    timed = Timed(seconds=stages["total"], peak_bytes=memory.peak_bytes(), memory=memory.kind)
    per_core = sum(stages["total"])
    results = [
        summarize(
            "one worker (in process), per image",
            timed,
            images_per_call=1,
            throughput_images_per_s=len(stages["total"]) / per_core,
        )
    ]
    summary: dict[str, Any] = {
        "images_per_s_per_core": len(stages["total"]) / per_core,
        "median_ms_per_image": {k: 1e3 * statistics.median(v) for k, v in stages.items()},
    }
    if num_workers > 0:
        loader = train_loader(
            dataset, batch_size=batch, num_workers=num_workers, ignore_index=ignore_index,
            batching=batching,
        )  # fmt: skip
        with iter(loader) as batches:  # leaving stops the workers, whatever the way out
            loaded = time_calls(
                {"loader": lambda: next(batches)},
                device=torch.device("cpu"),
                warmup=max(1, warmup),
                iters=iters,
            )
        row = summarize(
            f"DataLoader, {num_workers} workers, per batch", loaded["loader"], images_per_call=batch
        )
        row["images_per_s_per_worker"] = row["images_per_s"] / num_workers
        results.append(row)
    if jpeg_files:
        summary["jpeg_decode_ms"] = decoder_speeds(jpeg_files)
    image, _ = dataset.load(0)
    return make_report(
        "data",
        torch.device("cpu"),
        results,
        summary,
        batch=batch,
        num_workers=num_workers,
        warmup=warmup,
        dataset=type(dataset).__name__,
        images=len(dataset),
        first_image_size=[int(image.shape[1]), int(image.shape[0])],
    )


def time_training_data(
    *,
    root: str | Path | None,
    make_dataset: Callable[..., SegmentationDataset],
    split: str = "train",
    size: int,
    normalize: str = "imagenet",
    scale_range: Sequence[float] = (0.5, 2.0),
    hflip: bool = True,
    color_jitter: float = 0.0,
    ignore_index: int = 255,
    batching: str = "pad",
    batch: int,
    num_workers: int,
    warmup: int,
    iters: int,
    threads: int | None = None,
) -> dict[str, Any]:
    """``time_data_pipeline`` on the training split as training reads it.

    The transform is ``build_transforms(train=True, ...)`` with ``size`` crops and the
    dataset's augmentation settings. With a ``root``, the dataset is
    ``make_dataset(split=split, transform=...)``; without one, 16 generated 500x375 images in
    the VOC 2012 layout (``write_synthetic_voc``, 8 of them ``train``), written to a temporary
    folder and read by ``VOCSegmentation``.
    """
    transform = build_transforms(
        train=True, normalize=normalize, ignore_index=ignore_index, crop_size=size,
        scale_range=scale_range, hflip=hflip, color_jitter=color_jitter,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="fcnseg-bench-") as tmp:
        if root is None:
            root = write_synthetic_voc(Path(tmp) / "voc")
            dataset = VOCSegmentation(
                root=root, split="train", ignore_index=ignore_index, transform=transform
            )
        else:
            dataset = make_dataset(split=split, transform=transform)
        jpegs = sorted(Path(root).expanduser().rglob("*.jpg"))[:8]
        return time_data_pipeline(
            dataset=dataset, batch=batch, num_workers=num_workers, warmup=warmup, iters=iters,
            ignore_index=ignore_index, batching=batching, jpeg_files=jpegs, threads=threads,
        )  # fmt: skip
