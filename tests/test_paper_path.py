"""The paper's configuration, piece by piece: VGG16-BN-D1 under IRNet, ImageNet weights that cannot be
downloaded, local weight files, augmentation of label maps, datasets of one's own, no person class,
and the code a stage runs as part of its checkpoint fingerprint."""

from __future__ import annotations

import json
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from conftest import make_document
from sources_fixtures import write_voc

from wsss import augment, provenance
from wsss.affinity import half_plane_offsets
from wsss.cli import main
from wsss.config import ConfigError, load_params, validate_params
from wsss.data.manifest import load_manifest
from wsss.errors import DataError
from wsss.irnet import grid_labels, irnet_losses
from wsss.models.classifier import build_classifier
from wsss.models.irnet import IRNet, classifier_stages, resnet50_stages
from wsss.segmentation import segmentation_transform

VOC_OWN = {"data.source": "voc", "data.root": "voc", "data.person_label_drop": 0.0, "data.embedded": None,
           "data.balance.rule": "none"}


def test_irnet_on_the_vgg16_classifier_predicts_on_the_stride4_grid_of_its_labels(one_thread):
    classifier = build_classifier("vgg16_bn_d1", 3, extra_convs=1)
    model = IRNet(classifier_stages(classifier))
    images = torch.randn(2, 3, 38, 45)  # not multiples of 4 or 8
    labels = torch.randint(0, 3, (2, 38, 45))
    boundary, displacement = model(images)
    assert boundary.shape[-2:] == displacement.shape[-2:] == grid_labels(labels).shape[-2:] == (10, 12)
    losses = irnet_losses(model, images, labels, half_plane_offsets(3))
    assert torch.isfinite(losses["total"])
    losses["total"].backward()


@pytest.mark.parametrize("build", [lambda: augment.build_transform("strong", None),
                                   lambda: segmentation_transform("strong", None, (0.5, 2.0))])
def test_geometric_augmentation_marks_uncovered_label_pixels_ignore_never_background(build):
    transform = build()
    image = np.full((40, 40, 3), 128, dtype=np.uint8)
    label = np.full((40, 40), 3, dtype=np.uint8)  # every pixel known to be class 3
    seen = set()
    for seed in range(40):
        out = augment.apply(transform, image, seed, mask=label)["mask"]
        seen |= set(np.unique(out).tolist())
    assert 0 not in seen, "augmentation invented background"
    assert seen == {3, 255}


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """torchvision's download path with no network: an empty hub cache and a failing download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


@pytest.mark.parametrize(("build", "key"), [
    (lambda: build_classifier("vgg16_bn_d1", 2, 4, weights="imagenet"), "classifier.weights"),
    (lambda: resnet50_stages("imagenet"), "irnet.backbone_weights"),
])
def test_imagenet_weights_without_network_are_one_error_naming_the_key(offline_hub, build, key):
    with pytest.raises(ConfigError) as caught:
        build()
    message = str(caught.value)
    assert key in message and "URLError" in message and "local path" in message


def test_a_stage_without_network_exits_with_the_key_named(offline_hub, project, mlflow_store, capsys):
    document = make_document({"classifier.arch": "vgg16_bn_d1", "classifier.weights": "imagenet", "classifier.epochs": 1})
    (project / "params.yaml").write_text(yaml.safe_dump(document))
    assert main(["prepare", "--root", str(project)]) == 0
    assert main(["split", "--root", str(project)]) == 0
    assert main(["train-classifier", "--root", str(project)]) != 0
    error = capsys.readouterr().err
    assert "classifier.weights" in error and "Traceback" not in error
    assert not (project / "models/classifier/model.pt").exists()


def test_local_weight_files_load_whole_or_features_only_and_a_wrong_file_is_named(tmp_path):
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16_bn(weights=None)
    whole, features, own = tmp_path / "whole.pth", tmp_path / "features.pth", tmp_path / "own.pth"
    torch.save(vgg.state_dict(), whole)
    torch.save({f"features.{k}": v for k, v in vgg.features.state_dict().items()}, features)
    torch.save(vgg.features.state_dict(), own)
    for path in (whole, features, own):
        model = build_classifier("vgg16_bn_d1", 2, 1, weights=str(path))
        assert torch.equal(model.backbone[0].weight, vgg.features[0].weight)
    resnet = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), resnet)  # the wrong network
    with pytest.raises(ConfigError, match="irnet.backbone_weights"):
        resnet50_stages(str(resnet))
    with pytest.raises(ConfigError, match="classifier.weights"):
        build_classifier("vgg16_bn_d1", 2, 1, weights=str(resnet))
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")  # not a state dict at all
    for build, key in ((lambda p: resnet50_stages(p), "irnet.backbone_weights"), (lambda p: build_classifier("vgg16_bn_d1", 2, 1, p), "classifier.weights")):
        with pytest.raises(ConfigError, match=key):
            build(str(tmp_path / "tensor.pth"))


def _own_voc(project: Path) -> Path:
    """A VOC-format tree of one's own: classes 1 'tray', 2 'cup', 3 'spoon', no person."""
    train = {f"t{i}": [1 + i % 3] for i in range(6)}
    val = {f"v{i}": [1 + i % 3, 1 + (i + 1) % 3] for i in range(4)}
    return write_voc(project / "voc", train, val)


def test_a_voc_format_dataset_of_ones_own_with_no_person(project, mlflow_store, capsys):
    _own_voc(project)
    document = make_document({**VOC_OWN, "data.person_class": None, "data.voc.classes": ["tray", "cup", "spoon"]}, tiny=False)
    (project / "params.yaml").write_text(yaml.safe_dump(document))
    # the CPU default merges the person: without a person class that is refused by the first stage, naming the key
    assert main(["prepare", "--root", str(project)]) == 2
    assert "person.merge: true needs a person class" in capsys.readouterr().err
    assert not (project / "data/prepared").exists()
    document["person"]["merge"] = False
    (project / "params.yaml").write_text(yaml.safe_dump(document))
    assert main(["prepare", "--root", str(project)]) == 0
    assert "ablation.person" in capsys.readouterr().err  # a warning: the ablation's person cells will be refused
    assert main(["split", "--root", str(project)]) == 0
    manifest = load_manifest(project / "data/prepared/manifest.json")
    assert manifest.class_names == ("background", "tray", "cup", "spoon") and manifest.person_class is None
    train = load_manifest(project / "data/splits/train.json")
    assert sorted({label for r in train.records for label in r.labels}) == [1, 2, 3]  # nothing dropped
    # the ablation without a person: its person stages write "unavailable", a person cell is refused at its start
    assert main(["person-classifier", "--root", str(project)]) == 0
    assert json.loads((project / "metrics/person_classifier.json").read_text())["available"] is False
    assert main(["person-masks", "--root", str(project), "--masks", "ablation/masks/thr-1.6-person-false",
                 "--out", "ablation/masks/thr-1.6-person-true", "--metrics", "metrics/ablation/masks.json"]) == 0
    assert (project / "ablation/masks/thr-1.6-person-true/UNAVAILABLE.txt").is_file()
    assert main(["ablation-cell", "--root", str(project), "--encoder", "classifier", "--threshold", "1.6", "--person", "true",
                 "--masks", "ablation/masks/thr-1.6-person-true", "--model", "models/ablation/cell",
                 "--metrics", "metrics/ablation/cell.json"]) != 0
    assert "ablation.person" in capsys.readouterr().err
    assert not (project / "models/ablation/cell").exists()


def test_class_names_from_a_file_and_mask_values_beyond_them(project, mlflow_store, capsys):
    root = _own_voc(project)
    (root / "classes.txt").write_text("_background_\ntray\ncup\n")  # 'spoon' (3) missing: its masks are wrong
    document = make_document({**VOC_OWN, "data.person_class": "cup", "data.voc.classes": "classes.txt"}, tiny=False)
    (project / "params.yaml").write_text(yaml.safe_dump(document))
    assert main(["prepare", "--root", str(project)]) != 0
    error = capsys.readouterr().err
    assert "SegmentationClass/" in error and "[3]" in error and "0..2" in error
    assert not (project / "data/prepared").exists()


def test_class_list_file_is_read_inside_the_root(tmp_path):
    from wsss.data.sources import voc_class_names

    (tmp_path / "names.txt").write_text("background\ncat\n\ndog\n")
    assert voc_class_names(tmp_path, "names.txt") == ("background", "cat", "dog")
    assert voc_class_names(tmp_path, None)[15] == "person"
    with pytest.raises(DataError, match="outside"):
        voc_class_names(tmp_path, "../elsewhere.txt")
    (tmp_path / "twice.txt").write_text("cat\ncat\n")
    with pytest.raises(DataError, match="more than once"):
        voc_class_names(tmp_path, "twice.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="data.voc.classes"):
        voc_class_names(tmp_path, "folder")


@pytest.mark.parametrize(("overrides", "key"), [
    ({**VOC_OWN, "data.person_class": None, "data.person_label_drop": 0.5}, "data.person_label_drop"),
    ({"data.person_class": None, "data.person_label_drop": 0.0}, "data.person_class"),  # the embedded set needs its person
    ({**VOC_OWN, "data.voc.classes": ["cat", "cat"]}, "data.voc.classes"),
    ({**VOC_OWN, "data.voc.classes": ["background", "cat"]}, "data.voc.classes"),
    ({"segmenter.image_size": 60}, "segmenter.image_size"),  # the classifier encoder's stride 8 does not divide it
    ({"segmenter.encoder": "resnet18", "segmenter.output_stride": 16, "segmenter.image_size": 72}, "segmenter.image_size"),
    ({"segmenter.image_size": 72}, "ablation.smp_output_stride"),  # the grid's resnet18 cells at stride 16
])
def test_combinations_that_cannot_run_are_refused_with_their_key(overrides, key):
    with pytest.raises(ConfigError) as caught:
        validate_params(make_document(overrides, tiny=False))
    assert f": {key}: " in str(caught.value), str(caught.value)


# -- the code a stage runs is part of its checkpoint fingerprint

def _copy_source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(provenance.SOURCE_ROOT / "wsss", src / "wsss", ignore=shutil.ignore_patterns("__pycache__"))
    return src


def test_the_code_digest_follows_the_closure(tmp_path, monkeypatch):
    src = _copy_source(tmp_path)
    monkeypatch.setattr(provenance, "SOURCE_ROOT", src)
    provenance.clear_cache()
    files = {p.relative_to(src).as_posix() for p in provenance.output_code("wsss.stages.classifier")}
    assert {"wsss/stages/classifier.py", "wsss/classifier.py", "wsss/models/classifier.py", "wsss/augment.py"} <= files
    assert not files & {"wsss/stages/sweep.py", "wsss/config.py", "wsss/tracking.py", "wsss/random_walk.py"}
    before = provenance.code_digest("wsss.stages.classifier")
    with (src / "wsss/stages/sweep.py").open("a") as handle:
        handle.write("\n# unrelated edit\n")
    provenance.clear_cache()
    assert provenance.code_digest("wsss.stages.classifier") == before
    with (src / "wsss/augment.py").open("a") as handle:
        handle.write("\n# an edit the classifier runs\n")
    provenance.clear_cache()
    assert provenance.code_digest("wsss.stages.classifier") != before


def test_a_code_edit_retrains_and_an_unrelated_edit_reuses_the_checkpoint(project, mlflow_store, tmp_path, monkeypatch, one_thread):
    from wsss.stages.classifier import run_train_classifier

    document = make_document({"classifier.epochs": 1, "classifier.image_size": 32, "data.embedded.num_train": 40})
    (project / "params.yaml").write_text(yaml.safe_dump(document))
    assert main(["prepare", "--root", str(project)]) == 0
    assert main(["split", "--root", str(project)]) == 0
    params = load_params(project / "params.yaml")
    src = _copy_source(tmp_path)
    monkeypatch.setattr(provenance, "SOURCE_ROOT", src)

    def train():
        provenance.clear_cache()
        return run_train_classifier(params, project)

    assert train().resumed_from is None  # trained
    assert train().resumed_from == 2  # the same code: the finished checkpoint is taken
    with (src / "wsss/stages/ablation_report.py").open("a") as handle:
        handle.write("\n# an edit of code train_classifier does not run\n")
    assert train().resumed_from == 2
    with (src / "wsss/classifier.py").open("a") as handle:
        handle.write("\n# an edit of the training loop\n")
    assert train().resumed_from is None  # retrained, not the old code's weights
    provenance.clear_cache()


def test_the_segmenter_builds_on_the_vgg16_classifier_encoder(one_thread):
    from wsss.models.segmenter import SegmenterSpec, build_segmenter, padded_forward

    spec = SegmenterSpec("classifier", 4, output_stride=8, decoder_channels=16, classifier_arch="vgg16_bn_d1", classifier_extra_convs=1)
    model = build_segmenter(spec).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4, 32, 32)
        assert padded_forward(model, torch.randn(1, 3, 37, 45)).shape == (1, 4, 37, 45)
