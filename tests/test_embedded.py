from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from conftest import FASHION_SUBSET, make_params

from wsss.data.embedded import generate, render_object
from wsss.data.fashion_mnist import load_pools
from wsss.data.manifest import load_manifest
from wsss.data.prepare import prepare_dataset
from wsss.io import content_hash, read_image, read_mask


@pytest.fixture(scope="module")
def pools():
    return load_pools(FASHION_SUBSET)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, project):
    """data.seed makes the dataset; the training seed leaves it alone (seed runs share prepare and split)."""
    params = make_params()
    source = project / "data/sources/fashion-mnist"
    prepare_dataset(params, source, tmp_path / "a")
    prepare_dataset(params, source, tmp_path / "b")
    prepare_dataset(make_params({"data.seed": params.data.seed + 1}), source, tmp_path / "c")
    prepare_dataset(make_params({"seed": params.seed + 1}), source, tmp_path / "d")
    assert content_hash(tmp_path / "a") == content_hash(tmp_path / "b") == content_hash(tmp_path / "d")
    assert content_hash(tmp_path / "a") != content_hash(tmp_path / "c")


def test_object_mask_is_exactly_the_nonzero_pixels(pools):
    rng = np.random.default_rng(0)
    for grey in pools["train"].images[:50]:
        rgb, mask = render_object(rng, grey, 28)  # no resizing: the mask must be grey > 0
        assert np.array_equal(mask, grey > 0)
        assert rgb.shape == (28, 28, 3)


def test_prepared_images_masks_labels_and_object_sources(tmp_path, project):
    params = make_params()
    manifest = prepare_dataset(params, project / "data/sources/fashion-mnist", tmp_path / "prepared")
    assert len(manifest.subset("train")) == 80 and len(manifest.subset("heldout")) == 24
    assert manifest.class_names[0] == "background"
    assert manifest.class_names[manifest.person_class] == "coat"
    reloaded = load_manifest(tmp_path / "prepared/manifest.json")
    assert reloaded.records == manifest.records
    for record in manifest.records:
        image = read_image(manifest.image_path(record))
        mask = read_mask(manifest.mask_path(record))
        assert image.shape == (32, 32, 3) and mask.shape == (32, 32)
        present = tuple(int(v) for v in np.unique(mask) if v)
        assert record.mask_labels == present  # labels derive from the mask
        assert set(record.labels) <= set(present)
        assert set(present) - set(record.labels) <= {manifest.person_class}  # only person may be missing
        wanted_split = "train" if record.subset == "train" else "test"
        assert {obj["fm_split"] for obj in record.provenance["objects"]} == {wanted_split}


def test_person_is_frequent_and_overlapped_head_classes_dominate(pools):
    params = make_params({"data.embedded.image_size": 48}).data.embedded
    composites = list(generate(params, pools, "train", 300, seed=3, person_class="coat"))
    with_person = [c for c in composites if c.objects and c.objects[0]["class"] == "coat"]
    assert abs(len(with_person) / len(composites) - params.person_frequency) < 0.1

    def box(obj):
        return obj["top"], obj["left"], obj["top"] + obj["side"], obj["left"] + obj["side"]

    def overlaps(a, b):
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    overlapped = [c for c in with_person if any(overlaps(box(c.objects[0]), box(o)) for o in c.objects[1:])]
    assert len(overlapped) > 0.8 * len(with_person)

    counts = Counter(obj["class"] for c in composites for obj in c.objects if obj["class"] != "coat")
    head = np.mean([counts[name] for name in params.head_classes])
    tail = np.mean([counts[name] for name in params.classes if name not in params.head_classes and name != "coat"])
    assert head > 2.5 * tail


def test_every_object_stays_visible(pools):
    params = make_params({"data.embedded.min_visible": 0.6}).data.embedded
    class_ids = {name: i + 1 for i, name in enumerate(params.classes)}
    seen_occlusion = False
    for composite in generate(params, pools, "heldout", 60, seed=5, person_class="coat"):
        visible = np.bincount(composite.instances.ravel(), minlength=len(composite.objects) + 1)
        for number, obj in enumerate(composite.objects, start=1):
            assert visible[number] >= 0.6 * obj["area"]
            seen_occlusion |= visible[number] < obj["area"]
            assert (composite.mask[composite.instances == number] == class_ids[obj["class"]]).all()
    assert seen_occlusion  # objects do overlap; the rule is what keeps them visible
