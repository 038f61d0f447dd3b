"""Tests for sim.data: real Fashion-MNIST, tiny fake torchvision-layout folders, partitioning."""

from __future__ import annotations

import gzip
import pickle
import shutil
import struct
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from sim.data import (
    DATASETS,
    FASHION_MNIST_DEFAULT_ROOT,
    PARTITIONS,
    DataError,
    load_dataset,
    partition_indices,
    split_holdout,
    split_test,
    to_tensor,
)

HAVE_FASHION = Path(FASHION_MNIST_DEFAULT_ROOT, "train-images-idx3-ubyte.gz").is_file()
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason="dataset-fashion-mnist not installed")


@pytest.fixture(scope="module")
def fashion_labels() -> np.ndarray:
    if not HAVE_FASHION:
        pytest.skip("dataset-fashion-mnist not installed")
    return load_dataset("fashion-mnist").train_y


@pytest.fixture(scope="module")
def some_labels(fashion_labels: np.ndarray) -> np.ndarray:
    """A fifth of Fashion-MNIST (~1200 per class): pathological partitioning costs ~2 s per
    60k samples (datasets hashes every numpy index it is given), which adds up over tests."""
    return fashion_labels[:12000]


# ------------------------------------------------------------------ helpers for fake data


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 IDX file (gzipped when the name ends in .gz)."""
    raw = bytes((0, 0, 8, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += np.ascontiguousarray(array, np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def make_mnist(root: Path, folder: str, n_train: int = 30, n_test: int = 10,
               gz: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for i, (stem, array) in enumerate(arrays.items()):
        # Mix plain and gzipped files: torchvision keeps both forms around.
        write_idx(raw / (stem + (".gz" if gz or i % 2 else "")), array)
    return arrays


def write_pickle(path: Path, obj: dict) -> None:
    with path.open("wb") as file:
        pickle.dump(obj, file)


def make_cifar10(root: Path, per_batch: int = 4) -> tuple[np.ndarray, list[int]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    datas, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        batch_labels = rng.integers(0, 10, per_batch).tolist()
        write_pickle(folder / name, {"batch_label": name, "data": data, "labels": batch_labels})
        datas.append(data)
        labels += batch_labels
    return np.concatenate(datas), labels


# --------------------------------------------------------------------------- loading


@needs_fashion
def test_fashion_mnist_loads_from_debian_package() -> None:
    data = load_dataset("fashion-mnist")
    assert data.train_x.shape == (60000, 28, 28, 1) and data.train_x.dtype == np.uint8
    assert data.test_x.shape == (10000, 28, 28, 1) and data.test_x.dtype == np.uint8
    assert data.train_y.dtype == np.int64 and data.test_y.shape == (10000,)
    assert data.num_classes == 10 and data.shape == (1, 28, 28)
    assert np.bincount(data.train_y).tolist() == [6000] * 10
    assert np.bincount(data.test_y).tolist() == [1000] * 10
    assert len(data.mean) == len(data.std) == 1
    assert 0.27 < data.mean[0] < 0.30 and 0.34 < data.std[0] < 0.37  # known ~0.286 / ~0.353
    assert load_dataset("fashion-mnist") is data  # cached in-process
    assert not data.train_x.flags.writeable  # the cached copy cannot be corrupted


def test_unknown_dataset_lists_the_known_ones() -> None:
    with pytest.raises(DataError, match="cifar100") as info:
        load_dataset("imagenet")
    assert all(name in str(info.value) for name in DATASETS)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100", "svhn"])
def test_datasets_other_than_fashion_need_a_data_root(name: str) -> None:
    with pytest.raises(DataError, match="--data-root"):
        load_dataset(name)


def test_fake_mnist_in_torchvision_layout(tmp_path: Path) -> None:
    arrays = make_mnist(tmp_path, "MNIST")
    data = load_dataset("mnist", str(tmp_path))
    assert data.train_x.shape == (30, 28, 28, 1) and data.test_x.shape == (10, 28, 28, 1)
    assert np.array_equal(data.train_x[..., 0], arrays["train-images-idx3-ubyte"])
    assert np.array_equal(data.test_y, arrays["t10k-labels-idx1-ubyte"])
    assert data.mean[0] == pytest.approx(arrays["train-images-idx3-ubyte"].mean() / 255)
    assert data.std[0] == pytest.approx(arrays["train-images-idx3-ubyte"].std() / 255)


def test_fashion_mnist_with_data_root_uses_its_own_folder(tmp_path: Path) -> None:
    make_mnist(tmp_path, "FashionMNIST", gz=True)
    assert load_dataset("fashion-mnist", str(tmp_path)).train_x.shape == (30, 28, 28, 1)


def test_missing_mnist_folder_names_expected_files(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("mnist", str(tmp_path))
    message = str(info.value)
    assert "MNIST/raw/" in message and "train-images-idx3-ubyte" in message
    assert str(tmp_path) in message and "\n" not in message


@needs_fashion
def test_truncated_idx_gz_names_the_file(tmp_path: Path) -> None:
    make_mnist(tmp_path, "FashionMNIST", gz=True)
    real = Path(FASHION_MNIST_DEFAULT_ROOT, "train-labels-idx1-ubyte.gz").read_bytes()
    target = tmp_path / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    target.write_bytes(real[: len(real) // 2])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz") as info:
        load_dataset("fashion-mnist", str(tmp_path))
    assert "\n" not in str(info.value)


def test_idx_with_wrong_sizes_or_magic_is_rejected(tmp_path: Path) -> None:
    make_mnist(tmp_path, "MNIST", gz=True)
    path = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-5]))  # a valid gzip of a short IDX payload
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz.*truncated"):
        load_dataset("mnist", str(tmp_path))
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + raw[4:]))  # says 1-D
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz.*magic"):
        load_dataset("mnist", str(tmp_path))


def test_fake_cifar10_pickles(tmp_path: Path) -> None:
    data_rows, labels = make_cifar10(tmp_path)
    data = load_dataset("cifar10", str(tmp_path))
    assert data.train_x.shape == (20, 32, 32, 3) and data.test_x.shape == (4, 32, 32, 3)
    assert data.shape == (3, 32, 32) and data.num_classes == 10
    assert data.train_y.tolist() == labels[:20] and data.test_y.tolist() == labels[20:]
    # Rows are channel-planar: R plane, then G, then B, each 32x32 row-major.
    assert data.train_x[0, 0, 1, 0] == data_rows[0, 1]
    assert data.train_x[0, 0, 0, 1] == data_rows[0, 1024]
    assert data.train_x[5, 2, 3, 2] == data_rows[5, 2048 + 2 * 32 + 3]
    assert len(data.mean) == 3 and all(0.4 < m < 0.6 for m in data.mean)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_cifar_batches_load_through_the_restricted_unpickler(tmp_path: Path, protocol: int) -> None:
    """The batch layouts numpy writes at every pickle protocol still load (the official files are
    protocol 2 and name ``numpy.core.multiarray``, numpy 1's module path), and nothing else does."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(4)
    rows = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    batch = {"batch_label": "training batch 1 of 5", "data": rows, "labels": [3, 7],
             "filenames": ["a.png", "b.png"]}
    raw = pickle.dumps(batch, protocol=protocol)
    if protocol <= 3:  # GLOBAL names are newline-ended text there (from 4 on, length-prefixed)
        raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(raw)
    data = load_dataset("cifar10", str(tmp_path))
    assert data.train_y.tolist() == [3, 7] * 5
    assert data.train_x[1, 0, 1, 0] == rows[1, 1]
    bad = tmp_path / "bad"  # another root: loaded datasets are cached per (name, root)
    shutil.copytree(folder, bad / folder.name)
    objects = np.array([None] * 3072, dtype=object).reshape(1, -1)  # an array that needs no global
    (bad / folder.name / "test_batch").write_bytes(pickle.dumps({"data": objects, "labels": [0]}, protocol=protocol))
    with pytest.raises(DataError, match="test_batch: cannot read CIFAR batch .refused: a numpy array of dtype object"):
        load_dataset("cifar10", str(bad))


def test_fake_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for name, n in (("train", 6), ("test", 3)):
        write_pickle(folder / name, {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                     "fine_labels": [99] * n, "coarse_labels": [1] * n})
    data = load_dataset("cifar100", str(tmp_path))
    assert data.num_classes == 100 and data.train_x.shape == (6, 32, 32, 3)
    assert data.train_y.tolist() == [99] * 6


def test_missing_cifar_batch_names_expected_files(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", str(tmp_path))
    message = str(info.value)
    assert "cifar-10-batches-py/{data_batch_1..5,test_batch}" in message
    assert str(tmp_path) in message and "torchvision layout" in message
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", str(tmp_path))


def test_corrupt_cifar_pickle_names_the_file(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", str(tmp_path))


def test_missing_svhn_names_expected_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train_32x32.mat"):
        load_dataset("svhn", str(tmp_path))


def test_fake_svhn_mat(tmp_path: Path) -> None:
    import scipy.io as scipy_io
    rng = np.random.default_rng(4)
    for name, n in (("train_32x32.mat", 5), ("test_32x32.mat", 2)):
        scipy_io.savemat(tmp_path / name, {
            "X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
            "y": np.array([[10], [1], [2], [10], [9]][:n], dtype=np.uint8)})
    data = load_dataset("svhn", str(tmp_path))
    assert data.train_x.shape == (5, 32, 32, 3) and data.train_y.tolist() == [0, 1, 2, 0, 9]


def test_to_tensor_layout_and_range() -> None:
    x = np.random.default_rng(5).integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    x[0, 1, 2, 1] = 255
    x.flags.writeable = False  # like the cached arrays
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable array" warning from torch
        t = to_tensor(x)
    assert t.shape == (4, 3, 5, 6) and t.dtype == torch.float32 and t.is_contiguous()
    assert t[0, 1, 1, 2].item() == 1.0 and 0.0 <= t.min().item() and t.max().item() <= 1.0
    assert torch.allclose(t[2, 0], torch.from_numpy(x[2, :, :, 0].astype(np.float32)) / 255)


# ---------------------------------------------------------------------- partitioning


def assert_disjoint(parts: list[np.ndarray], n: int, *, complete: bool) -> None:
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined), "partitions overlap"
    assert joined.min() >= 0 and joined.max() < n
    if complete:
        assert len(joined) == n
    for part in parts:
        assert part.dtype == np.int64 and len(part) > 0 and np.all(np.diff(part) > 0)


@pytest.mark.parametrize("method", PARTITIONS)
def test_partitions_are_disjoint_and_deterministic(some_labels: np.ndarray, method: str) -> None:
    parts = partition_indices(some_labels, 20, method, seed=0)
    assert len(parts) == 20
    assert_disjoint(parts, len(some_labels), complete=method in ("iid", "dirichlet"))
    again = partition_indices(some_labels, 20, method, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition_indices(some_labels, 20, method, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


@pytest.mark.parametrize("classes", [1, 2, 3])
def test_pathological_limits_classes_per_partition(some_labels: np.ndarray,
                                                   classes: int) -> None:
    parts = partition_indices(some_labels, 30, "pathological", seed=3,
                              classes_per_partition=classes)
    assert max(len(np.unique(some_labels[p])) for p in parts) <= classes
    # at least as many partitions as classes: every class is used by someone
    assert len(np.unique(some_labels[np.concatenate(parts)])) == 10


def test_shards_hand_out_equal_shards(fashion_labels: np.ndarray) -> None:
    parts = partition_indices(fashion_labels, 50, "shards", seed=0, shards_per_partition=3)
    assert {len(p) for p in parts} == {3 * (60000 // 150)}
    assert max(len(np.unique(fashion_labels[p])) for p in parts) <= 3 * 2


def mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    entropies = []
    for part in parts:
        freq = np.bincount(labels[part], minlength=10) / len(part)
        freq = freq[freq > 0]
        entropies.append(float(-(freq * np.log(freq)).sum()))
    return float(np.mean(entropies))


def test_small_alpha_dirichlet_is_more_skewed_than_iid(fashion_labels: np.ndarray) -> None:
    iid = mean_label_entropy(fashion_labels, partition_indices(fashion_labels, 20, "iid", seed=0))
    mild = mean_label_entropy(fashion_labels, partition_indices(
        fashion_labels, 20, "dirichlet", seed=0, alpha=10.0))
    skewed = mean_label_entropy(fashion_labels, partition_indices(
        fashion_labels, 20, "dirichlet", seed=0, alpha=0.1))
    assert iid > 2.2  # ln(10) = 2.30 for perfectly balanced partitions
    assert skewed < mild < iid and skewed < 1.5


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_thousand_partitions_of_fashion_mnist(fashion_labels: np.ndarray, method: str) -> None:
    start = time.perf_counter()
    parts = partition_indices(fashion_labels, 1000, method, seed=0)
    elapsed = time.perf_counter() - start
    assert len(parts) == 1000
    assert_disjoint(parts, len(fashion_labels), complete=True)
    assert elapsed < 30, f"{method}: 1000 partitions took {elapsed:.1f} s"


LABELS = np.repeat(np.arange(10), 10)


@pytest.mark.parametrize("args, kwargs, match", [
    ((LABELS, 4, "random"), {}, "iid, dirichlet, pathological, shards"),
    ((LABELS, 0, "iid"), {}, "num_partitions"),
    ((LABELS, 101, "iid"), {}, "num_partitions"),
    ((LABELS, 4, "dirichlet"), {"alpha": 0.0}, "alpha"),
    ((LABELS, 4, "dirichlet"), {"alpha": -1.0}, "alpha"),
    ((LABELS, 4, "dirichlet"), {"alpha": float("nan")}, "alpha"),
    ((LABELS, 4, "pathological"), {"classes_per_partition": 0}, "classes_per_partition"),
    ((LABELS, 4, "pathological"), {"classes_per_partition": 11}, "classes_per_partition"),
    ((LABELS, 4, "shards"), {"shards_per_partition": 0}, "shards_per_partition"),
    ((LABELS, 60, "shards"), {"shards_per_partition": 2}, "shards_per_partition"),
    ((LABELS.reshape(10, 10), 2, "iid"), {}, "1-D"),
])
def test_bad_partition_arguments(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(DataError, match=match) as info:
        partition_indices(*args, seed=0, **kwargs)
    assert "\n" not in str(info.value)


def test_impossible_dirichlet_is_a_data_error() -> None:
    # 20 partitions of 20 samples with a tiny alpha: some partition always ends up empty.
    with pytest.raises(DataError, match="raise alpha"):
        partition_indices(np.repeat([0, 1], 10), 20, "dirichlet", seed=0, alpha=0.01)


def test_impossible_pathological_is_a_data_error() -> None:
    # Class 0 has 2 samples but 1 class per partition gives it to 5 of the 10 partitions.
    labels = np.array([0] * 2 + [1] * 100)
    with pytest.raises(DataError, match="pathological.*classes_per_partition"):
        partition_indices(labels, 10, "pathological", seed=0, classes_per_partition=1)


def test_small_partitionings_work_on_tiny_data() -> None:
    parts = partition_indices(LABELS, 100, "iid", seed=0)
    assert_disjoint(parts, 100, complete=True)
    parts = partition_indices(LABELS, 10, "dirichlet", seed=0, alpha=1.0)
    assert_disjoint(parts, 100, complete=True)


# ---------------------------------------------------------------------------- splits


def test_split_holdout_is_disjoint_and_covers() -> None:
    indices = np.arange(1000, 1100)
    train, holdout = split_holdout(indices, 0.1, seed=0)
    assert len(holdout) == 10 and len(train) == 90
    assert np.array_equal(np.sort(np.concatenate([train, holdout])), indices)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(holdout) > 0)
    again = split_holdout(indices, 0.1, seed=0)
    assert np.array_equal(again[1], holdout)
    assert not np.array_equal(split_holdout(indices, 0.1, seed=1)[1], holdout)


def test_split_holdout_edge_sizes() -> None:
    assert [len(p) for p in split_holdout(np.arange(5), 0.01, seed=0)] == [4, 1]  # at least 1
    assert [len(p) for p in split_holdout(np.arange(5), 0.99, seed=0)] == [1, 4]  # keep 1
    assert [len(p) for p in split_holdout(np.arange(1), 0.5, seed=0)] == [1, 0]
    assert [len(p) for p in split_holdout(np.arange(5), 0.0, seed=0)] == [5, 0]
    with pytest.raises(DataError):
        split_holdout(np.arange(5), 1.0, seed=0)
    with pytest.raises(DataError):
        split_holdout(np.arange(0), 0.1, seed=0)


def test_split_test_is_disjoint_and_covers() -> None:
    aux, evaluation = split_test(10000, 0.9, seed=0)
    assert len(aux) == 9000 and len(evaluation) == 1000
    assert np.array_equal(np.sort(np.concatenate([aux, evaluation])), np.arange(10000))
    assert np.array_equal(split_test(10000, 0.9, seed=0)[1], evaluation)
    assert not np.array_equal(split_test(10000, 0.9, seed=1)[1], evaluation)
    for fraction in (0.0, 1.0, 0.01):
        with pytest.raises(DataError, match="non-empty"):
            split_test(10, fraction, seed=0)
