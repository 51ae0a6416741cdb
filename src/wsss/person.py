"""The person class of the ablation (the paper's Table 3, column "Person").

The step-1 classifier never learns the person class (its labels are too often missing to trust,
and ``split`` drops them), so the walk's pseudo masks never contain it. A separate binary
classifier, trained on the noisy person labels, gives a person CAM, merged into the pseudo masks
(:class:`PersonMerge`; the main pipeline's ``pseudo_masks`` under ``person.merge``, the ablation's
``person_masks``): in an image that shows a person, background pixels whose person CAM reaches
``person.cam_threshold`` (or the map's own mean) become person; pixels already given to another class keep it (objects in
front of a person stay themselves); the dense CRF then refines the merged masks (``person.post_crf``).
In the main pipeline the person CAM also floors the walk's background seed (``person.background_seed``,
:meth:`PersonMerge.background_floor`): an object's CAM that spills over the person behind it would
otherwise walk into the person's region, where the merge cannot reach.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from wsss.config import CrfParams, PersonParams
from wsss.data.manifest import ImageRecord, Manifest
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


def best_f1_threshold(probability: np.ndarray, truth: np.ndarray) -> float:
    """The threshold on ``probability`` whose predictions ``probability >= t`` have the best F1 against the
    boolean ``truth`` (the lowest such t on ties; 0.5 when ``truth`` has no positive): every distinct
    probability is a candidate, the midpoint below it is returned so that a rerun's rounding does not flip it."""
    if not truth.any():
        return 0.5
    order = np.argsort(-probability, kind="stable")
    ranked, hits = probability[order], truth[order].astype(np.int64)
    true_positives = np.cumsum(hits)
    predicted = np.arange(1, len(ranked) + 1)
    last_of_value = np.r_[ranked[1:] != ranked[:-1], True]  # a threshold takes every image of its value
    f1 = np.where(last_of_value, 2 * true_positives / (predicted + int(truth.sum())), -1.0)
    cut = int(np.argmax(f1[::-1]))  # the last best position: the lowest threshold among ties
    position = len(f1) - 1 - cut
    below = ranked[position + 1] if position + 1 < len(ranked) else 0.0
    return float((ranked[position] + below) / 2)


def peak_normalised(person_map: np.ndarray) -> np.ndarray:
    """``person_map`` divided by its peak: 1 at the strongest pixel; all zeros for a map without a
    positive value."""
    peak = float(person_map.max()) if person_map.size else 0.0
    if peak <= 0:
        return np.zeros(person_map.shape, np.float32)
    return (person_map / peak).astype(np.float32)


def merge_person(mask: np.ndarray, person_map: np.ndarray, person: int, cam_threshold: float | str) -> np.ndarray:
    """Background pixels of ``mask`` whose ``person_map`` (max-normalised CAM, same size) reaches
    ``cam_threshold`` (> 0; ``"mean"``: the normalised map's own mean) become ``person``; every other
    pixel keeps its label. A map without a positive value changes nothing."""
    if mask.shape != person_map.shape:
        raise ValueError(f"mask {mask.shape} and person map {person_map.shape} differ in size")
    normalised = peak_normalised(person_map)
    if not normalised.any():
        return mask.copy()
    threshold = float(normalised.mean()) if cam_threshold == "mean" else cam_threshold
    merged = mask.copy()
    merged[(mask == 0) & (normalised >= threshold)] = person
    return merged


def person_floor(person_map: np.ndarray, weight: float) -> np.ndarray:
    """``weight`` x ``person_map`` divided by its peak (all zeros for a map without a positive value)."""
    return weight * peak_normalised(person_map)


# Whose word decides that an image shows a person: ``noisy`` (training images: their source labels,
# which only ever miss a person, or the person classifier), ``labels`` (val with its image labels,
# as every other class of the val pseudo masks) or ``predicted`` (the person classifier alone: an
# image nobody labelled)
Presence = Literal["noisy", "labels", "predicted"]


@dataclass(frozen=True)
class PersonMerge:
    """The person CAMs of a ``person_classifier`` stage (``cams_root/<split>/`` shards and its
    ``index.json``'s probabilities) merged into pseudo masks, then refined by the dense CRF."""

    cams_root: Path
    probability: dict[str, dict[str, float]]  # split -> image id -> P(person)
    person: int
    config: PersonParams
    crf: CrfParams
    presence_threshold: float  # person.presence_threshold, or under auto the one the person_classifier stage chose on val
    _stores: dict = field(default_factory=dict, compare=False, repr=False)  # split -> CamStore, opened once

    @classmethod
    def of_folder(cls, cams_root: Path, person: int, config: PersonParams, crf: CrfParams) -> PersonMerge:
        """The merge of the person CAMs a ``person_classifier`` stage wrote into ``cams_root``."""
        from wsss.io import read_json

        index_path = Path(cams_root) / "index.json"
        if not index_path.is_file():
            raise DataError(index_path, "no person CAMs: run the person_classifier stage first "
                                        "(`dvc repro person_classifier`), or set person.merge: false")
        index = read_json(index_path)
        if not index.get("available", True) or "probability" not in index:
            raise DataError(index_path, "no person CAMs in this folder (re-run the person_classifier stage)")
        threshold = config.presence_threshold
        if threshold == "auto":
            if "presence_threshold" not in index:
                raise DataError(index_path, "no presence threshold chosen on val (person.presence_threshold: auto): "
                                            "re-run the person_classifier stage")
            threshold = float(index["presence_threshold"])
        return cls(Path(cams_root), index["probability"], person, config, crf, threshold)

    def _store(self, split: str):
        from wsss.cam import CamStore

        if split not in self._stores:
            self._stores[split] = CamStore(self.cams_root / split)
        return self._stores[split]

    def background_floor(self, split: str, record: ImageRecord, size: tuple[int, int], presence: Presence) -> np.ndarray | None:
        """The floor of the walk's background seed for one image (``person.background_seed``):
        ``background_seed`` x its person CAM (max-normalised, ``size``) if it shows a person, else ``None``."""
        weight = self.config.background_seed
        if weight <= 0 or not self.shows_person(split, record, presence):
            return None
        return person_floor(self._store(split).load(record.id, expected_size=size).full[0], weight)

    def shows_person(self, split: str, record: ImageRecord, presence: Presence) -> bool:
        if presence == "labels":
            return self.person in record.labels
        try:
            probability = float(self.probability[split][record.id])
        except KeyError:
            raise DataError(self.cams_root / "index.json", f"no person probability for {split} image {record.id}") from None
        if presence == "predicted":
            return probability >= self.presence_threshold
        return shows_person(probability, record.source_labels, self.person, self.presence_threshold)

    def apply(self, split: str, records: list[ImageRecord], image_of: Callable[[int], np.ndarray], masks: list[np.ndarray],
              presence: Presence) -> tuple[list[np.ndarray], int]:
        """``masks`` (of ``records``, in order) with the person merged in where the image shows one,
        those refined by the CRF under ``person.post_crf`` (``image_of(position)``: the record's image);
        and how many images were given a person."""
        from wsss.crf import CrfTask, crf_many

        store = self._store(split)
        merged, changed = list(masks), []
        for position, record in enumerate(records):
            if self.shows_person(split, record, presence):
                person_map = store.load(record.id, expected_size=masks[position].shape).full[0]
                merged[position] = merge_person(masks[position], person_map, self.person, self.config.cam_threshold)
                changed.append(position)
        if self.config.post_crf and changed:
            tasks = [CrfTask(str(p), image_of(p), merged[p]) for p in changed]
            for name, refined in crf_many(tasks, self.crf):
                merged[int(name)] = refined
        return merged, len(changed)
