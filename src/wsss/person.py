"""The person class of the ablation (the paper's Table 3, column "Person").

The main pipeline drops the person labels (too often missing to trust), so its pseudo masks never
contain the class. The ablation trains a separate binary classifier on the noisy person labels,
takes its CAM of the person class, and merges that map into the pseudo masks: in an image that
shows a person, background pixels whose person CAM reaches ``person.cam_threshold`` become person;
pixels already given to another class keep it (objects in front of a person stay themselves).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from wsss.data.manifest import Manifest
from wsss.errors import DataError

BINARY_CLASSES = ("background", "person")
PERSON = 1  # the person's id in the binary view


def person_view(manifest: Manifest, noisy: bool) -> Manifest:
    """``manifest`` as a binary person / no-person dataset (class 1 = the person class).

    ``noisy``: read the labels as the source gave them (training images, before ``split`` removed
    the person labels); otherwise the labels the split keeps (val/test: complete, from the masks)."""
    person = manifest.person_class
    if person is None:
        raise DataError(manifest.root, "the dataset has no person class (data.person_class): the person ablation needs one")
    records = [replace(r, labels=(PERSON,) if person in (r.source_labels if noisy else r.labels) else (), mask=None, mask_labels=None)
               for r in manifest.records]
    return replace(manifest, class_names=(BINARY_CLASSES[0], manifest.class_names[person]), person_class=None, records=tuple(records))


def shows_person(probability: float, labels: tuple[int, ...], person: int, presence_threshold: float) -> bool:
    """An image shows a person if it is labelled so (labels are only ever missing, never wrong)
    or if the person classifier says so."""
    return person in labels or probability >= presence_threshold


def merge_person(mask: np.ndarray, person_map: np.ndarray, person: int, cam_threshold: float) -> np.ndarray:
    """Background pixels of ``mask`` whose ``person_map`` (max-normalised CAM, same size) reaches
    ``cam_threshold`` become ``person``; every other pixel keeps its label."""
    if mask.shape != person_map.shape:
        raise ValueError(f"mask {mask.shape} and person map {person_map.shape} differ in size")
    peak = float(person_map.max()) if person_map.size else 0.0
    if peak <= 0:
        return mask.copy()
    merged = mask.copy()
    merged[(mask == 0) & (person_map / peak >= cam_threshold)] = person
    return merged
