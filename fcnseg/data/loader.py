"""Samplers, collation and loaders.

Training iterates over an endless, seeded stream of indices (each process takes its share of
each epoch's permutation), so a run is a function of its seed and can resume mid-epoch.
Evaluation shards the split into contiguous, non-overlapping parts: no sample is duplicated
or dropped, whatever the number of processes, so distributed metrics are exact.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler


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
        self, size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True, start: int = 0
    ) -> None:
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


class PadCollate:
    """Stacks samples of different sizes by padding to the largest (image 0, mask ignore).

    Padding goes to the bottom and right so that pixel (0, 0) stays put.
    """

    def __init__(self, ignore_index: int = 255, size_divisor: int = 1) -> None:
        self.ignore_index = ignore_index
        self.size_divisor = size_divisor

    def __call__(self, batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.size_divisor
        h = -(-max(img.shape[-2] for img, _ in batch) // d) * d
        w = -(-max(img.shape[-1] for img, _ in batch) // d) * d
        if all(img.shape[-2:] == (h, w) for img, _ in batch):
            return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
        images = torch.stack([F.pad(img, (0, w - img.shape[-1], 0, h - img.shape[-2])) for img, _ in batch])
        masks = torch.stack(
            [F.pad(m, (0, w - m.shape[-1], 0, h - m.shape[-2]), value=self.ignore_index) for _, m in batch]
        )
        return images, masks


def train_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int = 2,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    ignore_index: int = 255,
    start_iter: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """An endless loader of training batches, resumable at iteration ``start_iter``."""
    sampler = TrainingSampler(
        len(dataset), seed=seed, rank=rank, world_size=world_size, start=start_iter * batch_size
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=PadCollate(ignore_index),
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=num_workers > 0,
    )


def eval_loader(
    dataset: Dataset,
    *,
    batch_size: int = 1,
    num_workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    ignore_index: int = 255,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader over this process's exact shard of the split."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=InferenceSampler(len(dataset), rank=rank, world_size=world_size),
        num_workers=num_workers,
        collate_fn=PadCollate(ignore_index),
        pin_memory=pin_memory,
    )

