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
import io
import json
import os
import shutil
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from wsss.errors import DataError
from wsss.io import atomic_write_bytes, read_json, write_json

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
