from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_params

from wsss.config import BalanceParams
from wsss.data.manifest import ImageRecord, Manifest, load_manifest
from wsss.data.prepare import drop_person_labels_randomly, prepare_dataset
from wsss.data.split import balance, balance_cap, class_counts, split_records, write_splits

PERSON = 3


def record(index: int, labels, subset="train", mask_labels=None) -> ImageRecord:
    labels = tuple(labels)
    return ImageRecord(f"{subset}_{index}", subset, f"images/{index}.png", f"masks/{index}.png", labels, labels,
                       tuple(mask_labels) if mask_labels is not None else labels)


def long_tail_records() -> list[ImageRecord]:
    rng = np.random.default_rng(0)
    records = []
    for index in range(400):
        head = rng.uniform() < 0.7
        labels = {1} if head else {int(rng.integers(2, 5))}
        if rng.uniform() < 0.3:
            labels.add(int(rng.integers(1, 5)))
        records.append(record(index, sorted(labels)))
    return records


def test_balance_cap_rules():
    counts = {1: 100, 2: 10, 3: 0, 4: 30}
    assert balance_cap(counts, BalanceParams(rule="min", factor=2.0)) == 20
    assert balance_cap(counts, BalanceParams(rule="median", factor=1.5)) == 45  # median of 100, 10, 30
    assert balance_cap(counts, BalanceParams(rule="none", factor=1.0)) is None


@pytest.mark.parametrize("rule", ["min", "median"])
def test_balancing_caps_every_class_and_keeps_the_tail(rule):
    records = long_tail_records()
    before = class_counts(records, 5)
    cap = balance_cap(before, BalanceParams(rule=rule, factor=1.5))
    kept = balance(records, cap, 5, seed=1)
    after = class_counts(kept, 5)
    assert max(after.values()) <= cap
    assert before[1] > cap  # the head class really was cut
    rarest = min((c for c in before if before[c]), key=before.get)
    assert after[rarest] == min(before[rarest], cap)  # the rarest class loses nothing it may keep
    assert balance(records, cap, 5, seed=1) == kept  # seeded


def test_random_person_label_drop_only_touches_train_person_labels():
    records = [record(i, [1, PERSON]) for i in range(1000)] + [record(i, [2, PERSON], "heldout") for i in range(50)]
    noisy = drop_person_labels_randomly(records, PERSON, 0.5, seed=4)
    train = [r for r in noisy if r.subset == "train"]
    rate = sum(PERSON not in r.labels for r in train) / len(train)
    assert abs(rate - 0.5) < 0.05
    assert all(1 in r.labels for r in train)
    assert all(PERSON in r.labels for r in noisy if r.subset == "heldout")
    assert all(r.source_labels == r.labels for r in noisy)  # the noise is part of the source
    assert drop_person_labels_randomly(records, PERSON, 0.5, seed=4) == noisy


def _manifest(records) -> Manifest:
    return Manifest("test", ("background", "a", "b", "person", "c"), PERSON, tuple(records), Path("/nonexistent"))


def test_split_drops_person_sets_aside_unlabelled_and_divides_heldout():
    train = [record(0, [1, PERSON]), record(1, [PERSON]), record(2, [2]), record(3, [4, PERSON])]
    heldout = [record(i, [1], "heldout", mask_labels=[1, PERSON]) for i in range(10)]
    params = make_params({"data.balance.rule": "none", "data.test_fraction": 0.3})
    result = split_records(_manifest(train + heldout), params)
    assert result.unlabelled == 1
    assert [r.id for r in result.train] == ["train_0", "train_2", "train_3"]
    assert all(PERSON not in r.labels for r in result.train)
    assert result.train[0].source_labels == (1, PERSON)  # kept for the person classifier
    assert len(result.test) == 3 and len(result.val) == 7
    assert {r.id for r in result.val} | {r.id for r in result.test} == {r.id for r in heldout}
    assert all(r.labels == (1, PERSON) for r in result.val + result.test)  # labels from the masks
    assert {r.subset for r in result.val} == {"val"} and {r.subset for r in result.test} == {"test"}
    again = split_records(_manifest(train + heldout), params)
    assert [r.id for r in again.test] == [r.id for r in result.test]
    kept = split_records(_manifest(train + heldout), make_params({"data.drop_person_labels": False}))
    assert any(PERSON in r.labels for r in kept.train)


def test_observed_person_drop_rate_matches_the_parameter(tmp_path, project):
    params = make_params({"data.embedded.num_train": 500, "data.embedded.image_size": 24,
                          "data.embedded.person_frequency": 0.6, "data.person_label_drop": 0.3})
    manifest = prepare_dataset(params, project / "data/sources/fashion-mnist", tmp_path / "prepared")
    result = split_records(manifest, params)
    assert abs(result.person_drop_rate - 0.3) <= 0.05
    assert max(result.counts_after.values()) <= result.cap

    write_splits(manifest, result, tmp_path / "splits")
    for name in ("train", "val", "test"):
        loaded = load_manifest(tmp_path / "splits" / f"{name}.json")
        assert loaded.root == (tmp_path / "prepared").resolve()
        assert [r.id for r in loaded.records] == [r.id for r in getattr(result, name)]
        assert all(loaded.image_path(r).is_file() for r in loaded.records)
