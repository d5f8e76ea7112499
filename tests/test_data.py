"""Data loaders (tucker_manifold.data): sklearn digits, packaged MNIST, IDX and CIFAR-10 files.

The IDX and CIFAR tests write small files in the exact on-disk formats into tmp_path, so they need
no real data and check that values round-trip bit for bit."""
import gzip
import pickle
import struct
import sys
import urllib.request

import numpy as np
import pytest
import torch

from tucker_manifold import data as D
from tucker_manifold.data import (
    DATASET_NAMES,
    DataBundle,
    MissingDataDependencyError,
    load_cifar10_arrays,
    load_dataset,
    load_mnist_idx_arrays,
    make_loaders,
    read_idx,
)


def _check_bundle(b: DataBundle, n_train: int, n_test: int, c: int, s: int) -> None:
    assert b.x_train.shape == (n_train, c, s, s) and b.x_test.shape == (n_test, c, s, s)
    assert b.y_train.shape == (n_train,) and b.y_test.shape == (n_test,)
    assert b.x_train.dtype == torch.float32 and b.x_test.dtype == torch.float32
    assert b.y_train.dtype == torch.int64 and b.y_test.dtype == torch.int64
    assert (b.in_channels, b.image_size, b.num_classes) == (c, s, 10)
    assert b.n_train == n_train and b.n_test == n_test
    for y in (b.y_train, b.y_test):
        assert int(y.min()) >= 0 and int(y.max()) <= 9
    # Standardized per channel with the training statistics.
    mean = b.x_train.mean(dim=(0, 2, 3))
    std = b.x_train.std(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(mean, torch.zeros(c), atol=1e-4)
    assert torch.allclose(std, torch.ones(c), atol=1e-4)
    assert len(b.mean) == c and len(b.std) == c


# ------------------------------------------------------------------------------------ digits


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    return load_dataset("digits")


def test_digits_shapes_and_normalization(digits):
    _check_bundle(digits, 1437, 360, 1, 8)
    assert digits.name == "digits"
    # Stratified split: every class in both halves.
    assert set(digits.y_train.tolist()) == set(range(10)) == set(digits.y_test.tolist())
    # Test images use the training statistics, so they are only approximately standardized.
    assert abs(float(digits.x_test.mean())) < 0.1


def test_digits_split_is_fixed_and_reproducible(digits):
    again = load_dataset("digits", seed=123)  # the seed only drives subsets, not the split
    for a, b in [(digits.x_train, again.x_train), (digits.y_train, again.y_train),
                 (digits.x_test, again.x_test), (digits.y_test, again.y_test)]:
        assert torch.equal(a, b)


def test_digits_pixel_scale(digits):
    # Undo the standardization: pixels must be k/16 for integers k in 0..16.
    raw = digits.x_train * digits.std[0] + digits.mean[0]
    k = raw * 16
    assert torch.allclose(k, k.round(), atol=1e-3)
    assert float(k.min()) > -1e-3 and float(k.max()) < 16 + 1e-3


def test_digits_resize():
    b = load_dataset("digits", size=28)
    _check_bundle(b, 1437, 360, 1, 28)
    small = load_dataset("digits", size=4)  # shrinking (antialiased path)
    _check_bundle(small, 1437, 360, 1, 4)


def test_digits_subset_seeded():
    a = load_dataset("digits", subset=500, seed=1)
    b = load_dataset("digits", subset=500, seed=1)
    c = load_dataset("digits", subset=500, seed=2)
    # Test subset: at least 1000 images or all of them -> all 360 here.
    _check_bundle(a, 500, 360, 1, 8)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.y_train, c.y_train)
    # A subset larger than the training set keeps everything.
    assert load_dataset("digits", subset=10**6).n_train == 1437


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_subset_and_size(bad):
    with pytest.raises(ValueError, match="subset"):
        load_dataset("digits", subset=bad)
    with pytest.raises(ValueError, match="size"):
        load_dataset("digits", size=bad)


def test_unknown_name():
    with pytest.raises(ValueError, match="name") as exc:
        load_dataset("imagenet")
    for n in DATASET_NAMES:
        assert n in str(exc.value)


# ------------------------------------------------------------------------------------ MNIST


@pytest.fixture(scope="module")
def mnist():
    pytest.importorskip("pureml")
    pytest.importorskip("zarr")
    return load_dataset("mnist")


def test_mnist_full(mnist):
    _check_bundle(mnist, 60000, 10000, 1, 28)
    assert set(mnist.y_train.tolist()) == set(range(10)) == set(mnist.y_test.tolist())
    # The well-known MNIST pixel statistics (0.1307, 0.3081).
    assert mnist.mean[0] == pytest.approx(0.1307, abs=1e-3)
    assert mnist.std[0] == pytest.approx(0.3081, abs=1e-3)
    assert mnist.y_train[:5].tolist() == [5, 0, 4, 1, 9]  # the canonical first training labels


def test_mnist_subset():
    pytest.importorskip("pureml")
    pytest.importorskip("zarr")
    a = load_dataset("mnist", subset=600, seed=3)
    _check_bundle(a, 600, 1000, 1, 28)  # proportional would be 100 -> floor of 1000
    b = load_dataset("mnist", subset=600, seed=3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    c = load_dataset("mnist", subset=600, seed=4)
    assert not torch.equal(a.y_train, c.y_train)


def test_test_subset_rule():
    # Proportional test subset, at least 1000 images, at most the whole test set.
    assert D._test_subset_size(30000, 60000, 10000) == 5000
    assert D._test_subset_size(600, 60000, 10000) == 1000
    assert D._test_subset_size(500, 1437, 360) == 360
    assert D._test_subset_size(10**6, 60000, 10000) == 10000


def test_missing_data_dependency(monkeypatch):
    monkeypatch.setitem(sys.modules, "zarr", None)  # makes `import zarr` fail
    with pytest.raises(ImportError, match=r'pip install "tucker-manifold\[data\]"') as exc:
        load_dataset("mnist")
    assert isinstance(exc.value, MissingDataDependencyError)


# ------------------------------------------------------------------------------------ IDX


def _idx_images(x: np.ndarray) -> bytes:
    n, h, w = x.shape
    return struct.pack(">iiii", 2051, n, h, w) + x.astype(np.uint8).tobytes()


def _idx_labels(y: np.ndarray) -> bytes:
    return struct.pack(">ii", 2049, len(y)) + y.astype(np.uint8).tobytes()


def _write(path, payload: bytes, gz: bool) -> None:
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _fake_mnist(rng, n_train=50, n_test=20, h=28, w=28):
    return (rng.integers(0, 256, (n_train, h, w), dtype=np.uint8), rng.integers(0, 10, n_train),
            rng.integers(0, 256, (n_test, h, w), dtype=np.uint8), rng.integers(0, 10, n_test))


def _write_mnist(folder, arrays, gz: bool) -> None:
    x_tr, y_tr, x_te, y_te = arrays
    _write(folder / "train-images-idx3-ubyte", _idx_images(x_tr), gz)
    _write(folder / "train-labels-idx1-ubyte", _idx_labels(y_tr), gz)
    # Mix raw and gzip files: the test split uses the other form.
    _write(folder / "t10k-images-idx3-ubyte", _idx_images(x_te), not gz)
    _write(folder / "t10k-labels-idx1-ubyte", _idx_labels(y_te), not gz)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    arrays = _fake_mnist(np.random.default_rng(0))
    _write_mnist(tmp_path, arrays, gz)
    got = load_mnist_idx_arrays(tmp_path)
    for a, b in zip(arrays, got):
        np.testing.assert_array_equal(a, b)
    assert got[0].dtype == np.uint8 and got[1].dtype == np.int64

    b = load_dataset("mnist-idx", root=tmp_path)
    _check_bundle(b, 50, 20, 1, 28)
    assert b.y_train.tolist() == arrays[1].tolist()
    # Standardization is an exact affine map of x / 255.
    raw = b.x_test[:, 0] * b.std[0] + b.mean[0]
    assert torch.allclose(raw, torch.from_numpy(arrays[2]).float() / 255, atol=1e-5)


def test_idx_torchvision_layout(tmp_path):
    arrays = _fake_mnist(np.random.default_rng(1), 8, 4)
    raw_dir = tmp_path / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    _write_mnist(raw_dir, arrays, gz=True)
    got = load_mnist_idx_arrays(tmp_path)
    np.testing.assert_array_equal(got[2], arrays[2])


def test_read_idx_single_file(tmp_path):
    y = np.arange(7, dtype=np.uint8)
    p = tmp_path / "labels"
    p.write_bytes(_idx_labels(y))
    np.testing.assert_array_equal(read_idx(p, D.IDX_LABELS_MAGIC), y)
    np.testing.assert_array_equal(read_idx(p), y)


def test_idx_bad_magic(tmp_path):
    x = np.zeros((3, 4, 4), np.uint8)
    p = tmp_path / "imgs"
    p.write_bytes(struct.pack(">iiii", 2049, 3, 4, 4) + x.tobytes())  # label magic on an image file
    with pytest.raises(ValueError, match="magic"):
        read_idx(p, D.IDX_IMAGES_MAGIC)
    p.write_bytes(struct.pack(">iiii", 0x12345678, 3, 4, 4) + x.tobytes())  # not IDX at all
    with pytest.raises(ValueError, match="magic"):
        read_idx(p)
    # Through the folder loader too.
    arrays = _fake_mnist(np.random.default_rng(2), 5, 5)
    _write_mnist(tmp_path, arrays, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2051, 5) + bytes(5))
    with pytest.raises(ValueError, match="magic"):
        load_mnist_idx_arrays(tmp_path)


def test_idx_truncated(tmp_path):
    x = np.ones((3, 4, 4), np.uint8)
    p = tmp_path / "imgs"
    p.write_bytes(_idx_images(x)[:-1])  # one data byte short
    with pytest.raises(ValueError, match="truncated"):
        read_idx(p)
    p.write_bytes(struct.pack(">i", 2051) + b"\x00\x00")  # header cut inside the dims
    with pytest.raises(ValueError, match="truncated"):
        read_idx(p)
    p.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="truncated"):
        read_idx(p)
    gz = tmp_path / "imgs.gz"
    gz.write_bytes(gzip.compress(_idx_images(x))[:-12])  # truncated gzip stream
    with pytest.raises(ValueError):
        read_idx(gz)


def test_idx_count_mismatch(tmp_path):
    x_tr, y_tr, x_te, y_te = _fake_mnist(np.random.default_rng(3), 6, 4)
    _write_mnist(tmp_path, (x_tr, y_tr[:5], x_te, y_te), gz=False)
    with pytest.raises(ValueError, match="6 images but 5 labels"):
        load_mnist_idx_arrays(tmp_path)


# ------------------------------------------------------------------------------------ CIFAR-10


def _write_cifar(folder, rng, per_batch=6, n_test=5):
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, f)
        batches[name] = (data, labels)
    return batches


@pytest.mark.parametrize("nested", [False, True])
def test_cifar_roundtrip(tmp_path, nested):
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    batches = _write_cifar(folder, np.random.default_rng(0))
    x_tr, y_tr, x_te, y_te = load_cifar10_arrays(tmp_path)
    assert x_tr.shape == (30, 3, 32, 32) and x_te.shape == (5, 3, 32, 32)
    assert x_tr.dtype == np.uint8 and y_tr.dtype == np.int64
    data1, labels1 = batches["data_batch_1"]
    data5, labels5 = batches["data_batch_5"]
    # Row layout of the real format: 1024 red values, then 1024 green, then 1024 blue (row-major).
    for ch in range(3):
        np.testing.assert_array_equal(x_tr[0, ch], data1[0, 1024 * ch: 1024 * (ch + 1)].reshape(32, 32))
    assert x_tr[0, 1, 0, 0] == data1[0, 1024] and x_tr[0, 2, 31, 31] == data1[0, 3071]
    np.testing.assert_array_equal(x_tr[-6:].reshape(6, -1), data5)  # batches concatenated in order
    assert y_tr.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert y_te.tolist() == batches["test_batch"][1]
    np.testing.assert_array_equal(x_te.reshape(5, -1), batches["test_batch"][0])

    b = load_dataset("cifar10", root=str(tmp_path))
    _check_bundle(b, 30, 5, 3, 32)
    assert b.name == "cifar10"
    raw = b.x_train[0, 2] * b.std[2] + b.mean[2]
    assert torch.allclose(raw, torch.from_numpy(x_tr[0, 2]).float() / 255, atol=1e-5)


def test_cifar_bad_batch(tmp_path):
    _write_cifar(tmp_path, np.random.default_rng(1))
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="3072"):
        load_cifar10_arrays(tmp_path)


def test_file_sets_need_root_and_never_download(tmp_path, monkeypatch):
    for name in ("mnist-idx", "cifar10"):
        with pytest.raises(ValueError, match="root"):
            load_dataset(name)

    def no_network(*args, **kwargs):
        raise AssertionError("network access without download=True")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_dataset("mnist-idx", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_dataset("cifar10", root=tmp_path)


# ------------------------------------------------------------------------------------ loaders


def test_make_loaders(digits):
    train, test = make_loaders(digits, batch_size=100, seed=0)
    x, y = next(iter(train))
    assert x.shape == (100, 1, 8, 8) and y.shape == (100,) and y.dtype == torch.int64
    assert len(train) == 15 and len(test) == 4  # ceil(1437/100), ceil(360/100)
    # Seeded shuffling: same seed -> same order, other seed -> another order.
    again, _ = make_loaders(digits, batch_size=100, seed=0)
    other, _ = make_loaders(digits, batch_size=100, seed=1)
    assert torch.equal(next(iter(again))[1], y)
    assert not torch.equal(next(iter(other))[1], y)
    # Every training image once per epoch.
    assert sorted(torch.cat([b[1] for b in train]).tolist()) == sorted(digits.y_train.tolist())
    # The test loader keeps the order.
    assert torch.equal(torch.cat([b[0] for b in test]), digits.x_test)
    with pytest.raises(ValueError):
        make_loaders(digits, batch_size=0, seed=0)
