"""Resumable mini-batch iteration: an epoch's order depends only on (seed, epoch)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from moevision.data.base import ImageDataset

_MASK64 = (1 << 64) - 1


def _mix(seed: int, epoch: int) -> int:
    """A stable 63-bit seed from (seed, epoch) (splitmix64 finaliser; no Python ``hash``)."""
    z = ((int(seed) & _MASK64) * 0x9E3779B97F4A7C15 + (int(epoch) & _MASK64) + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """How many batches one epoch over ``n`` samples yields."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    return n // batch_size if drop_last else -(-n // batch_size)


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a permutation seeded by (seed, epoch), or arange(n)."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, epoch)))


def iterate_batches(
    dataset: ImageDataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    start_batch: int = 0,
    device: torch.device | str | None = None,
    shard: tuple[int, int] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (float32 images in [0, 1], int64 labels) batches of one epoch, skipping the first ``start_batch``.

    ``shard=(rank, world_size)``: yield only this rank's contiguous slice of every batch (distributed
    training: the W slices of a batch make up the single-process batch; a slice may be empty)."""
    total = num_batches(len(dataset), batch_size, drop_last)
    if not 0 <= start_batch <= total:
        raise ValueError(f"start_batch={start_batch} must be in [0, {total}] for this epoch")
    order = epoch_order(len(dataset), shuffle=shuffle, seed=seed, epoch=epoch)
    for i in range(start_batch, total):
        idx = order[i * batch_size : (i + 1) * batch_size]
        if shard is not None:
            idx = torch.tensor_split(idx, shard[1])[shard[0]]
        images, labels = dataset.float_images(idx), dataset.labels[idx]
        if device is not None:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        yield images, labels


@dataclass
class BatchIterator:
    """A re-iterable, sized view of one epoch of :func:`iterate_batches`."""

    dataset: ImageDataset
    batch_size: int
    shuffle: bool = True
    seed: int = 0
    epoch: int = 0
    drop_last: bool = False
    start_batch: int = 0
    device: torch.device | str | None = None

    def __len__(self) -> int:
        return num_batches(len(self.dataset), self.batch_size, self.drop_last) - self.start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iterate_batches(
            self.dataset,
            self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch,
            drop_last=self.drop_last,
            start_batch=self.start_batch,
            device=self.device,
        )
