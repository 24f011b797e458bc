"""A deterministic, learnable synthetic image classification set for fast tests."""

from __future__ import annotations

import torch

from moevision.data.base import ImageDataset
from moevision.errors import DataError

SPLITS: tuple[str, ...] = ("train", "test")
NOISE_STD = 0.15


def _check_positive(**fields: int) -> None:
    for key, value in fields.items():
        if int(value) != value or value < 1:
            raise DataError(f"synthetic data set: {key}={value!r} must be a positive integer")


def make_templates(num_classes: int, image_size: int, channels: int, seed: int) -> torch.Tensor:
    """One fixed smooth random pattern per class, (K, C, S, S) in [0.1, 0.9]."""
    g = torch.Generator().manual_seed(10_007 * int(seed) + 1)
    coarse = max(2, image_size // 4)
    low = torch.rand(num_classes, channels, coarse, coarse, generator=g)
    up = torch.nn.functional.interpolate(low, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return 0.1 + 0.8 * up


def make_synthetic(
    split: str = "train",
    *,
    num_samples: int = 512,
    num_classes: int = 4,
    image_size: int = 16,
    channels: int = 1,
    seed: int = 0,
) -> ImageDataset:
    """``num_samples`` images: class template + Gaussian noise, clipped to [0, 1], balanced labels.

    Train and test share the templates (from ``seed``) but draw labels/noise from different generators;
    ``mean``/``std`` are the (clipping-free) stats of the generating process, identical for both splits.
    """
    if split not in SPLITS:
        raise DataError(f"split={split!r} is not one of {list(SPLITS)}; pass split='train' or split='test'")
    _check_positive(num_samples=num_samples, num_classes=num_classes, image_size=image_size, channels=channels)
    if num_classes < 2:
        raise DataError(f"synthetic data set: num_classes={num_classes} must be >= 2")
    templates = make_templates(num_classes, image_size, channels, seed)
    g = torch.Generator().manual_seed(10_007 * int(seed) + (2 if split == "train" else 3))
    labels = torch.arange(num_samples, dtype=torch.int64) % num_classes
    labels = labels[torch.randperm(num_samples, generator=g)]
    noise = torch.randn(num_samples, channels, image_size, image_size, generator=g) * NOISE_STD
    images = (templates[labels] + noise).clamp_(0.0, 1.0).contiguous()
    return ImageDataset(
        images=images,
        labels=labels,
        num_classes=num_classes,
        class_names=tuple(f"class_{i}" for i in range(num_classes)),
        name=f"synthetic/{split}",
        mean=tuple(float(m) for m in templates.mean(dim=(0, 2, 3))),
        std=tuple(float((v + NOISE_STD**2) ** 0.5) for v in templates.var(dim=(0, 2, 3))),
    )
