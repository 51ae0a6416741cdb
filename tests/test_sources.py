from __future__ import annotations

import hashlib

import numpy as np
import pytest
from conftest import make_params
from sources_fixtures import write_lid, write_voc

from wsss.data.manifest import load_manifest
from wsss.data.prepare import prepare_dataset
from wsss.data.sources import VOC_CLASSES
from wsss.errors import DataError
from wsss.io import read_image, read_mask

PERSON_VOC = VOC_CLASSES.index("person")


def test_voc_reader_derives_labels_from_masks(tmp_path):
    voc = write_voc(tmp_path / "VOC2012", {"2007_000001": [PERSON_VOC, 12], "2007_000002": [1]}, {"2007_000003": [3, PERSON_VOC]})
    params = make_params({"data.source": "voc", "data.root": str(voc), "data.person_class": "person", "data.person_label_drop": 0.0})
    manifest = prepare_dataset(params, voc, tmp_path / "prepared", workers=2)
    assert manifest.class_names == VOC_CLASSES and manifest.person_class == PERSON_VOC
    by_id = {r.id: r for r in load_manifest(tmp_path / "prepared/manifest.json").records}
    assert by_id["2007_000001"].labels == (12, PERSON_VOC) and by_id["2007_000001"].subset == "train"
    assert by_id["2007_000003"].subset == "heldout" and by_id["2007_000003"].labels == (3, PERSON_VOC)
    record = by_id["2007_000002"]
    # no copy: the manifest points into the tree and records each file's MD5 (DVC's hash)
    assert not (tmp_path / "prepared/images").exists() and sorted(p.name for p in (tmp_path / "prepared").iterdir()) == ["manifest.json"]
    assert manifest.image_path(record) == (voc / "JPEGImages/2007_000002.jpg").resolve()
    assert record.provenance["image_md5"] == hashlib.md5((voc / "JPEGImages/2007_000002.jpg").read_bytes()).hexdigest()
    assert record.provenance["mask_md5"] == hashlib.md5(manifest.mask_path(record).read_bytes()).hexdigest()
    mask = read_mask(manifest.mask_path(record))
    assert set(np.unique(mask).tolist()) == {0, 1, 255}  # 255 kept as ignore


def test_a_voc_tree_whose_files_leave_the_root_through_a_link_is_refused(tmp_path):
    voc = write_voc(tmp_path / "VOC2012", {"2007_000001": [1]}, {"2007_000003": [3]})
    outside = tmp_path / "elsewhere"
    (voc / "JPEGImages").rename(outside)
    (voc / "JPEGImages").symlink_to(outside, target_is_directory=True)
    params = make_params({"data.source": "voc", "data.root": str(voc), "data.person_class": None, "data.person_label_drop": 0.0})
    with pytest.raises(DataError, match="outside the dataset root"):
        prepare_dataset(params, voc, tmp_path / "prepared", workers=1)
    assert not (tmp_path / "prepared").exists()


@pytest.mark.parametrize("idx_to_name", [{"1": "dog", "2": "person", "3": "bird"}, {"0": "dog", "1": "person", "2": "bird"}, ["dog", "person", "bird"]])
def test_lid_reader_lists_labels_and_val_masks(tmp_path, idx_to_name):
    lid = write_lid(tmp_path / "LID", [["n01/n01_1", [1, 2]], ["n02/n02_7", [3]]], {"ILSVRC2012_val_1": [2, 3]}, idx_to_name)
    params = make_params({"data.source": "lid", "data.root": str(lid), "data.person_class": "person", "data.person_label_drop": 0.0})
    manifest = prepare_dataset(params, lid, tmp_path / "prepared", workers=1)
    assert manifest.class_names == ("background", "dog", "person", "bird")
    assert manifest.person_class == 2
    by_id = {r.id: r for r in manifest.records}
    assert by_id["n01__n01_1"].labels == (1, 2) and by_id["n01__n01_1"].mask is None
    assert by_id["n02__n02_7"].labels == (3,)
    val = by_id["ILSVRC2012_val_1"]
    assert val.subset == "heldout" and val.labels == (2, 3)  # empty list: labels from the mask
    assert read_image(manifest.image_path(val)).shape == (16, 20, 3)
