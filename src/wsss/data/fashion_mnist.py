"""Fashion-MNIST objects: the idx reader and the compact subset committed to this repository.

The subset (``data/sources/fashion-mnist/fashion_mnist_subset.npz``) holds the first
``per_class`` images of every class of each original split, in file order, with their original
indices. It is rebuilt from the Debian package ``dataset-fashion-mnist`` (or any copy of the four
``*-ubyte.gz`` files) by ``wsss vendor-fashion-mnist``. It is read with ``allow_pickle=False``.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsss.errors import DataError
from wsss.io import atomic_write_bytes

SUBSET_FILE = "fashion_mnist_subset.npz"
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass(frozen=True)
class ObjectPool:
    """Grey 28x28 object images of one original split, with labels and original indices."""

    images: np.ndarray  # (N, 28, 28) uint8
    labels: np.ndarray  # (N,) uint8, Fashion-MNIST class ids 0..9
    indices: np.ndarray  # (N,) int32, position in the original idx file

    def of_class(self, label: int) -> np.ndarray:
        """Positions (in this pool) of the objects of one class."""
        return np.flatnonzero(self.labels == label)


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped idx file (the MNIST format) into a uint8 array."""
    try:
        raw = gzip.decompress(Path(path).read_bytes())
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except (OSError, EOFError) as error:
        raise DataError(path, f"not a readable gzip file ({error})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(path, "not an unsigned-byte idx file")
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    offset = 4 + 4 * dims
    expected = int(np.prod(shape))
    if len(raw) - offset != expected:
        raise DataError(path, f"holds {len(raw) - offset} bytes of data, the header says {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def build_subset(idx_dir: Path, per_class: dict[str, int]) -> dict[str, np.ndarray]:
    """Take the first ``per_class[split]`` objects of every class of each split, in file order."""
    arrays: dict[str, np.ndarray] = {}
    for split, (images_file, labels_file) in _IDX_FILES.items():
        images = read_idx(Path(idx_dir) / images_file)
        labels = read_idx(Path(idx_dir) / labels_file)
        if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
            raise DataError(Path(idx_dir) / images_file, "images and labels do not match")
        chosen = np.sort(
            np.concatenate([np.flatnonzero(labels == c)[: per_class[split]] for c in range(10)])
        )
        arrays[f"{split}_images"] = images[chosen]
        arrays[f"{split}_labels"] = labels[chosen]
        arrays[f"{split}_indices"] = chosen.astype(np.int32)
    return arrays


def write_subset(arrays: dict[str, np.ndarray], path: Path) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_pools(path: Path) -> dict[str, ObjectPool]:
    """Load the committed subset as ``{"train": ObjectPool, "test": ObjectPool}``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            pools = {
                split: ObjectPool(
                    images=archive[f"{split}_images"],
                    labels=archive[f"{split}_labels"],
                    indices=archive[f"{split}_indices"],
                )
                for split in _IDX_FILES
            }
    except FileNotFoundError:
        raise DataError(path, "Fashion-MNIST subset not found (see data/sources/fashion-mnist/README.md)") from None
    except (OSError, ValueError, KeyError) as error:
        raise DataError(path, f"not a valid Fashion-MNIST subset ({error})") from None
    for split, pool in pools.items():
        if pool.images.ndim != 3 or pool.images.shape[1:] != (28, 28) or pool.images.dtype != np.uint8:
            raise DataError(path, f"{split}_images must be uint8 of shape (N, 28, 28)")
        if not (len(pool.images) == len(pool.labels) == len(pool.indices)):
            raise DataError(path, f"{split}: images, labels and indices differ in length")
    return pools
