"""``prepare``: the chosen source as ``data/prepared/manifest.json`` (and, for the embedded source,
the images and masks it generates).

A VOC or LID tree is not copied: the manifest's records point into ``data.root`` (paths relative to
it, checked to stay inside) and record each file's MD5 (``provenance.image_md5`` / ``mask_md5``), so
the pipeline's lineage follows the files without a second copy of the dataset for DVC to hash and
cache. Every image is decoded completely and every mask checked (same size as its image, values
class ids or 255) before the manifest is written; it appears only when all of it is valid
(:func:`wsss.io.atomic_dir`). Training images' person labels are then removed with probability
``data.person_label_drop``: the missing-label noise of LID (set 0 for real LID data).
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from wsss.config import DataParams, Params
from wsss.data import embedded
from wsss.data.fashion_mnist import SUBSET_FILE, load_pools
from wsss.data.manifest import ImageRecord, Manifest, save_manifest
from wsss.data.sources import SourceItem, SourceListing, read_lid, read_voc
from wsss.errors import ConfigError, DataError
from wsss.io import IGNORE_INDEX, atomic_dir, ensure_inside, file_md5, read_image, read_mask, write_image_png, write_mask_png

MANIFEST_NAME = "manifest.json"
_NOISE_STREAM = 7


def labels_in_mask(mask: np.ndarray) -> tuple[int, ...]:
    """Class ids present in a mask (background 0 and ignore 255 excluded)."""
    return tuple(int(value) for value in np.unique(mask) if value not in (0, IGNORE_INDEX))


def check_mask(mask: np.ndarray, image_shape: tuple[int, int], num_classes: int, path: Path) -> None:
    """Raise :class:`DataError` if ``mask`` does not fit its image or holds unknown values."""
    if mask.shape != image_shape:
        raise DataError(path, f"mask size {mask.shape[1]}x{mask.shape[0]} differs from its image's {image_shape[1]}x{image_shape[0]}")
    values = np.unique(mask)
    bad = [int(v) for v in values if v >= num_classes and v != IGNORE_INDEX]
    if bad:
        raise DataError(path, f"mask values {bad} are neither class ids 0..{num_classes - 1} nor {IGNORE_INDEX}")


def drop_person_labels_randomly(records: list[ImageRecord], person: int, probability: float, seed: int) -> list[ImageRecord]:
    """Remove ``person`` from each training record's labels with ``probability`` (LID-like noise)."""
    if probability <= 0:
        return records
    rng = np.random.default_rng([seed, _NOISE_STREAM])
    noisy = []
    for record in records:
        draw = rng.uniform()  # one draw per record keeps the stream aligned across records
        if record.subset == "train" and person in record.labels and draw < probability:
            labels = tuple(label for label in record.labels if label != person)
            record = replace(record, labels=labels, source_labels=labels)
        noisy.append(record)
    return noisy


def _person_id(class_names: tuple[str, ...], data: DataParams) -> int | None:
    if data.person_class is None:  # a dataset without a class of unreliable labels
        return None
    if data.person_class not in class_names[1:]:
        raise ConfigError("params.yaml", [("data.person_class", f"{data.person_class!r} is not a class of the {data.source} dataset (classes: {', '.join(class_names[1:])})")])
    return class_names.index(data.person_class)


def _prepare_embedded(params: Params, root: Path, staging: Path) -> tuple[tuple[str, ...], list[ImageRecord]]:
    spec = params.data.embedded
    pools = load_pools(root / SUBSET_FILE)
    class_names = ("background", *spec.classes)
    records = []
    for subset, count in (("train", spec.num_train), ("heldout", spec.num_heldout)):
        composites = embedded.generate(spec, pools, subset, count, params.data.seed, params.data.person_class)
        for index, composite in enumerate(tqdm(composites, total=count, desc=f"prepare {subset}", unit="img")):
            image_id = f"{subset}_{index:05d}"
            write_image_png(staging / "images" / f"{image_id}.png", composite.image)
            write_mask_png(staging / "masks" / f"{image_id}.png", composite.mask)
            labels = labels_in_mask(composite.mask)
            if not labels:
                raise DataError(staging / "masks" / f"{image_id}.png", "generated image has no object; lower data.embedded.min_visible or the object scales")
            records.append(ImageRecord(image_id, subset, f"images/{image_id}.png", f"masks/{image_id}.png", labels, labels, labels, {"objects": composite.objects}))
    return class_names, records


def _checked_record(item: SourceItem, root: Path, num_classes: int) -> ImageRecord:
    """Verify one source image (and mask) in place; return its record, paths relative to ``root``."""
    image = read_image(item.image)
    image_name = ensure_inside(root, item.image, listed_in=item.image).relative_to(root).as_posix()
    provenance = {**item.provenance, "image_md5": file_md5(item.image)}
    mask_name, mask_labels = None, None
    if item.mask is not None:
        mask = read_mask(item.mask)
        check_mask(mask, image.shape[:2], num_classes, item.mask)
        mask_name = ensure_inside(root, item.mask, listed_in=item.mask).relative_to(root).as_posix()
        mask_labels = labels_in_mask(mask)
        provenance["mask_md5"] = file_md5(item.mask)
    labels = item.labels if item.labels is not None else mask_labels
    if not labels:
        raise DataError(item.mask or item.image, "image has no label (no class given and none in its mask)")
    return ImageRecord(item.id, item.subset, image_name, mask_name, labels, labels, mask_labels, provenance)


def _prepare_files(listing: SourceListing, root: Path, workers: int, chunk: int = 256) -> list[ImageRecord]:
    duplicates = [image_id for image_id, n in Counter(item.id for item in listing.items).items() if n > 1]
    if duplicates:
        first = next(item for item in listing.items if item.id == duplicates[0])
        raise DataError(first.image, f"image id {duplicates[0]!r} is listed more than once")
    records: list[ImageRecord] = []
    # chunks: a bad file stops the stage after at most one chunk of work, not after all of it
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(total=len(listing.items), desc="prepare", unit="img") as progress:
        for start in range(0, len(listing.items), chunk):
            batch = listing.items[start : start + chunk]
            records.extend(pool.map(lambda item: _checked_record(item, root, len(listing.class_names)), batch))
            progress.update(len(batch))
    return records


def prepare_dataset(params: Params, root: Path, out_dir: Path, workers: int | None = None) -> Manifest:
    """Build ``out_dir`` from ``params.data``: ``manifest.json`` pointing into ``root`` for a VOC or
    LID tree; images/, masks/ and the manifest for the embedded source. All or nothing."""
    data = params.data
    root = Path(root).resolve()
    with atomic_dir(Path(out_dir)) as staging:
        if data.source == "embedded":
            (staging / "images").mkdir()
            (staging / "masks").mkdir()
            class_names, records = _prepare_embedded(params, root, staging)
            images_root, final_root = staging, Path(out_dir).resolve()
        else:
            listing = read_voc(root, data.voc) if data.source == "voc" else read_lid(root, data.lid)
            _person_id(listing.class_names, data)  # fail before reading every file
            class_names = listing.class_names
            records = _prepare_files(listing, root, workers or os.cpu_count() or 1)
            images_root = final_root = root
        person = _person_id(class_names, data)
        if person is not None:
            records = drop_person_labels_randomly(records, person, data.person_label_drop, data.seed)
        save_manifest(Manifest(data.source, class_names, person, tuple(records), images_root), staging / MANIFEST_NAME)
    return Manifest(data.source, class_names, person, tuple(records), final_root)
