"""Per-image arrays stored many images to a file: shards, and a stage output that resumes shard by shard.

A folder of shards holds ``shard-00000.npz``, ``shard-00001.npz``, ... (shard ``k``: images
``k * size`` to ``(k + 1) * size - 1`` of the manifest, in its order) and ``shards.json`` (image id ->
shard file). A shard is a zip of ``.npy`` members ``<id>/<name>.npy`` plus ``meta.json`` (its ids and
what the writer records per image), written with fixed timestamps, so the same arrays give the same
bytes (DVC sees no change), and read with ``allow_pickle=False``. At LID scale (456,567 images) a stage
output is ~3,600 files of 128 images instead of 456,567.

:func:`resumable_dir` stages an output in ``.<name>.partial`` beside it: a shard appears there
atomically when complete, so a killed stage re-run with the same inputs (the fingerprint) computes
only the shards it lacks; the folder replaces the output when every shard is there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from wsss.errors import DataError
from wsss.io import atomic_write_bytes, read_json, read_mask, write_json

SHARD_SIZE = 128
INDEX = "shards.json"
META = "meta.json"
FINGERPRINT = "FINGERPRINT"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.npz"


def shard_numbers(count: int, size: int = SHARD_SIZE) -> list[range]:
    """The positions of ``count`` images in each shard: ``[range(0, size), range(size, 2 size), ...]``."""
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def _member(archive: zipfile.ZipFile, name: str, payload: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(info, payload)


def write_shard(path: Path, items: Sequence[tuple[str, dict[str, np.ndarray]]], meta: dict | None = None) -> None:
    """Write one shard atomically: each ``(id, {name: array})`` in order, and ``meta.json`` with the ids
    and ``meta`` (JSON: what the writer records per image, e.g. summaries)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for image_id, arrays in items:
            for name, array in arrays.items():
                payload = io.BytesIO()
                np.lib.format.write_array(payload, np.asarray(array), allow_pickle=False)
                _member(archive, f"{image_id}/{name}.npy", payload.getvalue())
        _member(archive, META, json.dumps({"ids": [image_id for image_id, _ in items], **(meta or {})}, sort_keys=True).encode())
    atomic_write_bytes(path, buffer.getvalue())


def read_meta(path: Path) -> dict:
    """A shard's ``meta.json`` (its ids and the writer's records)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read(META))
    except FileNotFoundError:
        raise DataError(path, "shard missing (re-run the stage that writes it)") from None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        raise DataError(path, f"not a valid shard ({error})") from None


def write_index(folder: Path) -> dict[str, str]:
    """``shards.json`` of a folder of complete shards: image id -> shard file; returns it."""
    index: dict[str, str] = {}
    for path in sorted(folder.glob("shard-*.npz")):
        for image_id in read_meta(path)["ids"]:
            index[image_id] = path.name
    write_json(folder / INDEX, index)
    return index


class ShardReader:
    """Random access to the arrays of one image in a folder of shards (a few shard files kept open)."""

    def __init__(self, folder: Path, keep_open: int = 4):
        self.folder = Path(folder)
        try:
            self.index: dict[str, str] = read_json(self.folder / INDEX)
        except DataError:
            raise DataError(self.folder / INDEX, "shard index missing or unreadable (re-run the stage that writes it)") from None
        self._open: dict[str, zipfile.ZipFile] = {}
        self._keep = keep_open

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.index

    def where(self, image_id: str) -> Path:
        """The shard file that holds ``image_id`` (a :class:`DataError` if none)."""
        if image_id not in self.index:
            raise DataError(self.folder / INDEX, f"no shard holds image {image_id!r} (re-run the stage that writes it)")
        return self.folder / self.index[image_id]

    def _archive(self, name: str) -> zipfile.ZipFile:
        if name not in self._open:
            if len(self._open) >= self._keep:
                self._open.pop(next(iter(self._open))).close()
            try:
                self._open[name] = zipfile.ZipFile(self.folder / name)
            except FileNotFoundError:
                raise DataError(self.folder / name, "shard missing (re-run the stage that writes it)") from None
            except (OSError, zipfile.BadZipFile) as error:
                raise DataError(self.folder / name, f"not a valid shard ({error})") from None
        return self._open[name]

    def arrays(self, image_id: str) -> dict[str, np.ndarray]:
        """``{name: array}`` of one image."""
        path = self.where(image_id)
        archive = self._archive(path.name)
        prefix = f"{image_id}/"
        try:
            return {member[len(prefix) : -len(".npy")]: np.lib.format.read_array(io.BytesIO(archive.read(member)), allow_pickle=False)
                    for member in archive.namelist() if member.startswith(prefix) and member.endswith(".npy")}
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
            raise DataError(path, f"image {image_id!r}: unreadable arrays ({error})") from None

    def close(self) -> None:
        for archive in self._open.values():
            archive.close()
        self._open.clear()


def partial_dir(final: Path) -> Path:
    return final.parent / f".{final.name}.partial"


@contextlib.contextmanager
def resumable_dir(final: Path, fingerprint: str, context=None) -> Iterator[Path]:
    """Stage ``final`` in ``.<name>.partial``, kept across kills and failures while ``fingerprint`` (what
    the output is made from) stays the same, cleared when it changes; it replaces ``final`` when the
    block succeeds. Under torchrun rank 0 prepares and finishes the folder; every process writes into it."""
    from wsss import distributed

    context = context or distributed.current()
    final = Path(final)
    staging = partial_dir(final)
    if context.is_main:
        marker = staging / FINGERPRINT
        if staging.exists() and (not marker.is_file() or marker.read_text() != fingerprint):
            shutil.rmtree(staging)
        staging.mkdir(parents=True, exist_ok=True)
        for leftover in staging.rglob(".*.tmp-*"):  # a kill during an atomic write leaves its temporary file
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        marker.write_text(fingerprint)
    distributed.barrier(context)
    yield staging
    distributed.barrier(context)
    if context.is_main:
        (staging / FINGERPRINT).unlink()
        if final.exists():
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        os.replace(staging, final)
    distributed.barrier(context)


def missing_shards(out_dir: Path, numbers: Sequence[int]) -> list[int]:
    """The shards of ``numbers`` that ``out_dir`` does not hold yet (a resumed stage computes only these)."""
    return [number for number in numbers if not (Path(out_dir) / shard_name(number)).is_file()]


def fill_shards(out_dir: Path, ids: Sequence[str], numbers: Sequence[int], size: int,
                make: Callable[[list[int]], tuple[list[dict[str, np.ndarray]], dict]], desc: str, show: bool = True) -> None:
    """Write every shard of ``numbers`` (shards of ``size`` of the images ``ids``) that ``out_dir`` lacks:
    ``make(positions)`` gives the arrays of the images at those positions, in order, and the shard's
    meta. Shards already there are kept, so a killed stage resumes where it stopped."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranges = shard_numbers(len(ids), size)
    todo = missing_shards(out_dir, numbers)
    total = sum(len(ranges[n]) for n in numbers)
    with tqdm(total=total, initial=total - sum(len(ranges[n]) for n in todo), desc=desc, unit="img", disable=not show) as progress:
        for number in todo:
            positions = list(ranges[number])
            arrays, meta = make(positions)
            if len(arrays) != len(positions):
                raise ValueError(f"shard {number}: {len(arrays)} results for {len(positions)} images")
            write_shard(out_dir / shard_name(number), [(ids[p], a) for p, a in zip(positions, arrays, strict=True)], meta)
            progress.update(len(positions))


def metas(folder: Path) -> list[dict]:
    """The ``meta.json`` of every shard in ``folder``, in shard order."""
    return [read_meta(path) for path in sorted(Path(folder).glob("shard-*.npz"))]


def matrix_meta(matrix: np.ndarray) -> list[list[int]]:
    """A (sparse) count matrix as JSON: ``[[row, column, count], ...]`` of its non-zero cells."""
    rows, columns = np.nonzero(matrix)
    return [[int(r), int(c), int(matrix[r, c])] for r, c in zip(rows, columns, strict=True)]


def matrix_from_meta(cells: list[list[int]], size: int) -> np.ndarray:
    """The ``size`` x ``size`` int64 matrix of :func:`matrix_meta`'s cells."""
    matrix = np.zeros((size, size), dtype=np.int64)
    for row, column, count in cells:
        matrix[row, column] += count
    return matrix


MASK = "mask"


class MaskStore:
    """Label maps (uint8: class ids, 255 = unsure / ignored) stored in shards, one ``mask`` array per
    image: the IR labels, the pseudo masks and the ablation's masks. Picklable for data-loader
    workers: each process opens the shard files itself."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._reader: ShardReader | None = None

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "_reader": None}

    @property
    def reader(self) -> ShardReader:
        if self._reader is None:
            self._reader = ShardReader(self.folder)
        return self._reader

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.reader

    def where(self, image_id: str) -> str:
        """Where ``image_id``'s mask lives, for error messages: ``<shard> (<id>)``."""
        return f"{self.reader.where(image_id)} ({image_id})"

    def load(self, image_id: str, expected_size: tuple[int, int] | None = None) -> np.ndarray:
        """One image's mask; a missing image, another array or another size (height, width) raise
        :class:`DataError` naming the shard and the image."""
        arrays = self.reader.arrays(image_id)
        mask = arrays.get(MASK)
        if mask is None or mask.ndim != 2 or mask.dtype != np.uint8:
            raise DataError(self.where(image_id), "no 2-D uint8 mask stored for this image")
        if expected_size is not None and mask.shape != tuple(expected_size):
            raise DataError(self.where(image_id), f"mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                                                  f"{expected_size[1]}x{expected_size[0]}")
        return mask


@dataclasses.dataclass(frozen=True)
class StoredMask:
    """A reference to one image's mask in a :class:`MaskStore`: what a dataset lists instead of a PNG path."""

    store: MaskStore
    image_id: str

    def read(self) -> np.ndarray:
        return self.store.load(self.image_id)

    def __str__(self) -> str:
        return self.store.where(self.image_id)


def stored_masks(folder: Path, ids: Sequence[str]) -> list[StoredMask]:
    """:class:`StoredMask` references of ``ids`` in the shards of ``folder`` (one shared store)."""
    store = MaskStore(folder)
    return [StoredMask(store, image_id) for image_id in ids]


def load_mask(source: Path | StoredMask) -> np.ndarray:
    """A mask from a PNG file or from a :class:`MaskStore`."""
    return source.read() if isinstance(source, StoredMask) else read_mask(source)
