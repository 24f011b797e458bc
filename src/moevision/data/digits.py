"""scikit-learn's 8x8 handwritten digits as a small offline data set (stratified train/test split)."""

from __future__ import annotations

import numpy as np
import torch

from moevision.data.base import ImageDataset
from moevision.errors import DataError

SPLITS: tuple[str, ...] = ("train", "test")


def load_digits(split: str = "train", *, test_fraction: float = 0.2, seed: int = 0) -> ImageDataset:
    """The 1797 sklearn digits as float32 (N, 1, 8, 8) in [0, 1]; a stratified split by ``seed``."""
    if split not in SPLITS:
        raise DataError(f"split={split!r} is not one of {list(SPLITS)}; pass split='train' or split='test'")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction={test_fraction} must be in (0, 1); pass e.g. test_fraction=0.2")
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DataError(
            "the 'digits' data set needs scikit-learn; pip install scikit-learn (or pip install moevision[data])"
        ) from None
    bunch = _sk_load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    xs, ys = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    mean = float(x_tr.mean())
    std = float(x_tr.std())
    return ImageDataset(
        images=torch.from_numpy(np.ascontiguousarray(xs)),
        labels=torch.from_numpy(np.ascontiguousarray(ys)),
        num_classes=10,
        class_names=tuple(str(i) for i in range(10)),
        name=f"digits/{split}",
        mean=(mean,),
        std=(std,),
    )
