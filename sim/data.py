"""In-memory image datasets and their federated partitioning.

Datasets are read from files already on disk (never downloaded): Fashion-MNIST from the Debian
package ``dataset-fashion-mnist`` by default, everything else from a torchvision-layout folder
given as ``--data-root``. Whole datasets fit in memory as uint8 arrays, which is what lets the
simulator hand one copy to every client actor instead of re-reading files per client.

Partitioning delegates to ``flwr_datasets.partitioner`` so that the splits match what Flower
users know, but runs it offline on a tiny in-memory table of ``(label, idx)`` rows: the
partitioners only ever see labels, and the ``idx`` column maps their output back to positions
in the label array whatever reordering they do internally (ShardPartitioner sorts by label).
"""

from __future__ import annotations

import gzip
import math
import operator
import os
import pickle
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import torch

from sim.spec import one_line

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner


class DataError(ValueError):
    """One-line, user-facing message: what is missing/wrong and where (file paths)."""


DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "svhn")
PARTITIONS = ("iid", "dirichlet", "pathological", "shards")
FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist

_NUM_CLASSES = {"fashion-mnist": 10, "mnist": 10, "cifar10": 10, "cifar100": 100, "svhn": 10}
# torchvision's raw IDX file names, (train images, train labels, test images, test labels).
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_FOLDER = {"mnist": "MNIST/raw", "fashion-mnist": "FashionMNIST/raw"}
_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR100_DIR = "cifar-100-python"
_SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")

# Loaded datasets, keyed by (name, absolute root): a process (e.g. a Ray actor) that asks
# twice pays once. Arrays inside are read-only so that no caller can corrupt the shared copy.
_CACHE: dict[tuple[str, str], ImageData] = {}


@dataclass(frozen=True, eq=False)  # eq=False: comparing ndarray fields with == is ambiguous
class ImageData:
    """A whole image-classification dataset held in memory.

    Images stay uint8 NHWC (a quarter of float32's memory, and the layout the files use);
    ``to_tensor`` converts batches to float NCHW only when they are needed.
    """

    name: str
    train_x: np.ndarray  # uint8, shape (N, H, W, C)  (C = 1 for gray)
    train_y: np.ndarray  # int64, shape (N,)
    test_x: np.ndarray  # uint8 (M, H, W, C)
    test_y: np.ndarray  # int64 (M,)
    num_classes: int
    mean: tuple[float, ...]  # per-channel mean of train_x / 255
    std: tuple[float, ...]  # per-channel std of train_x / 255

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of one image as models expect it: (C, H, W)."""
        _, height, width, channels = self.train_x.shape
        return channels, height, width


# ----------------------------------------------------------------------------- loading


def load_dataset(name: str, data_root: str | None = None) -> ImageData:
    """Load ``name`` from local files (never downloading), cached per process.

    ``data_root`` is a torchvision-layout folder; without it only Fashion-MNIST can be loaded,
    from the Debian package's folder.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; available: {', '.join(DATASETS)}")
    if data_root is None and name != "fashion-mnist":
        raise DataError(f"{name}: no local copy known; pass --data-root pointing at a "
                        f"torchvision-layout folder ({_expected_files(name)})")
    root = os.path.abspath(data_root if data_root is not None else FASHION_MNIST_DEFAULT_ROOT)
    if data_root is not None and not os.path.isdir(root):
        what = "is a file, not a folder" if os.path.exists(root) else "does not exist"
        raise DataError(f"{name}: --data-root {root} {what}; expected a folder in torchvision's layout "
                        f"with {_expected_files(name)}")
    key = (name, root)
    if key not in _CACHE:
        arrays = _read_arrays(name, Path(root), data_root is None)
        _CACHE[key] = _build(f"{name} under {root}", name, *arrays)
    return _CACHE[key]


def _read_arrays(name: str, root: Path, debian: bool) -> tuple[np.ndarray, ...]:
    """(train_x, train_y, test_x, test_y) for ``name`` from ``root``."""
    if name in _IDX_FOLDER:
        return _read_idx_dataset(name, root if debian else root / _IDX_FOLDER[name], root, debian)
    if name == "cifar10":
        return _read_cifar(name, root / _CIFAR10_DIR, _CIFAR10_TRAIN, "test_batch", "labels", root)
    if name == "cifar100":
        return _read_cifar(name, root / _CIFAR100_DIR, ("train",), "test", "fine_labels", root)
    return _read_svhn(root)


def _expected_files(name: str, debian: bool = False) -> str:
    """The files ``name`` needs, relative to the data root, for error messages."""
    if name in _IDX_FOLDER:
        folder = "" if debian else _IDX_FOLDER[name] + "/"
        return f"{folder}{{{','.join(_IDX_FILES)}}}[.gz]"
    if name == "cifar10":
        return f"{_CIFAR10_DIR}/{{data_batch_1..5,test_batch}}"
    if name == "cifar100":
        return f"{_CIFAR100_DIR}/{{train,test}}"
    return "{" + ",".join(_SVHN_FILES) + "}"


def _missing(name: str, root: Path, what: str, missing: str, debian: bool = False) -> DataError:
    """The one-line error for files that are not where they should be."""
    return DataError(f"{name}: expected {_expected_files(name, debian)} under {root} ({what}); "
                     f"not found: {missing}")


def _build(where: str, name: str, train_x: np.ndarray, train_y: np.ndarray,
           test_x: np.ndarray, test_y: np.ndarray) -> ImageData:
    """Validate the arrays, freeze them and compute normalisation statistics.

    ``where`` (dataset and folder) starts every message: the files each parsed on their own,
    so what is wrong is how they fit together, and the folder is what the user must fix.
    """
    num_classes = _NUM_CLASSES[name]
    for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if len(x) != len(y) or len(x) == 0:
            raise DataError(f"{where}: {split} split has {len(x)} images but {len(y)} labels")
        if y.min() < 0 or y.max() >= num_classes:
            raise DataError(f"{where}: {split} labels outside 0..{num_classes - 1} "
                            f"(found {y.min()}..{y.max()})")
    if train_x.shape[1:] != test_x.shape[1:]:  # one model must take both splits
        raise DataError(f"{where}: train images are {'x'.join(map(str, train_x.shape[1:]))} (HxWxC) "
                        f"but test images {'x'.join(map(str, test_x.shape[1:]))}")
    train_x, train_y = np.ascontiguousarray(train_x, np.uint8), np.ascontiguousarray(train_y, np.int64)
    test_x, test_y = np.ascontiguousarray(test_x, np.uint8), np.ascontiguousarray(test_y, np.int64)
    for array in (train_x, train_y, test_x, test_y):
        array.flags.writeable = False
    mean, std = _channel_stats(train_x)
    return ImageData(name, train_x, train_y, test_x, test_y, num_classes=num_classes, mean=mean, std=std)


def _channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of ``x / 255``.

    Sums run over chunks of images so that no float copy of the whole training set is ever
    made (600 MB for CIFAR-10 in float32); float64 sums of 8-bit values are exact here.
    """
    channels = x.shape[-1]
    sums, squares = np.zeros(channels), np.zeros(channels)
    for start in range(0, len(x), 1024):
        # Channel-major rows: reductions along contiguous memory are ~7x faster for RGB.
        chunk = np.ascontiguousarray(x[start:start + 1024].reshape(-1, channels).T, np.float64)
        sums += chunk.sum(axis=1)
        squares += np.einsum("ij,ij->i", chunk, chunk)
    count = x.size // channels
    mean = sums / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())


# IDX (MNIST, Fashion-MNIST) ------------------------------------------------------------


def _read_idx_dataset(name: str, folder: Path, root: Path, debian: bool) -> tuple[np.ndarray, ...]:
    """The four IDX files of an (Fashion-)MNIST-style dataset, plain or gzipped."""
    paths = []
    for stem in _IDX_FILES:
        found = [folder / f for f in (stem, stem + ".gz") if (folder / f).is_file()]
        if not found:
            where = ("Debian package dataset-fashion-mnist; install it or pass --data-root"
                     if debian else "torchvision layout")
            raise _missing(name, root, where, str(folder / (stem + "[.gz]")), debian)
        paths.append(found[0])
    images_train, labels_train, images_test, labels_test = (
        _read_idx(path, ndim) for path, ndim in zip(paths, (3, 1, 3, 1)))
    return images_train[..., None], labels_train, images_test[..., None], labels_test


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (magic 0x0000 08 ndim, big-endian int32 sizes)."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read IDX file ({one_line(exc)})") from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes((0, 0, 8, ndim)):
        raise DataError(f"{path}: not a {ndim}-dimensional uint8 IDX file (bad magic number)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) != header + math.prod(dims):
        raise DataError(f"{path}: truncated or corrupt IDX file ({len(raw)} bytes, "
                        f"header promises {header + math.prod(dims)})")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


# CIFAR pickles -------------------------------------------------------------------------

# The only globals an official CIFAR batch (a Python 2 pickle of a dict of lists, strings and
# one uint8 array) names, plus numpy's protocol-5 array constructor for batches re-saved by
# today's numpy. Anything else, ``os.system`` or ``builtins.eval`` in a crafted file, is
# refused before it is called: ``pickle.load`` would run it.
_CIFAR_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
})


class RefusedPickle(pickle.UnpicklingError):
    """A data file asked for something that a dataset never contains."""


class _DataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the globals in ``_CIFAR_GLOBALS``.

    Plain containers and scalars (dict, list, tuple, str, bytes, int, float) need no global;
    numpy arrays need the constructors above, all of which build data and call nothing else.
    """

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("_codecs", "encode"):  # how Python 3 writes bytes at protocol 2
            return _latin1_encode
        if (module, name) in _CIFAR_GLOBALS:
            return super().find_class(module, name)
        raise RefusedPickle(f"refused: the pickle asks for {module}.{name}; a dataset batch holds only "
                            "dicts, lists, strings, bytes and numeric numpy arrays")


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``codecs.encode`` restricted to the one codec pickle's bytes need: an arbitrary codec
    name would make the unpickler import (and run) a module of the ``encodings`` package."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise RefusedPickle(f"refused: the pickle encodes with codec {encoding!r}")
    return text.encode("latin1")


def _check_plain(value: object, depth: int = 0) -> None:
    """Refuse anything but containers of str/bytes/numbers and numeric arrays (no object arrays)."""
    if depth > 8:
        raise RefusedPickle("refused: nested deeper than a dataset batch")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, depth + 1)
            _check_plain(item, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            if not isinstance(item, (int, float, str, bytes)):  # fast path for long label lists
                _check_plain(item, depth + 1)
    elif isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise RefusedPickle(f"refused: a numpy array of dtype {value.dtype}, not of numbers")
    elif not isinstance(value, (int, float, str, bytes, type(None))):
        raise RefusedPickle(f"refused: a {type(value).__name__} object")


def load_plain_pickle(file: BinaryIO) -> object:
    """Unpickle a dataset file without running code from it; raises ``RefusedPickle``.

    ``encoding="latin1"``: the official batches are Python 2 pickles (their arrays' raw bytes
    are Python 2 strings).
    """
    value = _DataUnpickler(file, encoding="latin1").load()
    _check_plain(value)
    return value


def _read_cifar(name: str, folder: Path, train_files: tuple[str, ...], test_file: str,
                label_key: str, root: Path) -> tuple[np.ndarray, ...]:
    """CIFAR-10/100 from torchvision's copy of the official Python pickles."""
    for file in (*train_files, test_file):
        if not (folder / file).is_file():
            raise _missing(name, root, "torchvision layout", str(folder / file))
    train = [_read_cifar_batch(folder / file, label_key) for file in train_files]
    test_x, test_y = _read_cifar_batch(folder / test_file, label_key)
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
            test_x, test_y)


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickle: ``data`` is (N, 3072) channel-planar rows, labels under ``label_key``."""
    try:
        with path.open("rb") as file:
            batch = load_plain_pickle(file)
        if not isinstance(batch, dict):
            raise RefusedPickle(f"a {type(batch).__name__}, not a dict")
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except Exception as exc:  # noqa: BLE001 - a damaged pickle can fail in many ways
        raise DataError(f"{path}: cannot read CIFAR batch ({one_line(exc)})") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise DataError(f"{path}: expected 'data' of shape (N, 3072) and N '{label_key}', "
                        f"got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


# SVHN .mat -----------------------------------------------------------------------------


def _read_svhn(root: Path) -> tuple[np.ndarray, ...]:
    """SVHN cropped digits: ``X`` is (32, 32, 3, N), ``y`` is 1..10 with 10 meaning digit 0."""
    for file in _SVHN_FILES:
        if not (root / file).is_file():
            raise _missing("svhn", root, "torchvision layout", str(root / file))
    from scipy.io import loadmat  # imported here: only SVHN needs it, and it is slow to import
    # loadmat parses MAT v4/v5 itself (no pickle): a crafted file can hold cells and structs but no
    # code, and anything but a numeric X and y fails the uint8/int64 conversions below.
    arrays: list[np.ndarray] = []
    for file in _SVHN_FILES:
        try:
            mat = loadmat(root / file)
            images = np.asarray(mat["X"], dtype=np.uint8).transpose(3, 0, 1, 2)
            labels = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
        except Exception as exc:  # noqa: BLE001 - scipy raises many types for a bad file
            raise DataError(f"{root / file}: cannot read SVHN file ({one_line(exc)})") from None
        arrays += [images, np.where(labels == 10, 0, labels)]
    return tuple(arrays)


def to_tensor(x_uint8: np.ndarray) -> torch.Tensor:
    """(B, H, W, C) uint8 -> contiguous float32 (B, C, H, W) in [0, 1].

    Copies first: the cached arrays are read-only and torch cannot share read-only memory.
    """
    if x_uint8.dtype != np.uint8 or x_uint8.ndim != 4:
        raise ValueError(f"to_tensor expects a uint8 (B, H, W, C) array, got "
                         f"{x_uint8.dtype} {x_uint8.shape}")
    nchw = torch.tensor(x_uint8).permute(0, 3, 1, 2)
    return nchw.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


# ------------------------------------------------------------------------- partitioning

# What to change when a method cannot give every partition some data.
_ADVICE = {
    "iid": "lower num_partitions",
    "dirichlet": "raise alpha or lower num_partitions",
    "pathological": "lower num_partitions or classes_per_partition",
    "shards": "lower num_partitions or shards_per_partition",
}


def partition_indices(labels: np.ndarray, num_partitions: int, method: str, *, seed: int,
                      alpha: float = 0.5, classes_per_partition: int = 2,
                      shards_per_partition: int = 2) -> list[np.ndarray]:
    """Split sample positions ``0..len(labels)-1`` into ``num_partitions`` client partitions.

    Returns one sorted int64 array of positions per partition. Partitions never overlap and
    are never empty; iid and dirichlet use every sample, pathological and shards may leave
    some out (unassigned classes, the remainder after equal-size shards). The same seed
    gives the same partitions.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if method not in PARTITIONS:
        raise DataError(f"unknown partition method '{method}'; available: {', '.join(PARTITIONS)}")
    num_partitions = operator.index(num_partitions)
    if not 1 <= num_partitions <= len(labels):
        raise DataError(f"{method}: num_partitions must be in 1..{len(labels)} (the number of "
                        f"samples), got {num_partitions}")
    params = _describe(method, num_partitions, alpha, classes_per_partition, shards_per_partition)
    partitioner, order = _make_partitioner(labels, num_partitions, method, params, seed=seed,
                                           alpha=alpha, classes=classes_per_partition,
                                           shards=shards_per_partition)
    parts = _load_all(partitioner, labels, order, params, method)
    for pid, part in enumerate(parts):
        if len(part) == 0:
            raise DataError(f"{params}: partition {pid} would be empty; {_ADVICE[method]}")
    return parts


def _describe(method: str, num_partitions: int, alpha: float, classes: int, shards: int) -> str:
    """``method(num_partitions=..., <its own parameter>)`` for error messages."""
    extra = {"iid": "", "dirichlet": f", alpha={alpha}",
             "pathological": f", classes_per_partition={classes}",
             "shards": f", shards_per_partition={shards}"}[method]
    return f"{method}(num_partitions={num_partitions}{extra})"


def _make_partitioner(labels: np.ndarray, num_partitions: int, method: str, params: str, *,
                      seed: int, alpha: float, classes: int,
                      shards: int) -> tuple[Partitioner, np.ndarray]:
    """The configured flwr partitioner and the row order of the table it will partition.

    Arguments are checked here because the partitioners either fail late with long messages
    or not at all (a zero shard size divides by zero).
    """
    # Imported here: `datasets` takes over a second to import and only partitioning needs it.
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
        ShardPartitioner,
    )

    order = np.arange(len(labels))
    # shuffle=False everywhere: partitions come back sorted, so in-partition shuffles are waste.
    if method == "iid":
        # IidPartitioner takes contiguous blocks and has no seed: shuffle the rows instead.
        order = np.random.default_rng(seed).permutation(len(labels))
        return IidPartitioner(num_partitions), order
    if method == "dirichlet":
        if not (math.isfinite(alpha) and alpha > 0):
            raise DataError(f"{params}: alpha must be a finite number > 0")
        # At least a small batch per client, but at most half an even share so that the
        # requirement stays satisfiable for many clients; self-balancing (as in the BNFL and
        # NIID-Bench code) stops early partitions from hoarding whole classes.
        min_size = max(1, min(10, len(labels) // (2 * num_partitions)))
        return DirichletPartitioner(num_partitions, "label", float(alpha),
                                    min_partition_size=min_size, self_balancing=True,
                                    shuffle=False, seed=seed), order
    if method == "pathological":
        num_labels = len(np.unique(labels))
        if not 1 <= operator.index(classes) <= num_labels:
            raise DataError(f"{params}: classes_per_partition must be in 1..{num_labels} "
                            f"(the distinct labels)")
        # first-deterministic: partition i always gets class i mod K, so no class is dropped
        # when there are at least K partitions; the other classes are drawn with the seed.
        return PathologicalPartitioner(num_partitions, "label", int(classes),
                                       class_assignment_mode="first-deterministic",
                                       shuffle=False, seed=seed), order
    if not 1 <= operator.index(shards) or num_partitions * shards > len(labels):
        raise DataError(f"{params}: need 1 <= shards_per_partition and num_partitions * "
                        f"shards_per_partition <= {len(labels)} samples")
    return ShardPartitioner(num_partitions, "label", num_shards_per_partition=int(shards),
                            shuffle=False, seed=seed), order


def _load_all(partitioner: Partitioner, labels: np.ndarray, order: np.ndarray, params: str,
              method: str) -> list[np.ndarray]:
    """Run ``partitioner`` on a (label, idx) table in ``order`` and collect each part's idx.

    The table is in "arrow" format because with datasets 4 a column of a python- or
    numpy-formatted dataset is a lazy ``Column`` that converts row by row (seconds per call,
    and the partitioners call ``np.array(dataset["label"])``).
    """
    from datasets import Dataset

    table = Dataset.from_dict({"label": labels[order], "idx": order}).with_format("arrow")
    try:
        with warnings.catch_warnings():
            # Retry notices (dirichlet), unused-class notices (pathological) and a pyarrow
            # deprecation inside Dataset.sort (shards): failures still raise below.
            warnings.simplefilter("ignore")
            partitioner.dataset = table
            return [np.sort(partitioner.load_partition(pid)["idx"].to_numpy()).astype(np.int64)
                    for pid in range(partitioner.num_partitions)]
    except ValueError as exc:
        raise DataError(f"{params}: flwr_datasets could not partition {len(labels)} samples "
                        f"({one_line(exc)}); {_ADVICE[method]}") from None


# ------------------------------------------------------------------------------ splits


def split_holdout(indices: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of a client's ``indices`` into sorted (train, holdout).

    The holdout gets ``round(fraction * len)`` samples, at least one when ``fraction > 0``
    and there are two or more samples, and never all of them: a client must keep something
    to train on.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"holdout fraction must be in [0, 1), got {fraction}")
    if len(indices) == 0:
        raise DataError("split_holdout: no indices to split (empty partition)")
    size = round(fraction * len(indices))
    if fraction > 0 and len(indices) >= 2:
        size = max(size, 1)
    size = min(size, len(indices) - 1)
    shuffled = np.random.default_rng(seed).permutation(indices)
    return np.sort(shuffled[size:]), np.sort(shuffled[:size])


def split_test(num_test: int, aux_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of test positions ``0..num_test-1`` into sorted (aux, eval).

    The auxiliary part is what an attacker may use (e.g. to train an inversion model); the
    evaluation part is kept disjoint from it so attack and model metrics are not inflated.
    """
    size = round(aux_fraction * num_test)
    if not 0 < size < num_test:
        raise DataError(f"aux_fraction={aux_fraction} of {num_test} test samples leaves "
                        f"{size} auxiliary and {num_test - size} evaluation samples; "
                        f"both must be non-empty")
    shuffled = np.random.default_rng(seed).permutation(num_test)
    return np.sort(shuffled[:size]), np.sort(shuffled[size:])
