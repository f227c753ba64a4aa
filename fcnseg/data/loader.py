"""Samplers, collation and loaders.

Training iterates over an endless, seeded stream of indices (each process takes its share of
each epoch's permutation), so a run is a function of its seed and can resume mid-epoch.
Evaluation shards the split into contiguous, non-overlapping parts: no sample is duplicated
or dropped, whatever the number of processes, so distributed metrics are exact.

Training batches of images of different sizes (whole images, ``crop_size=null``) are either
padded to the largest image (``batching="pad"``), or drawn from buckets of images of similar
size and aspect ratio (``batching="bucket"``) so that little padding is needed and no image
is resized to fit the others.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from fcnseg.errors import UserError

BATCHING = ("pad", "bucket")


class TrainingSampler(Sampler[tuple[int, int]]):
    """Endless shuffled ``(index, augmentation seed)`` pairs; process ``rank`` of ``world_size``
    takes every world_size-th.

    The augmentation seed is a function of (seed, epoch, index), so the random crops and flips
    a sample receives do not depend on the number of loader workers or on resumption.

    Args:
        size: dataset length.
        seed: the permutation of epoch ``e`` is drawn from ``seed + e``.
        rank, world_size: this process's share.
        shuffle: permute each epoch (else 0, 1, 2, ... repeated).
        start: number of this process's indices to skip (to resume mid-run).
    """

    def __init__(
        self,
        size: int,
        *,
        seed: int = 0,
        rank: int = 0, world_size: int = 1,
        shuffle: bool = True,
        start: int = 0,
    ) -> None:  # fmt: skip
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.shuffle, self.start = shuffle, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        skip, epoch = self.start, 0
        while True:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(self.size, generator=g)
            else:
                order = torch.arange(self.size)
            mine = order[self.rank :: self.world_size].tolist()
            if skip >= len(mine):
                skip -= len(mine)
            else:
                for i in mine[skip:]:
                    yield i, (self.seed * 1_000_003 + epoch * self.size + i) % 2**32
                skip = 0
            epoch += 1


class BucketBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless batches of ``(index, augmentation seed)`` pairs whose images have similar sizes.

    It reads ``TrainingSampler``'s stream (same seed, same share per process under DDP: each
    process buckets its own share) and drops every pair into the bucket of its image's size,
    both sides rounded up to a multiple of ``step``; a bucket that holds ``batch_size`` pairs
    is emitted as a batch. The images of a batch are therefore padded by less than ``step``
    pixels on each side. Buckets carry over from one epoch to the next, so no image is
    dropped, but an image whose bucket fills slowly (a rare size) waits for its batch-mates.
    The batches are a function of the seed alone, so resuming at batch ``start`` replays the
    stream of indices (nothing is loaded) up to it.

    Args:
        sizes: (height, width) of every sample, as stored (``None`` for an unreadable one: they
            form a bucket of their own).
        batch_size: samples per batch.
        seed, rank, world_size: as ``TrainingSampler``.
        start: number of this process's batches to skip (to resume mid-run).
        step: bucket granularity in pixels.
    """

    def __init__(
        self,
        sizes: Sequence[tuple[int, int] | None],
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0, world_size: int = 1,
        start: int = 0,
        step: int = 64,
    ) -> None:  # fmt: skip
        if batch_size < 1 or step < 1:
            raise ValueError(f"batch_size={batch_size} and step={step} must be positive")
        self.keys = [
            None if s is None else (math.ceil(s[0] / step), math.ceil(s[1] / step)) for s in sizes
        ]
        self.batch_size, self.start = batch_size, start
        self.stream = TrainingSampler(len(sizes), seed=seed, rank=rank, world_size=world_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        buckets: dict[tuple[int, int] | None, list[tuple[int, int]]] = {}
        skip = self.start
        for index, aug_seed in self.stream:
            bucket = buckets.setdefault(self.keys[index], [])
            bucket.append((index, aug_seed))
            if len(bucket) == self.batch_size:
                batch = bucket.copy()
                bucket.clear()
                if skip > 0:
                    skip -= 1
                    continue
                yield batch


def stored_sizes(dataset: Dataset) -> list[tuple[int, int] | None]:
    """(height, width) of every sample of ``dataset`` as stored (``image_size(i)``; file datasets
    read image headers only), ``None`` for a sample that cannot be read when the dataset skips
    those."""
    from fcnseg.data.io import CorruptFileError

    if not callable(getattr(dataset, "image_size", None)):
        raise UserError(
            f"dataset.batching=bucket needs the image sizes, which {type(dataset).__name__} "
            "does not give (no image_size(i) method)"
        )
    sizes: list[tuple[int, int] | None] = []
    for i in range(len(dataset)):
        try:
            sizes.append(tuple(dataset.image_size(i)))
        except CorruptFileError:
            if not getattr(dataset, "skip_corrupt", False):
                raise
            sizes.append(None)
    return sizes


class InferenceSampler(Sampler[int]):
    """Contiguous, disjoint shards of ``range(size)``; together they cover it exactly once."""

    def __init__(self, size: int, *, rank: int = 0, world_size: int = 1) -> None:
        per, extra = divmod(size, world_size)
        self.begin = rank * per + min(rank, extra)
        self.end = self.begin + per + (rank < extra)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.begin, self.end))

    def __len__(self) -> int:
        return self.end - self.begin


class _Raised:
    """A ``UserError`` raised while a loader worker read a sample, on its way to the main
    process as a value."""

    def __init__(self, error: UserError) -> None:
        self.error = error


class _ErrorsAsValues(Dataset):
    """Returns the ``UserError`` a sample raises instead of raising it in the worker."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        try:
            return self.dataset[key]
        except UserError as err:
            return _Raised(err)

    def __getattr__(self, name: str):
        if name == "dataset":  # not yet set while unpickling in a worker
            raise AttributeError(name)
        return getattr(self.dataset, name)


class SegLoader(DataLoader):
    """A DataLoader whose samples' ``UserError`` (a bad label, an unreadable file) reaches the
    caller as the error the dataset raised.

    PyTorch re-raises a worker's exception with the worker's traceback folded into its message,
    which would turn the one sentence naming the file into a page of frames.
    """

    def __init__(self, dataset: Dataset, **kwargs) -> None:
        super().__init__(_ErrorsAsValues(dataset), **kwargs)

    def __iter__(self) -> Iterator:
        # The base iterator is made now, not at the first batch: starting workers draws their
        # seed from torch's generator, which callers may want to happen at this point.
        return _RaisingIterator(super().__iter__(), self)


class _RaisingIterator:
    """The batches of one pass; ``close()`` (or leaving a ``with`` block) stops its workers.

    Every way out of a loop over a loader must stop the workers: workers that ignore SIGTERM
    (see ``fcnseg.engine.preemption``) and are never told to stop keep the interpreter's exit
    waiting for them forever, and a traceback holding the iterator keeps them from being
    collected.
    """

    def __init__(self, batches: Iterator, loader: DataLoader) -> None:
        self.batches, self.loader = batches, loader

    def __iter__(self) -> _RaisingIterator:
        return self

    def __len__(self) -> int:
        return len(self.batches)

    def __enter__(self) -> _RaisingIterator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stops the worker processes now (a no-op without workers, or when done twice)."""
        stop_workers(self.batches)
        if getattr(self.loader, "_iterator", None) is self.batches:
            self.loader._iterator = None  # persistent workers: the next pass starts new ones

    def __next__(self):
        batch = next(self.batches)
        if isinstance(batch, _Raised):
            error, batch = batch.error, None
            try:
                raise error
            finally:
                # No frame -> traceback -> frame cycle, which would keep the loader's workers
                # alive (and copied into the next loader's forked workers) until a collection.
                error = None
        return batch


def stop_workers(batches: Iterator) -> None:
    """Stops a DataLoader iterator's worker processes now.

    For every way out of a loop over a loader: dropping the iterator is not enough (a traceback
    that holds the loop's frame keeps it, and its workers, alive), and workers that ignore
    SIGTERM outlive PyTorch's own terminate, which would keep the interpreter's exit waiting.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()  # asks each worker to stop, joins it, terminates the ones that hang
    for worker in getattr(batches, "_workers", ()):
        if worker.is_alive():  # ignored the terminate (SIGTERM) above
            worker.kill()
            worker.join()


class PadCollate:
    """Stacks samples of different sizes by padding to the largest (image 0, mask ignore).

    Padding goes to the bottom and right so that pixel (0, 0) stays put.
    """

    def __init__(self, ignore_index: int = 255, size_divisor: int = 1) -> None:
        self.ignore_index = ignore_index
        self.size_divisor = size_divisor

    def __call__(
        self, batch: Sequence[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raised = next((b for b in batch if isinstance(b, _Raised)), None)
        if raised is not None:
            return raised
        d = self.size_divisor
        h = -(-max(img.shape[-2] for img, _ in batch) // d) * d
        w = -(-max(img.shape[-1] for img, _ in batch) // d) * d
        if all(img.shape[-2:] == (h, w) for img, _ in batch):
            return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
        images = torch.stack(
            [F.pad(img, (0, w - img.shape[-1], 0, h - img.shape[-2])) for img, _ in batch]
        )
        masks = torch.stack(
            [
                F.pad(m, (0, w - m.shape[-1], 0, h - m.shape[-2]), value=self.ignore_index)
                for _, m in batch
            ]
        )
        return images, masks


def train_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int = 2,
    seed: int = 0,
    rank: int = 0, world_size: int = 1,
    ignore_index: int = 255,
    start_iter: int = 0,
    pin_memory: bool = False,
    batching: str = "pad",
    bucket_step: int = 64,
) -> DataLoader:  # fmt: skip
    """An endless loader of training batches, resumable at iteration ``start_iter``.

    Args:
        dataset: yields (image, mask) for ``(index, seed)`` keys.
        batch_size: samples per batch (per process).
        num_workers: loader processes.
        seed: the data order and every augmentation follow from it.
        rank, world_size: this process's share under DDP.
        ignore_index: label value that pads masks.
        start_iter: batches already consumed (resume).
        pin_memory: page-locked batches for faster host-to-GPU copies.
        batching: ``pad`` (any samples together, padded to the largest) or ``bucket``
            (samples of similar stored size together; see ``BucketBatchSampler``).
        bucket_step: the bucket granularity in pixels for ``batching="bucket"``.
    """
    if batching not in BATCHING:
        raise UserError(f"dataset.batching={batching!r} is not one of {', '.join(BATCHING)}")
    loading = dict(num_workers=num_workers, persistent_workers=num_workers > 0)
    if batching == "bucket":
        sampler = BucketBatchSampler(
            stored_sizes(dataset), batch_size, seed=seed, rank=rank, world_size=world_size,
            start=start_iter, step=bucket_step,
        )  # fmt: skip
        return _padded_loader(dataset, ignore_index, pin_memory, batch_sampler=sampler, **loading)
    sampler = TrainingSampler(
        len(dataset), seed=seed, rank=rank, world_size=world_size, start=start_iter * batch_size
    )
    batches = dict(batch_size=batch_size, sampler=sampler, drop_last=True)
    return _padded_loader(dataset, ignore_index, pin_memory, **batches, **loading)


def eval_loader(
    dataset: Dataset,
    *,
    batch_size: int = 1,
    num_workers: int = 2,
    rank: int = 0, world_size: int = 1,
    ignore_index: int = 255,
    pin_memory: bool = False,
) -> DataLoader:  # fmt: skip
    """A loader over this process's exact shard of the split."""
    sampler = InferenceSampler(len(dataset), rank=rank, world_size=world_size)
    return _padded_loader(
        dataset,
        ignore_index,
        pin_memory,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
    )


def _padded_loader(
    dataset: Dataset, ignore_index: int, pin_memory: bool, **sampling: Any
) -> DataLoader:
    """A ``SegLoader`` whose batches are padded to their largest sample (``PadCollate``),
    sampled and loaded as ``sampling`` (``DataLoader``'s keywords) says."""
    collate = PadCollate(ignore_index)
    return SegLoader(dataset, collate_fn=collate, pin_memory=pin_memory, **sampling)
