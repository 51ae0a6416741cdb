"""``split``: person labels out, classes balanced by downsampling, held-out pool into val/test.

Train (the weakly labelled images): the person class's labels are removed when
``data.drop_person_labels`` (the paper removes them: they are too often missing to trust), images
left with no label are set aside, then classes are balanced by downsampling (:func:`balance`).
Held-out (images with masks): divided into ``val`` and ``test`` with the seed; their labels come
from their masks (complete, person included), for evaluation only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from wsss.config import BalanceParams, Params
from wsss.data.manifest import ImageRecord, Manifest, save_manifest
from wsss.io import atomic_dir

SPLITS = ("train", "val", "test")
_BALANCE_STREAM = 11
_HELDOUT_STREAM = 13


@dataclass(frozen=True)
class SplitResult:
    train: list[ImageRecord]
    val: list[ImageRecord]
    test: list[ImageRecord]
    counts_before: dict[int, int]  # per class, train images after the person drop, before balancing
    counts_after: dict[int, int]
    cap: int | None
    unlabelled: int  # train images left without any label by the person drop
    person_drop_rate: float | None  # observed share of person-containing train images lacking the label


def class_counts(records: list[ImageRecord], num_classes: int) -> dict[int, int]:
    """Number of images that carry each label (1..num_classes-1)."""
    counts = dict.fromkeys(range(1, num_classes), 0)
    for record in records:
        for label in record.labels:
            counts[label] += 1
    return counts


def balance_cap(counts: dict[int, int], rule: BalanceParams) -> int | None:
    """``factor`` times the rarest (``min``) or median (``median``) non-empty class count."""
    present = [count for count in counts.values() if count > 0]
    if rule.rule == "none" or not present:
        return None
    reference = min(present) if rule.rule == "min" else float(np.median(present))
    return max(1, math.floor(rule.factor * reference))


def balance(records: list[ImageRecord], cap: int | None, num_classes: int, seed: int) -> list[ImageRecord]:
    """Keep images, rarest classes first, while none of their labels has reached ``cap``.

    Images are visited in order of the count of their rarest label (ties in a seeded random
    order), so tail classes keep their images and head classes are cut down to the cap.
    """
    if cap is None:
        return list(records)
    counts = class_counts(records, num_classes)
    order = np.random.default_rng([seed, _BALANCE_STREAM]).permutation(len(records))
    order = sorted(order, key=lambda i: min(counts[label] for label in records[i].labels))
    kept_counts = dict.fromkeys(counts, 0)
    kept = set()
    for index in order:
        labels = records[index].labels
        if all(kept_counts[label] < cap for label in labels):
            kept.add(index)
            for label in labels:
                kept_counts[label] += 1
    return [record for i, record in enumerate(records) if i in kept]


def observed_person_drop_rate(records: list[ImageRecord], person: int) -> float | None:
    """Share of training images whose mask shows the person but whose given labels lack it."""
    with_person = [r for r in records if r.mask_labels is not None and person in r.mask_labels]
    if not with_person:
        return None
    return sum(person not in r.source_labels for r in with_person) / len(with_person)


def split_records(manifest: Manifest, params: Params) -> SplitResult:
    """Pure part of the ``split`` stage."""
    data = params.data
    person = manifest.person_class
    train_pool = manifest.subset("train")
    drop_rate = observed_person_drop_rate(train_pool, person) if person is not None else None

    if data.drop_person_labels and person is not None:
        train_pool = [r.with_labels(tuple(label for label in r.labels if label != person)) for r in train_pool]
    labelled = [r for r in train_pool if r.labels]
    counts_before = class_counts(labelled, manifest.num_classes)
    cap = balance_cap(counts_before, data.balance)
    train = balance(labelled, cap, manifest.num_classes, params.data.seed)

    heldout = [
        replace(r, labels=r.mask_labels, source_labels=r.mask_labels) if r.mask_labels else r
        for r in manifest.subset("heldout")
    ]
    order = np.random.default_rng([params.data.seed, _HELDOUT_STREAM]).permutation(len(heldout))
    num_test = min(len(heldout) - 1, max(1, round(data.test_fraction * len(heldout))))
    test_positions = set(order[:num_test].tolist())
    val = [replace(r, subset="val") for i, r in enumerate(heldout) if i not in test_positions]
    test = [replace(r, subset="test") for i, r in enumerate(heldout) if i in test_positions]

    return SplitResult(
        train=train,
        val=val,
        test=test,
        counts_before=counts_before,
        counts_after=class_counts(train, manifest.num_classes),
        cap=cap,
        unlabelled=len(train_pool) - len(labelled),
        person_drop_rate=drop_rate,
    )


def write_splits(manifest: Manifest, result: SplitResult, out_dir: Path) -> None:
    """Write ``train.json``, ``val.json`` and ``test.json`` manifests, all or nothing."""
    with atomic_dir(Path(out_dir)) as staging:
        for name in SPLITS:
            save_manifest(manifest.derive(getattr(result, name)), staging / f"{name}.json")
