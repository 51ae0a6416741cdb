"""File helpers: atomic outputs, verified image/mask reading, palette PNGs, safe paths."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from wsss.errors import DataError

IGNORE_INDEX = 255
"""Mask value for pixels that no metric or loss looks at."""


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 RGB triples, flattened), used for every mask PNG."""
    palette = []
    for index in range(256):
        red = green = blue = 0
        value = index
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette.extend((red, green, blue))
    return palette


_PALETTE = voc_palette()
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; it replaces ``final`` only if the block succeeds.

    A failure or a kill leaves ``final`` absent (or as it was) and never half written.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    os.replace(staging, final)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual mode
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_json(path: Path, payload: Any) -> None:
    """Atomically write ``payload`` as indented JSON (stable key order for DVC diffs)."""
    text = json.dumps(payload, indent=2, sort_keys=False) + "\n"
    atomic_write_bytes(Path(path), text.encode())


def write_csv(path: Path, rows: list[dict[str, Any]], fieldnames: list[str] | None = None) -> None:
    """Atomically write rows (dicts with the same keys) as CSV with a header: DVC plot data. No
    rows need ``fieldnames``: the file is then the header alone."""
    import csv
    import io as text_io

    buffer = text_io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames or list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(Path(path), buffer.getvalue().encode())


def read_json(path: Path) -> Any:
    """Read a JSON file; a missing or malformed file raises :class:`DataError`."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(path, f"not valid JSON ({error})") from None


def _open_verified(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()  # decodes every byte: truncated files fail here, not later
    except FileNotFoundError:
        raise DataError(path, "file listed but missing") from None
    except UnidentifiedImageError:
        raise DataError(path, "not an image file (corrupt or unknown format)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(path, f"corrupt or truncated image ({error})") from None
    return image


def read_image(path: Path) -> np.ndarray:
    """Decode an image completely into an ``(H, W, 3)`` uint8 RGB array."""
    image = _open_verified(Path(path))
    return np.asarray(image.convert("RGB"))


def read_mask(path: Path) -> np.ndarray:
    """Decode a class-index mask (palette or greyscale PNG) into an ``(H, W)`` uint8 array."""
    image = _open_verified(Path(path))
    if image.mode not in ("P", "L"):
        raise DataError(path, f"a mask must be a palette or greyscale image, not mode {image.mode}")
    return np.asarray(image, dtype=np.uint8)


def write_image_png(path: Path, image: np.ndarray) -> None:
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(path, optimize=False)


def write_mask_png(path: Path, mask: np.ndarray) -> None:
    """Save a class-index mask as a palette PNG (values are class ids, 255 = ignore)."""
    image = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))
    image.putpalette(_PALETTE)  # turns the "L" image into "P" with the same indices
    image.save(path, optimize=False)


def resolve_inside(root: Path, relative: str, *, listed_in: Path | str) -> Path:
    """Resolve ``relative`` under ``root``; refuse absolute paths and paths that leave ``root``."""
    if Path(relative).is_absolute():
        raise DataError(listed_in, f"path {relative!r} is absolute; paths must be relative to {root}")
    return ensure_inside(root, Path(root) / relative, listed_in=listed_in)


def ensure_inside(root: Path, path: Path, *, listed_in: Path | str) -> Path:
    """Resolve ``path`` (symlinks and ``..`` included) and refuse it if it is not under ``root``."""
    root = Path(root).resolve()
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(root):
        raise DataError(listed_in, f"path {str(path)!r} points outside the dataset root {root}")
    return resolved


def file_md5(path: Path) -> str:
    """MD5 of a file's bytes: DVC's hash of a file."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "md5").hexdigest()


def file_sha256(path: Path) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def dvc_md5(path: Path) -> str:
    """DVC's hash of a file (its MD5) or folder (the MD5 of the sorted JSON listing of each file's
    ``md5`` and ``relpath``, plus ``.dir``): the value ``dvc.lock`` records for the same content."""
    path = Path(path)
    if path.is_file():
        return file_md5(path)
    if not path.is_dir():
        raise DataError(path, "input not found")
    entries = sorted(({"md5": file_md5(file), "relpath": file.relative_to(path).as_posix()}
                      for file in path.rglob("*") if file.is_file()), key=lambda entry: entry["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def content_hash(path: Path) -> str:
    """SHA-256 of a file, or of a folder's sorted (relative path, file hash) listing."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        raise DataError(path, "input not found")
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode())
        digest.update(b"\0")
        digest.update(file_sha256(file).encode())
        digest.update(b"\n")
    return digest.hexdigest()
