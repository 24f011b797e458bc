"""The in-memory image data set every loader returns."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class ImageDataset:
    """A labelled image classification set held in memory.

    ``images`` is uint8 (N, C, H, W) with values 0..255, or float32 (N, C, H, W) in [0, 1];
    ``labels`` is int64 (N,). ``mean``/``std`` are per-channel stats of the [0, 1] images.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    class_names: tuple[str, ...]
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"{self.name}: images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if self.images.dtype not in (torch.uint8, torch.float32):
            raise ValueError(f"{self.name}: images must be uint8 or float32, got {self.images.dtype}")
        if self.labels.ndim != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"{self.name}: labels must be (N,) with N={self.images.shape[0]}, got {tuple(self.labels.shape)}"
            )
        self.labels = self.labels.to(torch.int64)
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes")
        c = self.images.shape[1]
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(f"{self.name}: mean/std need {c} entries (one per channel)")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        _, c, h, w = self.images.shape
        return (int(c), int(h), int(w))

    def float_images(self, idx: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Images (all, or ``idx``) as float32 in [0, 1]."""
        x = self.images if idx is None else self.images[idx]
        if x.dtype == torch.uint8:
            return x.to(torch.float32).div_(255.0)
        return x.to(torch.float32)

    def subset(self, n: int, seed: int = 0) -> ImageDataset:
        """A deterministic random subset of ``n`` samples (all of them, reordered, if n >= len)."""
        if n < 0:
            raise ValueError(f"subset size must be >= 0, got {n}")
        g = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(len(self), generator=g)[: min(n, len(self))]
        return replace(self, images=self.images[idx].contiguous(), labels=self.labels[idx].contiguous())
