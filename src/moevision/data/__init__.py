"""Data sets (Fashion-MNIST, sklearn digits, synthetic), batch augmentations and resumable batching."""

from __future__ import annotations

import inspect
import os
from typing import Any

from moevision.data.base import ImageDataset
from moevision.data.digits import load_digits
from moevision.data.fashion_mnist import CLASS_NAMES, find_fashion_mnist, load_fashion_mnist, read_idx
from moevision.data.loader import BatchIterator, epoch_order, iterate_batches, num_batches
from moevision.data.synthetic import make_synthetic
from moevision.data.transforms import (
    AUGMENTS,
    Augment,
    build_augment,
    normalize,
    random_crop,
    random_erasing,
    random_hflip,
)
from moevision.errors import DataError

DATASETS: tuple[str, ...] = ("fashion_mnist", "digits", "synthetic")


def get_dataset(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    **kwargs: Any,
) -> ImageDataset:
    """Load data set ``name`` (one of ``DATASETS``); extra kwargs go to its loader."""
    key = name.replace("-", "_").lower()
    if key == "fashion_mnist":
        if kwargs:
            raise DataError(f"fashion_mnist takes no options, got {sorted(kwargs)}; remove them")
        return load_fashion_mnist(split, data_dir, download=download)
    loaders = {"digits": load_digits, "synthetic": make_synthetic}
    if key in loaders:
        loader = loaders[key]
        allowed = [p for p in inspect.signature(loader).parameters if p != "split"]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise DataError(f"{key}: unknown option(s) {unknown}; valid options are {allowed}")
        return loader(split, **kwargs)
    raise DataError(f"unknown data set {name!r}; choose one of {list(DATASETS)}")


__all__ = [
    "AUGMENTS",
    "CLASS_NAMES",
    "DATASETS",
    "Augment",
    "BatchIterator",
    "DataError",
    "ImageDataset",
    "build_augment",
    "epoch_order",
    "find_fashion_mnist",
    "get_dataset",
    "iterate_batches",
    "load_digits",
    "load_fashion_mnist",
    "make_synthetic",
    "normalize",
    "num_batches",
    "random_crop",
    "random_erasing",
    "random_hflip",
    "read_idx",
]
