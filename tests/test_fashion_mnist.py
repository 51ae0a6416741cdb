from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from conftest import FASHION_SUBSET

from wsss.cli import main
from wsss.data.fashion_mnist import SUBSET_FILE, load_pools, read_idx
from wsss.errors import DataError


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture
def idx_folder(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 40), ("t10k", 30)):
        labels = np.arange(count) % 10
        images = rng.integers(0, 256, (count, 28, 28)).astype(np.uint8)
        images[:, 0, 0] = labels  # lets the test trace an object back to its index
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return tmp_path


def test_vendor_command_takes_the_first_objects_of_each_class(idx_folder, tmp_path):
    out = tmp_path / "vendored"
    assert main(["vendor-fashion-mnist", "--from", str(idx_folder), "--out", str(out), "--train-per-class", "3", "--test-per-class", "2"]) == 0
    pools = load_pools(out / SUBSET_FILE)
    assert len(pools["train"].images) == 30 and len(pools["test"].images) == 20
    assert pools["train"].indices.tolist() == list(range(30))  # labels cycle 0..9: the first 3 of each
    assert np.array_equal(pools["train"].images[:, 0, 0], pools["train"].labels)
    assert np.array_equal(pools["test"].labels, np.arange(20) % 10)


def test_bad_idx_files_are_named(idx_folder):
    broken = idx_folder / "train-images-idx3-ubyte.gz"
    broken.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + struct.pack(">III", 40, 28, 28) + b"\x00" * 100))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: holds 100 bytes of data"):
        read_idx(broken)
    broken.write_bytes(b"not gzip")
    with pytest.raises(DataError, match="not a readable gzip file"):
        read_idx(broken)


def test_committed_subset_has_every_class_of_both_splits():
    pools = load_pools(FASHION_SUBSET)
    for split, per_class in (("train", 400), ("test", 150)):
        assert np.bincount(pools[split].labels, minlength=10).tolist() == [per_class] * 10
        assert ((pools[split].images > 0).mean(axis=(1, 2)) > 0.1).all()  # real objects, not blanks
