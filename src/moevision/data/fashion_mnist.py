"""Fashion-MNIST from IDX files: parsing, locating (apt package, env var, cache) and optional download."""

from __future__ import annotations

import gzip
import os
import struct
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch

from moevision.data.base import ImageDataset
from moevision.errors import DataError

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MEAN: tuple[float, ...] = (0.2860,)
STD: tuple[float, ...] = (0.3530,)

FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
ALL_FILES: tuple[str, ...] = tuple(name for pair in FILES.values() for name in pair)
SPLITS: tuple[str, ...] = tuple(FILES)

URL_BASE = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DOWNLOAD_TIMEOUT_S = 60.0
# Directories searched after data_dir and $MOEVISION_DATA; tests monkeypatch this.
SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
ENV_VAR = "MOEVISION_DATA"
HOW_TO_FIX = (
    'install it with "apt-get install dataset-fashion-mnist", or pass --data-dir DIR holding the 4 IDX files, '
    "or set MOEVISION_DATA"
)

_IDX_UINT8 = 0x08


def cache_dir() -> Path:
    """The per-user download cache: ``${XDG_CACHE_HOME:-~/.cache}/moevision/fashion-mnist``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moevision" / "fashion-mnist"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a uint8 IDX file (gzipped if it ends in .gz) into an array of the header's shape."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; pass a directory holding the Fashion-MNIST IDX files") from None
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: file is corrupt ({e}); delete it and re-download or reinstall it") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic {raw[:4].hex()}); check the path points at an IDX file")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != _IDX_UINT8:
        raise DataError(f"{path}: IDX dtype code 0x{dtype_code:02x} is not uint8 (0x08); use the original files")
    if ndim == 0:
        raise DataError(f"{path}: IDX header has 0 dimensions; the file is corrupt, re-download it")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header}); re-download the file")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    actual = len(raw) - header
    if actual != expected:
        kind = "truncated" if actual < expected else "has extra bytes"
        raise DataError(
            f"{path}: IDX payload {kind}: expected {expected} bytes for shape {dims}, got {actual}; re-download the file"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()  # writable


def _resolve(directory: Path, name: str) -> Path | None:
    """``name`` or ``name.gz`` inside ``directory``, whichever exists (the uncompressed one first)."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _missing(directory: Path) -> list[str]:
    return [name for name in ALL_FILES if _resolve(directory, name) is None]


def _download(dest: Path) -> None:
    """Download the 4 .gz files into ``dest`` atomically, verifying each parses as IDX."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ALL_FILES:
        if _resolve(dest, name) is not None:
            continue
        url = f"{URL_BASE}{name}.gz"
        target = dest / f"{name}.gz"
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part.gz", dir=dest)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
            read_idx(tmp)  # raises DataError on a truncated/corrupt download
            os.replace(tmp, target)
        except OSError as e:
            raise DataError(f"downloading {url} to {target} failed ({e}); {HOW_TO_FIX}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def find_fashion_mnist(data_dir: str | os.PathLike | None = None, *, download: bool = False) -> Path:
    """The directory holding all 4 Fashion-MNIST IDX files.

    Order: ``data_dir`` (an error if it lacks files), ``$MOEVISION_DATA`` and ``$MOEVISION_DATA/fashion-mnist``,
    ``SYSTEM_DIRS``, the user cache, then (only with ``download=True``) a download into the cache.
    """
    if data_dir is not None:
        d = Path(data_dir).expanduser()
        for cand in (d, d / "fashion-mnist"):
            if cand.is_dir() and not _missing(cand):
                return cand
        if not d.is_dir():
            raise DataError(f"--data-dir {d}: not a directory; {HOW_TO_FIX}")
        raise DataError(f"--data-dir {d}: missing {', '.join(_missing(d))} (or .gz); {HOW_TO_FIX}")

    searched: list[Path] = []
    env = os.environ.get(ENV_VAR)
    if env:
        searched += [Path(env).expanduser(), Path(env).expanduser() / "fashion-mnist"]
    searched += [Path(p) for p in SYSTEM_DIRS]
    cache = cache_dir()
    searched.append(cache)
    for cand in searched:
        if cand.is_dir() and not _missing(cand):
            return cand
    if download:
        _download(cache)
        if not _missing(cache):
            return cache
    where = ", ".join(str(p) for p in searched)
    hint = "" if download else " (or pass download=True / --download)"
    raise DataError(f"Fashion-MNIST not found (searched {where}); {HOW_TO_FIX}{hint}")


def load_fashion_mnist(
    split: str = "train", data_dir: str | os.PathLike | None = None, *, download: bool = False
) -> ImageDataset:
    """Fashion-MNIST ``split`` ("train": 60000, "test": 10000) as uint8 (N, 1, 28, 28) images."""
    if split not in FILES:
        raise DataError(f"split={split!r} is not one of {list(SPLITS)}; pass split='train' or split='test'")
    directory = find_fashion_mnist(data_dir, download=download)
    img_name, lbl_name = FILES[split]
    img_path, lbl_path = _resolve(directory, img_name), _resolve(directory, lbl_name)
    assert img_path is not None and lbl_path is not None  # find_fashion_mnist checked
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{img_path}: images have shape {images.shape}, expected (N, 28, 28); use the original files")
    if labels.ndim != 1:
        raise DataError(f"{lbl_path}: labels have shape {labels.shape}, expected (N,); use the original files")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{img_path} has {images.shape[0]} images but {lbl_path} has {labels.shape[0]} labels; "
            "the files come from different sets, re-download them"
        )
    if labels.size and int(labels.max()) >= len(CLASS_NAMES):
        raise DataError(f"{lbl_path}: label {int(labels.max())} >= {len(CLASS_NAMES)}; the file is corrupt")
    return ImageDataset(
        images=torch.from_numpy(images).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        num_classes=len(CLASS_NAMES),
        class_names=CLASS_NAMES,
        name=f"fashion_mnist/{split}",
        mean=MEAN,
        std=STD,
    )
