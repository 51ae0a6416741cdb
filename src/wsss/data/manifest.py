"""The internal manifest every source converts into, and every later stage reads.

A manifest is a JSON file::

    {"format": "wsss-manifest/1", "source": "embedded", "images_root": ".",
     "class_names": ["background", "t_shirt", ...], "person_class": 4,
     "images": [{"id": "train_00000", "subset": "train", "image": "images/train_00000.png",
                 "mask": "masks/train_00000.png", "labels": [2], "source_labels": [2],
                 "mask_labels": [2, 4]}, ...]}

``images_root`` is relative to the manifest's folder; every image and mask path is relative to
it and may not leave it. Class ids index ``class_names`` (0 is background); ``labels`` are the
image-level labels the weak steps train on, ``source_labels`` the labels as the source gave them
(before ``split`` removed the person class; the person classifier reads them) and
``mask_labels`` the classes present in the mask, when there is one (diagnostics and evaluation).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from wsss.errors import DataError
from wsss.io import read_json, resolve_inside, write_json

FORMAT = "wsss-manifest/1"
SUBSETS = ("train", "heldout", "val", "test")


@dataclass(frozen=True)
class ImageRecord:
    id: str
    subset: str
    image: str
    mask: str | None
    labels: tuple[int, ...]
    source_labels: tuple[int, ...]
    mask_labels: tuple[int, ...] | None = None  # classes present in the mask (diagnostics only)
    provenance: dict[str, Any] = field(default_factory=dict, compare=False)

    def with_labels(self, labels: tuple[int, ...]) -> ImageRecord:
        return replace(self, labels=tuple(sorted(labels)))


@dataclass(frozen=True)
class Manifest:
    source: str
    class_names: tuple[str, ...]
    person_class: int | None
    records: tuple[ImageRecord, ...]
    root: Path  # folder the record paths are relative to (absolute once loaded)

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.class_names)

    def subset(self, name: str) -> list[ImageRecord]:
        return [record for record in self.records if record.subset == name]

    def image_path(self, record: ImageRecord) -> Path:
        return self.root / record.image

    def mask_path(self, record: ImageRecord) -> Path | None:
        return None if record.mask is None else self.root / record.mask

    def derive(self, records: list[ImageRecord]) -> Manifest:
        return replace(self, records=tuple(records))


def save_manifest(manifest: Manifest, path: Path) -> None:
    """Write ``manifest`` to ``path``; record paths stay relative to ``manifest.root``."""
    path = Path(path)
    images_root = Path(os.path.relpath(manifest.root.resolve(), path.parent.resolve()))
    payload = {
        "format": FORMAT,
        "source": manifest.source,
        "images_root": images_root.as_posix(),
        "class_names": list(manifest.class_names),
        "person_class": manifest.person_class,
        "images": [
            {
                **{key: value for key, value in asdict(record).items() if key != "provenance"},
                "labels": list(record.labels),
                "source_labels": list(record.source_labels),
                "mask_labels": None if record.mask_labels is None else list(record.mask_labels),
                **({"provenance": record.provenance} if record.provenance else {}),
            }
            for record in manifest.records
        ],
    }
    write_json(path, payload)


def load_manifest(path: Path) -> Manifest:
    """Read and check a manifest: known format, unique ids, labels in range, paths inside root."""
    path = Path(path)
    payload = read_json(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DataError(path, f"not a {FORMAT} manifest")
    try:
        class_names = tuple(str(name) for name in payload["class_names"])
        root = (path.parent / payload["images_root"]).resolve()
        person = payload["person_class"]
        entries = payload["images"]
        source = str(payload["source"])
    except (KeyError, TypeError) as error:
        raise DataError(path, f"manifest lacks field {error}") from None
    if person is not None and not (0 < person < len(class_names)):
        raise DataError(path, f"person_class {person} is not a class id")
    records = []
    seen: set[str] = set()
    for position, entry in enumerate(entries):
        record = _parse_record(entry, position, path, len(class_names))
        if record.id in seen:
            raise DataError(path, f"image id {record.id!r} appears twice")
        seen.add(record.id)
        resolve_inside(root, record.image, listed_in=path)
        if record.mask is not None:
            resolve_inside(root, record.mask, listed_in=path)
        records.append(record)
    return Manifest(source, class_names, person, tuple(records), root)


def _parse_record(entry: Any, position: int, path: Path, num_classes: int) -> ImageRecord:
    where = f"images[{position}]"
    try:
        record = ImageRecord(
            id=str(entry["id"]),
            subset=str(entry["subset"]),
            image=str(entry["image"]),
            mask=None if entry.get("mask") is None else str(entry["mask"]),
            labels=tuple(int(label) for label in entry["labels"]),
            source_labels=tuple(int(label) for label in entry.get("source_labels", entry["labels"])),
            mask_labels=None if entry.get("mask_labels") is None else tuple(int(label) for label in entry["mask_labels"]),
            provenance=dict(entry.get("provenance", {})),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(path, f"{where}: malformed entry ({error!r})") from None
    if record.subset not in SUBSETS:
        raise DataError(path, f"{where} ({record.id}): unknown subset {record.subset!r}")
    for label in (*record.labels, *record.source_labels, *(record.mask_labels or ())):
        if not 0 < label < num_classes:
            raise DataError(path, f"{where} ({record.id}): label {label} is not a class id 1..{num_classes - 1}")
    return record
