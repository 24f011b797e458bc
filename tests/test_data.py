"""Tests of moevision.data: IDX parsing, data set lookup, loaders, augmentations and resumable batching."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import moevision.data.fashion_mnist as fm
from moevision.data import (
    DATASETS,
    ImageDataset,
    build_augment,
    find_fashion_mnist,
    get_dataset,
    iterate_batches,
    load_digits,
    load_fashion_mnist,
    make_synthetic,
    read_idx,
)
from moevision.data.loader import BatchIterator, epoch_order, num_batches
from moevision.data.synthetic import make_templates
from moevision.data.transforms import normalize, random_crop, random_erasing, random_hflip
from moevision.errors import DataError

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------- helpers


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray) -> Path:
    data = idx_bytes(arr)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_fake_fmnist(directory: Path, n_train: int = 20, n_test: int = 10, fill: int = 0, gz: bool = True) -> Path:
    """A tiny 4-file Fashion-MNIST look-alike; ``fill`` marks which directory it came from."""
    directory.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = np.full((n, 28, 28), fill, dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(directory / f"{split}-images-idx3-ubyte{ext}", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte{ext}", labels)
    return directory


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No env var, an empty system dir list and a cache under tmp_path."""
    monkeypatch.delenv("MOEVISION_DATA", raising=False)
    system = tmp_path / "system"
    cache = tmp_path / "cache"
    monkeypatch.setattr(fm, "SYSTEM_DIRS", (system,))
    monkeypatch.setattr(fm, "cache_dir", lambda: cache)
    return {"system": system, "cache": cache, "root": tmp_path}


# ---------------------------------------------------------------- read_idx


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trip(tmp_path, suffix):
    arr = np.random.default_rng(0).integers(0, 256, size=(3, 5, 7), dtype=np.uint8)
    out = read_idx(write_idx(tmp_path / f"x-idx3-ubyte{suffix}", arr))
    assert out.dtype == np.uint8 and out.shape == (3, 5, 7)
    np.testing.assert_array_equal(out, arr)
    labels = np.arange(11, dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / f"y-idx1-ubyte{suffix}", labels)), labels)


def test_read_idx_truncated_names_path_and_sizes(tmp_path):
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((4, 5, 5)))[:-3])
    with pytest.raises(DataError) as e:
        read_idx(path)
    msg = str(e.value)
    assert str(path) in msg and "truncated" in msg and "100" in msg and "97" in msg


def test_read_idx_extra_bytes(tmp_path):
    path = tmp_path / "long-idx1-ubyte"
    path.write_bytes(idx_bytes(np.zeros(6)) + b"\x00\x01")
    with pytest.raises(DataError, match="extra bytes"):
        read_idx(path)


def test_read_idx_truncated_gz_payload(tmp_path):
    path = tmp_path / "short-idx1-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(idx_bytes(np.zeros(10))[:-1])
    with pytest.raises(DataError, match=str(path)):
        read_idx(path)


@pytest.mark.parametrize(
    "header",
    [b"\x01\x00\x08\x01", b"\x00\x00\x0d\x01", b"\x00\x00\x08\x00"],
    ids=["bad-magic", "float-dtype", "zero-ndim"],
)
def test_read_idx_bad_header(tmp_path, header):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(header + struct.pack(">I", 2) + b"\x00\x00")
    with pytest.raises(DataError, match=str(path)):
        read_idx(path)


def test_read_idx_truncated_header(tmp_path):
    path = tmp_path / "hdr-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">I", 5))
    with pytest.raises(DataError, match="truncated IDX header"):
        read_idx(path)
    empty = tmp_path / "empty-idx1-ubyte"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(empty)


def test_read_idx_corrupt_gzip(tmp_path):
    path = tmp_path / "broken-idx1-ubyte.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00garbage-not-deflate" * 4)
    with pytest.raises(DataError, match="corrupt"):
        read_idx(path)
    cut = tmp_path / "cut-idx1-ubyte.gz"
    write_idx(cut, np.arange(200, dtype=np.uint8))
    cut.write_bytes(cut.read_bytes()[:-12])  # gzip stream ends early -> EOFError inside gzip
    with pytest.raises(DataError, match="corrupt"):
        read_idx(cut)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "nope-idx1-ubyte")


# ---------------------------------------------------------------- find / load Fashion-MNIST


def test_find_order_data_dir_env_system_cache(isolated, monkeypatch):
    root = isolated["root"]
    given = make_fake_fmnist(root / "given", fill=1)
    env = make_fake_fmnist(root / "env" / "fashion-mnist", fill=2)  # found via $MOEVISION_DATA/fashion-mnist
    system = make_fake_fmnist(isolated["system"], fill=3)
    cache = make_fake_fmnist(isolated["cache"], fill=4, gz=False)
    monkeypatch.setenv("MOEVISION_DATA", str(root / "env"))

    assert find_fashion_mnist(given) == given
    assert find_fashion_mnist() == env
    monkeypatch.delenv("MOEVISION_DATA")
    assert find_fashion_mnist() == system
    monkeypatch.setattr(fm, "SYSTEM_DIRS", ())
    assert find_fashion_mnist() == cache
    # the loader really reads from the directory it found (raw, uncompressed names here)
    ds = load_fashion_mnist("test")
    assert len(ds) == 10 and int(ds.images.max()) == 4


def test_env_var_dir_itself(isolated, monkeypatch):
    env = make_fake_fmnist(isolated["root"] / "flat", fill=5)
    make_fake_fmnist(isolated["system"], fill=3)
    monkeypatch.setenv("MOEVISION_DATA", str(env))
    assert find_fashion_mnist() == env


def test_data_dir_missing_files_is_an_error(isolated):
    make_fake_fmnist(isolated["system"])  # must NOT be used as a silent fall-back
    partial = make_fake_fmnist(isolated["root"] / "partial")
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as e:
        find_fashion_mnist(partial)
    assert str(partial) in str(e.value) and "t10k-labels-idx1-ubyte" in str(e.value)
    assert "train-images" not in str(e.value)
    with pytest.raises(DataError, match="not a directory"):
        find_fashion_mnist(isolated["root"] / "does-not-exist")


def test_nothing_found_lists_places_and_apt_hint(isolated, monkeypatch):
    monkeypatch.setenv("MOEVISION_DATA", str(isolated["root"] / "envdir"))
    with pytest.raises(DataError) as e:
        find_fashion_mnist()
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg and "MOEVISION_DATA" in msg
    for place in (isolated["system"], isolated["cache"], isolated["root"] / "envdir"):
        assert str(place) in msg


def test_download_writes_verified_files_to_cache(isolated, monkeypatch):
    src = make_fake_fmnist(isolated["root"] / "server", fill=7)
    urls = []

    def fake_urlopen(url, timeout):
        assert timeout > 0
        urls.append(url)
        return open(src / url.rsplit("/", 1)[1], "rb")

    monkeypatch.setattr(fm.urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(DataError):
        find_fashion_mnist()  # download=False never downloads
    assert urls == []
    assert find_fashion_mnist(download=True) == isolated["cache"]
    assert len(urls) == 4 and all(u.startswith(fm.URL_BASE) and u.endswith(".gz") for u in urls)
    assert sorted(p.name for p in isolated["cache"].iterdir()) == sorted(f"{n}.gz" for n in fm.ALL_FILES)
    assert int(load_fashion_mnist("train", download=True).images.max()) == 7


def test_download_of_corrupt_file_leaves_no_partial(isolated, monkeypatch):
    bad = isolated["root"] / "bad.gz"
    bad.write_bytes(b"not gzip at all")
    monkeypatch.setattr(fm.urllib.request, "urlopen", lambda url, timeout: open(bad, "rb"))
    with pytest.raises(DataError):
        find_fashion_mnist(download=True)
    assert list(isolated["cache"].iterdir()) == []


def test_download_network_error_is_data_error(isolated, monkeypatch):
    def fail(url, timeout):
        raise fm.urllib.error.URLError("no route to host")

    monkeypatch.setattr(fm.urllib.request, "urlopen", fail)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        find_fashion_mnist(download=True)


def test_load_checks_split_and_consistency(isolated):
    d = make_fake_fmnist(isolated["root"] / "d")
    with pytest.raises(DataError, match="'val'"):
        load_fashion_mnist("val", d)
    write_idx(d / "t10k-labels-idx1-ubyte.gz", np.zeros(9, dtype=np.uint8))
    with pytest.raises(DataError, match="10 images but"):
        load_fashion_mnist("test", d)
    write_idx(d / "t10k-labels-idx1-ubyte.gz", np.full(10, 10, dtype=np.uint8))
    with pytest.raises(DataError, match="label 10"):
        load_fashion_mnist("test", d)
    write_idx(d / "train-images-idx3-ubyte.gz", np.zeros((20, 28, 27), dtype=np.uint8))
    with pytest.raises(DataError, match="28, 28"):
        load_fashion_mnist("train", d)


def test_load_fake_fmnist_dataset_fields(isolated):
    d = make_fake_fmnist(isolated["root"] / "d", fill=255)
    ds = get_dataset("fashion_mnist", "train", d)
    assert isinstance(ds, ImageDataset)
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (20, 1, 28, 28)
    assert ds.labels.dtype == torch.int64 and ds.image_shape == (1, 28, 28)
    assert ds.num_classes == 10 and ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    assert ds.mean == (0.2860,) and ds.std == (0.3530,)
    f = ds.float_images(torch.tensor([0, 3]))
    assert f.dtype == torch.float32 and f.shape == (2, 1, 28, 28) and torch.all(f == 1.0)


@pytest.mark.skipif(not REAL_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("MOEVISION_DATA", raising=False)
    train = load_fashion_mnist("train", REAL_DIR)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert torch.bincount(train.labels, minlength=10).tolist() == [6000] * 10
    x = train.float_images()
    assert abs(x.mean().item() - 0.2860) < 1e-3 and abs(x.std().item() - 0.3530) < 1e-3
    test = load_fashion_mnist("test", REAL_DIR)
    assert len(test) == 10000 and test.image_shape == (1, 28, 28)
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10


# ---------------------------------------------------------------- ImageDataset, digits, synthetic, registry


def test_subset_is_deterministic_and_valid():
    ds = make_synthetic("train", num_samples=100)
    a, b, c = ds.subset(30, seed=1), ds.subset(30, seed=1), ds.subset(30, seed=2)
    assert len(a) == 30 and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert a.name == ds.name and a.num_classes == ds.num_classes
    # each subset row is some row of the source with the matching label
    flat = ds.images.flatten(1)
    for img, lbl in zip(a.images.flatten(1), a.labels, strict=True):
        j = int((flat - img).abs().sum(1).argmin())
        assert ds.labels[j] == lbl
    assert len(ds.subset(10_000)) == 100


def test_dataset_validates_shapes():
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(torch.zeros(3, 1, 4, 4), torch.zeros(2), 2, ("a", "b"), "x", (0.0,), (1.0,))
    with pytest.raises(ValueError, match="class names"):
        ImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2), 3, ("a", "b"), "x", (0.0,), (1.0,))


def test_digits_split():
    train, test = load_digits("train"), load_digits("test")
    assert len(train) == 1437 and len(test) == 360
    assert train.images.dtype == torch.float32 and train.image_shape == (1, 8, 8)
    assert 0.0 <= float(train.images.min()) and float(train.images.max()) <= 1.0
    assert float(train.images.max()) == 1.0
    # stratified: every class in both splits with proportional counts
    counts = torch.bincount(test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    assert torch.equal(load_digits("test").images, test.images)  # deterministic
    with pytest.raises(DataError, match="'valid'"):
        load_digits("valid")


def test_digits_without_sklearn(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(DataError, match="pip install scikit-learn"):
        load_digits("train")


def test_synthetic_deterministic_and_splits_differ():
    a, b = make_synthetic("train", seed=3), make_synthetic("train", seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    test = make_synthetic("test", seed=3)
    assert not torch.equal(a.images, test.images)
    assert not torch.equal(a.images, make_synthetic("train", seed=4).images)
    assert a.images.shape == (512, 1, 16, 16) and a.images.dtype == torch.float32
    assert 0.0 <= float(a.images.min()) and float(a.images.max()) <= 1.0
    assert torch.bincount(a.labels).tolist() == [128] * 4
    rgb = make_synthetic("test", num_samples=30, num_classes=3, image_size=8, channels=3)
    assert rgb.image_shape == (3, 8, 8) and len(rgb.mean) == 3 and rgb.num_classes == 3


@pytest.mark.parametrize("num_classes,image_size,channels", [(4, 16, 1), (10, 8, 3)])
def test_synthetic_is_learnable(num_classes, image_size, channels):
    kw = dict(num_classes=num_classes, image_size=image_size, channels=channels, seed=0)
    train = make_synthetic("train", num_samples=400, **kw)
    test = make_synthetic("test", num_samples=400, **kw)
    # nearest class-mean estimated on train only, scored on test
    centroids = torch.stack([train.images[train.labels == k].mean(0) for k in range(num_classes)])
    d = torch.cdist(test.images.flatten(1), centroids.flatten(1))
    acc = (d.argmin(1) == test.labels).float().mean().item()
    assert acc > 0.9
    # and the fixed templates themselves classify the test split
    tmpl = make_templates(num_classes, image_size, channels, 0)
    acc_t = (torch.cdist(test.images.flatten(1), tmpl.flatten(1)).argmin(1) == test.labels).float().mean().item()
    assert acc_t > 0.9


def test_synthetic_rejects_bad_args():
    with pytest.raises(DataError, match="num_classes"):
        make_synthetic("train", num_classes=1)
    with pytest.raises(DataError, match="num_samples"):
        make_synthetic("train", num_samples=0)


def test_get_dataset_registry():
    assert DATASETS == ("fashion_mnist", "digits", "synthetic")
    ds = get_dataset("synthetic", "test", num_samples=16, num_classes=2)
    assert len(ds) == 16 and ds.num_classes == 2
    with pytest.raises(DataError) as e:
        get_dataset("cifar10", "train")
    assert "cifar10" in str(e.value) and all(n in str(e.value) for n in DATASETS)
    with pytest.raises(DataError, match="bogus"):
        get_dataset("synthetic", "train", bogus=1)


# ---------------------------------------------------------------- transforms


def batch(b=8, c=1, h=12, w=10, seed=0):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "fn",
    [
        lambda x, g: random_crop(x, 3, g),
        lambda x, g: random_crop(x, 2, g, padding_mode="reflect"),
        lambda x, g: random_hflip(x, 0.5, g),
        lambda x, g: random_erasing(x, 0.5, g),
        build_augment("flip_crop"),
        build_augment("flip_crop_erase"),
    ],
    ids=["crop", "crop-reflect", "flip", "erase", "flip_crop", "flip_crop_erase"],
)
def test_transforms_deterministic_shape_dtype(fn):
    x = batch(b=32, c=2)
    y1, y2, y3 = fn(x, gen(1)), fn(x, gen(1)), fn(x, gen(2))
    assert y1.shape == x.shape and y1.dtype == x.dtype
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    assert torch.equal(x, batch(b=32, c=2))  # input untouched


def test_crop_padding_zero_is_identity():
    x = batch()
    assert torch.equal(random_crop(x, 0, gen()), x)


def test_crop_is_a_shifted_window():
    x = batch(b=64, c=2, h=7, w=9)
    pad = 2
    y = random_crop(x, pad, gen(5))
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    offsets = []
    for i in range(x.shape[0]):
        found = [
            (r, c)
            for r in range(2 * pad + 1)
            for c in range(2 * pad + 1)
            if torch.equal(y[i], padded[i, :, r : r + 7, c : c + 9])
        ]
        assert len(found) == 1
        offsets.append(found[0])
    # row and column offsets both vary over the whole range across the batch
    assert {r for r, _ in offsets} == set(range(2 * pad + 1))
    assert {c for _, c in offsets} == set(range(2 * pad + 1))


def test_crop_equals_a_per_sample_slice_of_the_padded_batch():
    """The vectorised crop (one gather for the batch) against a per-sample slicing oracle."""
    x = torch.rand(16, 2, 28, 28)
    y = random_crop(x, 4, gen(3))
    offsets = torch.randint(0, 9, (2, 16), generator=gen(3))  # the same draw random_crop makes
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(16):
        r, c = int(offsets[0, i]), int(offsets[1, i])
        assert torch.equal(y[i], padded[i, :, r:r + 28, c:c + 28])


def test_flip_p1_and_p0():
    x = batch()
    assert torch.equal(random_hflip(x, 1.0, gen()), torch.flip(x, dims=[-1]))
    assert torch.equal(random_hflip(x, 0.0, gen()), x)
    y = random_hflip(batch(b=200), 0.5, gen())
    flipped = sum(not torch.equal(y[i], batch(b=200)[i]) for i in range(200))
    assert 60 < flipped < 140


def test_erasing_p0_identity_and_p1_erases_area():
    x = batch(b=50, h=20, w=20) + 0.5  # strictly positive, so zeros mark erased pixels
    assert torch.equal(random_erasing(x, 0.0, gen()), x)
    y = random_erasing(x, 1.0, gen(), scale=(0.05, 0.1))
    frac = (y == 0).flatten(1).float().mean(1)
    assert torch.all(frac > 0) and torch.all(frac <= 0.2)


def test_normalize():
    x = torch.ones(2, 3, 4, 4)
    y = normalize(x, (0.5, 0.0, 1.0), (0.5, 2.0, 1.0))
    assert torch.allclose(y[:, 0], torch.ones(2, 4, 4)) and torch.allclose(y[:, 1], torch.full((2, 4, 4), 0.5))
    assert torch.allclose(y[:, 2], torch.zeros(2, 4, 4))


def test_build_augment_names():
    x = batch()
    assert torch.equal(build_augment("none")(x, gen()), x)
    with pytest.raises(ValueError, match="'autoaugment'"):
        build_augment("autoaugment")


# ---------------------------------------------------------------- loader


def test_num_batches():
    assert num_batches(10, 3) == 4 and num_batches(10, 3, drop_last=True) == 3
    assert num_batches(9, 3) == 3 == num_batches(9, 3, drop_last=True)
    with pytest.raises(ValueError):
        num_batches(10, 0)


def test_epoch_order_depends_only_on_seed_and_epoch():
    a = epoch_order(100, shuffle=True, seed=1, epoch=2)
    assert torch.equal(a, epoch_order(100, shuffle=True, seed=1, epoch=2))
    assert sorted(a.tolist()) == list(range(100))
    assert not torch.equal(a, epoch_order(100, shuffle=True, seed=1, epoch=3))
    assert not torch.equal(a, epoch_order(100, shuffle=True, seed=2, epoch=2))
    torch.manual_seed(123)  # global RNG state must not matter
    assert torch.equal(a, epoch_order(100, shuffle=True, seed=1, epoch=2))
    assert torch.equal(epoch_order(5, shuffle=False, seed=1, epoch=2), torch.arange(5))


def test_iterate_batches_covers_epoch():
    ds = make_synthetic("train", num_samples=50)
    batches = list(iterate_batches(ds, 16, shuffle=True, seed=0, epoch=0))
    assert [len(y) for _, y in batches] == [16, 16, 16, 2]
    x0, _ = batches[0]
    assert x0.dtype == torch.float32 and x0.shape == (16, 1, 16, 16)
    labels = torch.cat([y for _, y in batches])
    assert torch.equal(torch.sort(labels).values, torch.sort(ds.labels).values)
    dropped = list(iterate_batches(ds, 16, shuffle=True, seed=0, epoch=0, drop_last=True))
    assert len(dropped) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(dropped, batches, strict=False))
    plain = list(iterate_batches(ds, 50, shuffle=False))
    assert torch.equal(plain[0][0], ds.images) and torch.equal(plain[0][1], ds.labels)


def test_iterate_batches_uint8_scaled():
    ds = ImageDataset(
        torch.full((4, 1, 2, 2), 255, dtype=torch.uint8), torch.arange(4) % 2, 2, ("a", "b"), "u8", (0.5,), (0.5,)
    )
    (x, _), = list(iterate_batches(ds, 4, shuffle=False))
    assert x.dtype == torch.float32 and torch.all(x == 1.0)


@pytest.mark.parametrize("k", [0, 1, 3, 4])
def test_start_batch_yields_tail_of_epoch(k):
    ds = make_synthetic("train", num_samples=50)
    full = list(iterate_batches(ds, 12, shuffle=True, seed=7, epoch=5))
    tail = list(iterate_batches(ds, 12, shuffle=True, seed=7, epoch=5, start_batch=k))
    assert len(tail) == len(full) - k
    for (xa, ya), (xb, yb) in zip(full[k:], tail, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_start_batch_out_of_range():
    ds = make_synthetic("train", num_samples=50)
    with pytest.raises(ValueError, match="start_batch"):
        list(iterate_batches(ds, 12, start_batch=6))


def test_batch_iterator_len_and_reiterable():
    ds = make_synthetic("train", num_samples=50)
    it = BatchIterator(ds, 12, seed=1, epoch=0, start_batch=2)
    assert len(it) == 3
    first, second = list(it), list(it)
    assert len(first) == 3 and all(torch.equal(a[1], b[1]) for a, b in zip(first, second, strict=True))


def test_flip_augment_flips_whole_images_per_sample():
    x = torch.rand(64, 1, 8, 8)
    y = build_augment("flip")(x, torch.Generator().manual_seed(0))
    flipped = [bool(torch.equal(y[i], x[i].flip(-1))) for i in range(64)]
    kept = [bool(torch.equal(y[i], x[i])) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54  # p = 0.5
