"""Readers for the on-disk sources: PASCAL VOC 2012 and LID 2020 (as the authors' code reads it).

A reader only lists what the source holds (:class:`SourceItem`: paths inside ``data.root``,
given labels, subset); :mod:`wsss.data.prepare` verifies and materialises it.

VOC 2012 (``data.root`` = the ``VOC2012`` folder)::

    JPEGImages/<id>.jpg   <mask_dir>/<id>.png   ImageSets/Segmentation/{train,val}.txt

``mask_dir`` is ``SegmentationClass`` or ``SegmentationClassAug``; labels come from the masks.
``data.voc.classes`` names the classes of a VOC-format dataset of one's own (a list, or a text
file inside ``data.root``); without it the classes are VOC's 20.
The train list feeds ``train``, the val list the held-out pool that ``split`` divides into val
and test (VOC's test masks are not public).

LID 2020 (paths relative to ``data.root``): a JSON list ``[[relative_path, [label, ...]], ...]``
per split with 1-based class ids; the image is ``<list folder>/<relative_path>.JPEG``;
``idx_to_name.json`` beside the train list maps class index to name (keys ``"1".."N"``, or
``"0".."N-1"`` for labels 1..N); val masks are ``<val_masks>/<basename>.png`` with 0 = background.
A val entry with an empty label list takes its labels from its mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsss.config import LidParams, VocParams, check_class_names
from wsss.errors import DataError
from wsss.io import ensure_inside, read_json, resolve_inside

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


@dataclass(frozen=True)
class SourceItem:
    id: str
    subset: str  # "train" or "heldout"
    image: Path  # absolute, inside data.root
    mask: Path | None
    labels: tuple[int, ...] | None  # None: derive from the mask
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SourceListing:
    class_names: tuple[str, ...]  # index = class id, 0 = background
    items: list[SourceItem]


def _read_id_list(path: Path) -> list[str]:
    try:
        lines = path.read_text().split()
    except FileNotFoundError:
        raise DataError(path, "image list not found") from None
    if not lines:
        raise DataError(path, "image list is empty")
    return lines


def voc_class_names(root: Path, classes: list[str] | str | None) -> tuple[str, ...]:
    """Class names by id (0 = background): VOC's, the given list, or the lines of a file in ``root``."""
    if classes is None:
        return VOC_CLASSES
    if isinstance(classes, str):
        path = resolve_inside(root, classes, listed_in="params.yaml data.voc.classes")
        try:
            names = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        except FileNotFoundError:
            raise DataError(path, "class list not found (data.voc.classes)") from None
        except UnicodeDecodeError:
            raise DataError(path, "class list is not text (data.voc.classes)") from None
        except OSError as error:
            raise DataError(path, f"class list cannot be read (data.voc.classes): {error.strerror or error}") from None
        if names and names[0].lower() in ("background", "_background_"):
            names = names[1:]
        try:
            check_class_names(names)
        except ValueError as error:
            raise DataError(path, str(error).removeprefix("classes: ")) from None
        return ("background", *names)
    return ("background", *classes)


def read_voc(root: Path, params: VocParams) -> SourceListing:
    """List a VOC-format tree (images, masks, train/val lists) with its class names."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "data.root is not a folder (expected the VOC2012 folder)")
    class_names = voc_class_names(root, params.classes)
    items = []
    for subset, list_name in (("train", params.train_list), ("heldout", params.val_list)):
        list_path = resolve_inside(root, list_name, listed_in="params.yaml data.voc")
        for image_id in _read_id_list(list_path):
            image = resolve_inside(root, f"JPEGImages/{image_id}.jpg", listed_in=list_path)
            mask = resolve_inside(root, f"{params.mask_dir}/{image_id}.png", listed_in=list_path)
            items.append(SourceItem(image_id, subset, image, mask, None, {"list": list_name}))
    return SourceListing(class_names, items)


def _lid_class_names(path: Path) -> tuple[str, ...]:
    mapping = read_json(path)
    if isinstance(mapping, list):
        names = [str(name) for name in mapping]
    elif isinstance(mapping, dict):
        try:
            keyed = {int(key): str(name) for key, name in mapping.items()}
        except ValueError:
            raise DataError(path, "keys must be class indices") from None
        start = min(keyed, default=0)
        if start not in (0, 1) or sorted(keyed) != list(range(start, start + len(keyed))):
            raise DataError(path, "class indices must be contiguous from 0 or from 1")
        names = [keyed[index] for index in sorted(keyed)]
    else:
        raise DataError(path, "expected a mapping from class index to name")
    if len(set(names)) != len(names):
        raise DataError(path, "a class name appears twice")
    return ("background", *names)


def _lid_entries(root: Path, list_path: Path, subset: str, num_classes: int, masks: Path | None, extension: str) -> list[SourceItem]:
    entries = read_json(list_path)
    if not isinstance(entries, list) or not entries:
        raise DataError(list_path, "expected a non-empty JSON list of [relative_path, labels]")
    folder = list_path.parent
    items = []
    for position, entry in enumerate(entries):
        if not (isinstance(entry, list | tuple) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], list)):
            raise DataError(list_path, f"entry {position} is not [relative_path, [labels]]: {entry!r}")
        relative, labels = entry
        if any(not isinstance(label, int) or not 0 < label < num_classes for label in labels):
            raise DataError(list_path, f"entry {position} ({relative}): unknown class id in {labels} (valid: 1..{num_classes - 1})")
        if Path(relative).is_absolute():
            raise DataError(list_path, f"entry {position}: path {relative!r} is absolute; paths are relative to the list's folder")
        suffix = "" if Path(relative).suffix else extension
        image = ensure_inside(root, folder / f"{relative}{suffix}", listed_in=list_path)
        mask = None if masks is None else ensure_inside(root, masks / f"{Path(relative).stem}.png", listed_in=list_path)
        item_id = Path(relative).with_suffix("").as_posix().replace("/", "__")
        given = tuple(sorted(set(labels))) if labels or mask is None else None
        items.append(SourceItem(item_id, subset, image, mask, given, {"list": list_path.relative_to(root).as_posix()}))
    return items


def read_lid(root: Path, params: LidParams) -> SourceListing:
    """List a LID 2020 tree: train list with labels, val list with PNG masks."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(root, "data.root is not a folder (expected the LID data root)")
    train_list = resolve_inside(root, params.train_list, listed_in="params.yaml data.lid.train_list")
    val_list = resolve_inside(root, params.val_list, listed_in="params.yaml data.lid.val_list")
    val_masks = resolve_inside(root, params.val_masks, listed_in="params.yaml data.lid.val_masks")
    class_names = _lid_class_names(train_list.parent / "idx_to_name.json")
    items = _lid_entries(root, train_list, "train", len(class_names), None, params.image_extension)
    items += _lid_entries(root, val_list, "heldout", len(class_names), val_masks, params.image_extension)
    return SourceListing(class_names, items)
