"""Every bad input stops `wsss prepare` with a message naming the file, exit code 2, no output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_document
from sources_fixtures import mask_with, write_lid, write_voc

from wsss.cli import EXIT_USER_ERROR, main
from wsss.data.manifest import load_manifest
from wsss.errors import DataError
from wsss.io import write_mask_png

PERSON = 15
GOOD_TRAIN = {"a1": [PERSON, 2], "a2": [1]}
GOOD_VAL = {"b1": [3]}


def break_corrupt(voc: Path) -> str:
    (voc / "JPEGImages/a2.jpg").write_bytes(b"this is not a JPEG file at all")
    return "JPEGImages/a2.jpg: not an image file"


def break_truncated(voc: Path) -> str:
    path = voc / "JPEGImages/a1.jpg"
    path.write_bytes(path.read_bytes()[:200])
    return "JPEGImages/a1.jpg: corrupt or truncated"


def break_missing(voc: Path) -> str:
    (voc / "JPEGImages/b1.jpg").unlink()
    return "JPEGImages/b1.jpg: file listed but missing"


def break_mask_size(voc: Path) -> str:
    write_mask_png(voc / "SegmentationClass/a1.png", mask_with([2], height=10))
    return "SegmentationClass/a1.png: mask size 20x10 differs from its image's 20x16"


def break_mask_value(voc: Path) -> str:
    mask = mask_with([2])
    mask[10, 10] = 50
    write_mask_png(voc / "SegmentationClass/a2.png", mask)
    return "SegmentationClass/a2.png: mask values [50] are neither class ids"


def break_no_label(voc: Path) -> str:
    write_mask_png(voc / "SegmentationClass/b1.png", np.zeros((16, 20), np.uint8))
    return "SegmentationClass/b1.png: image has no label"


def break_outside(voc: Path) -> str:
    (voc / "ImageSets/Segmentation/train.txt").write_text("a1\n../../escape\n")
    return "points outside the dataset root"


def break_duplicate(voc: Path) -> str:
    (voc / "ImageSets/Segmentation/val.txt").write_text("b1\na1\n")
    return "image id 'a1' is listed more than once"


@pytest.mark.parametrize("breaker", [break_corrupt, break_truncated, break_missing, break_mask_size, break_mask_value,
                                     break_no_label, break_outside, break_duplicate])
def test_bad_voc_input_fails_cleanly(tmp_path, project, mlflow_store, capsys, breaker):
    voc = write_voc(tmp_path / "VOC2012", GOOD_TRAIN, GOOD_VAL)
    expected = breaker(voc)
    _use_source(project, "voc", voc)
    assert main(["prepare", "--root", str(project)]) == EXIT_USER_ERROR
    assert expected in capsys.readouterr().err
    _assert_no_output(project)


def test_unknown_person_class_is_named(tmp_path, project, mlflow_store, capsys):
    voc = write_voc(tmp_path / "VOC2012", GOOD_TRAIN, GOOD_VAL)
    _use_source(project, "voc", voc, person_class="human")
    assert main(["prepare", "--root", str(project)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "data.person_class: 'human' is not a class of the voc dataset" in err
    _assert_no_output(project)


@pytest.mark.parametrize(
    ("train", "expected"),
    [
        ([["n01/x1", [1]], ["n01/x2", [7]]], "train.json: entry 1 (n01/x2): unknown class id in [7]"),
        ([["n01/x1", [1]], ["n01/x2", []]], "n01/x2.JPEG: image has no label"),
        ([["n01/x1", [1]], ["../../../../../outside", [1]]], "points outside the dataset root"),
        ([["n01/x1", [1]], ["/etc/hostname", [1]]], "is absolute"),
        ([["n01/x1", [1]], {"path": "n01/x2"}], "entry 1 is not [relative_path, [labels]]"),
    ],
)
def test_bad_lid_input_fails_cleanly(tmp_path, project, mlflow_store, capsys, train, expected):
    lid = write_lid(tmp_path / "LID", [e for e in train if isinstance(e, list)], {"v1": [1]})
    (lid / "ILSVRC/Data/DET/train/train.json").write_text(json.dumps(train))
    _use_source(project, "lid", lid)
    assert main(["prepare", "--root", str(project)]) == EXIT_USER_ERROR
    assert expected in capsys.readouterr().err
    _assert_no_output(project)


def test_manifest_paths_cannot_leave_the_dataset_root(tmp_path):
    manifest = {
        "format": "wsss-manifest/1", "source": "x", "images_root": ".", "class_names": ["background", "a"],
        "person_class": None,
        "images": [{"id": "i", "subset": "train", "image": "../secret.png", "mask": None, "labels": [1]}],
    }
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="points outside the dataset root"):
        load_manifest(path)
    manifest["images"][0]["image"] = "images/ok.png"
    manifest["images"][0]["labels"] = [4]
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"label 4 is not a class id"):
        load_manifest(path)


def test_split_without_prepared_data_names_the_missing_file(project, mlflow_store, capsys):
    assert main(["split", "--root", str(project)]) == EXIT_USER_ERROR
    assert "data/prepared/manifest.json: file not found" in capsys.readouterr().err
    assert not (project / "data/splits").exists() and not (project / "metrics/data.json").exists()


def _use_source(project: Path, source: str, root: Path, person_class: str = "person") -> None:
    document = make_document({"data.source": source, "data.root": str(root), "data.person_class": person_class})
    (project / "params.yaml").write_text(yaml.safe_dump(document))


def _assert_no_output(project: Path) -> None:
    assert not (project / "data/prepared").exists()
    assert not list((project / "data").glob(".prepared.tmp-*"))
    assert not (project / "metrics/prepare.json").exists()
