"""Step 1 on tiny data: classifier training and resume, the cams stage, MLflow and bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from conftest import make_document, make_params

from wsss import checkpoint
from wsss.cam import CamStore
from wsss.cam_inference import evaluate_cams
from wsss.classifier import BEST, LAST, train_classifier, trained_class_ids
from wsss.cli import main
from wsss.data.manifest import load_manifest
from wsss.errors import DataError
from wsss.io import IGNORE_INDEX, read_image

STEP1 = {"classifier.epochs": 3, "classifier.batch_size": 16, "classifier.image_size": 32,
         "cams.scales": [1.0, 0.5], "cams.num_overlays": 2, "crf.bilateral_sxy": 10, "crf.workers": 1}


@pytest.fixture
def split_project(project: Path, mlflow_store) -> Path:
    (project / "params.yaml").write_text(yaml.safe_dump(make_document(STEP1)))
    assert main(["prepare", "--root", str(project)]) == 0
    assert main(["split", "--root", str(project)]) == 0
    return project


class Interrupt(Exception):
    pass


def test_resume_after_a_crash_gives_the_weights_of_an_uninterrupted_run(split_project, tmp_path):
    params = make_params(STEP1)
    train = load_manifest(split_project / "data/splits/train.json")
    val = load_manifest(split_project / "data/splits/val.json")

    uninterrupted = train_classifier(params, train, val, tmp_path / "a", "fp")

    def crash_after_first_epoch(result):
        if result.epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_classifier(params, train, val, tmp_path / "b", "fp", crash_after_first_epoch)
    assert checkpoint.load(tmp_path / "b" / LAST)["epoch"] == 1
    resumed = train_classifier(params, train, val, tmp_path / "b", "fp")
    assert resumed.resumed_from == 2 and len(resumed.history) == 3

    final_a = checkpoint.load(tmp_path / "a" / LAST)["model"]
    final_b = checkpoint.load(tmp_path / "b" / LAST)["model"]
    assert all(torch.equal(final_a[key], final_b[key]) for key in final_a)
    assert [r.macro_f1 for r in uninterrupted.history] == [r.macro_f1 for r in resumed.history]
    assert torch.equal(checkpoint.load(tmp_path / "a" / BEST)["model"]["classifier.weight"],
                       checkpoint.load(tmp_path / "b" / BEST)["model"]["classifier.weight"])

    fresh = train_classifier(params, train, val, tmp_path / "b", "other-fingerprint")
    assert fresh.resumed_from is None  # a checkpoint of other params is never continued


def test_person_is_not_a_trained_class(split_project):
    train = load_manifest(split_project / "data/splits/train.json")
    class_ids = trained_class_ids(train, make_params(STEP1))
    assert train.person_class not in class_ids and len(class_ids) == train.num_classes - 2
    assert train.person_class in trained_class_ids(train, make_params({**STEP1, "data.drop_person_labels": False}))


def test_stages_write_metrics_cams_and_mlflow_runs(split_project):
    root = split_project
    assert main(["train-classifier", "--root", str(root)]) == 0
    assert main(["cams", "--root", str(root)]) == 0

    classifier = json.loads((root / "metrics/classifier.json").read_text())
    assert 1 <= classifier["best_epoch"] <= 3 and 0 <= classifier["val_macro_f1"] <= 1
    assert classifier["classes_excluded"] == ["coat"]
    assert (root / "plots/classifier/training.csv").read_text().count("\n") == 4

    cams = json.loads((root / "metrics/cams.json").read_text())
    assert set(cams) >= {"cam", "cam_crf", "crf_gain_miou"}
    assert 0 <= cams["cam"]["miou"] <= 1 and cams["cam"]["iou"]["coat"] == 0.0  # no person maps
    index = json.loads((root / "cams/index.json").read_text())
    train = load_manifest(root / "data/splits/train.json")
    assert [entry["id"] for entry in index["images"]["train"]] == [r.id for r in train.records]
    shards = sorted((root / "cams/train").glob("shard-*.npz"))  # 128 images a file, not one file per image
    assert len(shards) == -(-len(train.records) // 128) and not (root / ".cams.partial").exists()
    stored = CamStore(root / "cams/train")
    assert set(stored.reader.index) == {r.id for r in train.records}
    first = train.records[0]
    assert stored.load(first.id).full.shape[1:] == read_image(train.image_path(first)).shape[:2]
    for entry, record in zip(index["images"]["train"], train.records, strict=True):
        assert set(entry["labels"]) == set(record.labels)  # a map for every labelled (trained) class
        assert 0 <= entry["confidence"] <= 1

    # val once more, on the classes the classifier predicts (not its image labels): the same maps for a class
    # both have, scored on its own, and the labels' quality
    val = load_manifest(root / "data/splits/val.json")
    assert index["predicted_label_threshold"] == 0.5 and set(index["predicted_labels"]) == {r.id for r in val.records}
    labelled, predicted = CamStore(root / "cams/val"), CamStore(root / "cams/val_predicted")
    for record in val.records:
        guess, truth = predicted.load(record.id), labelled.load(record.id)
        expected = [c for c, s in zip(truth.score_class_ids, truth.scores, strict=True) if s >= 0.5] \
            or [int(truth.score_class_ids[np.argmax(truth.scores)])]
        assert list(guess.class_ids) == index["predicted_labels"][record.id] == sorted(expected)
        for position, class_id in enumerate(guess.class_ids):
            if class_id in truth.class_ids:
                assert np.allclose(guess.full[position], truth.full[list(truth.class_ids).index(class_id)], atol=2e-3)
    assert set(cams["val_predicted"]) == {"threshold", "cam", "cam_crf", "labels"}
    assert 0 <= cams["val_predicted"]["cam_crf"]["miou"] <= 1 and 0 <= cams["val_predicted"]["labels"]["exact_share"] <= 1

    runs = mlflow.search_runs(experiment_names=["wsss"], order_by=["attributes.start_time ASC"])
    assert list(runs["tags.wsss.stage"]) == ["prepare", "split", "train_classifier", "cams"]
    client = mlflow.MlflowClient()
    training = runs.iloc[2]
    assert len(client.get_metric_history(training["run_id"], "val_macro_f1")) == 3
    assert "metrics.val_f1_trouser" in runs.columns
    artifacts = {a.path for a in client.list_artifacts(runs.iloc[3]["run_id"])}
    assert {"cam_overlays.png", "per_class_iou.png", "cams.json"} <= artifacts
    assert runs.iloc[3]["metrics.cam_crf_miou"] == pytest.approx(cams["cam_crf"]["miou"])
    assert runs.iloc[3]["metrics.cam_crf_miou_predicted_labels"] == pytest.approx(cams["val_predicted"]["cam_crf"]["miou"])


def test_missing_or_broken_cams_are_named(split_project, tmp_path):
    """An image no shard holds, a missing shard and a corrupt shard each name the file (and image)."""
    from wsss.cam import ImageCams, cams_arrays, stride4_size
    from wsss.shards import write_index, write_shard

    params = make_params(STEP1)
    val = load_manifest(split_project / "data/splits/val.json")
    folder = tmp_path / "cams"
    h4, w4 = stride4_size(32, 32)
    cams = cams_arrays(ImageCams(np.array([1]), np.zeros((1, h4, w4)), np.zeros((1, 32, 32)), np.array([0.5]), np.array([1]), 0.5))
    write_shard(folder / "shard-00000.npz", [(record.id, cams) for record in val.records[1:]])
    write_index(folder)
    with pytest.raises(DataError, match=f"shards.json: no shard holds image '{val.records[0].id}'"):
        evaluate_cams(val, folder, params.cams, params.crf)
    (folder / "shard-00000.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="shard-00000.npz: not a valid shard"):
        evaluate_cams(val.derive(val.records[1:]), folder, params.cams, params.crf)
    (folder / "shard-00000.npz").unlink()
    with pytest.raises(DataError, match="shard-00000.npz: shard missing"):
        evaluate_cams(val.derive(val.records[1:]), folder, params.cams, params.crf)


STEP2 = {**STEP1, "irnet.confidence_cutoff": 0.0, "irnet.epochs": 1, "irnet.batch_size": 8, "irnet.crop_size": 32,
         "irnet.train_radius": 3, "irnet.infer_radius": 3, "irnet.exp_times": 3, "irnet.train_scales": [1.0, 0.5],
         "person.merge": False, "person.epochs": 1}  # the merge: its own test below (and step 3's, end to end)


def test_step2_stages_write_ir_labels_irnet_and_pseudo_masks(split_project, capsys):
    root = split_project
    (root / "params.yaml").write_text(yaml.safe_dump(make_document(STEP2)))
    for stage in ("train-classifier", "cams", "ir-labels", "train-irnet", "pseudo-masks"):
        assert main([stage, "--root", str(root)]) == 0, stage

    train = load_manifest(root / "data/splits/train.json")
    ir = json.loads((root / "metrics/ir_labels.json").read_text())
    assert ir["images_kept"] == len(train.records)  # cutoff 0 keeps every image
    assert abs(ir["fg_share"] + ir["bg_share"] + ir["ignore_share"] - 1) < 1e-9
    assert 0 <= ir["fg_precision"] <= 1
    from wsss.shards import MaskStore

    labels = MaskStore(root / "ir_labels")
    for record in train.records:
        assert set(np.unique(labels.load(record.id, expected_size=(32, 32)))) <= {0, 255, *record.labels}
    assert len(list((root / "ir_labels").glob("shard-*.npz"))) == -(-len(train.records) // 128)  # 128 images a file

    irnet = json.loads((root / "metrics/irnet.json").read_text())
    assert irnet["samples_per_epoch"] == 2 * len(train.records) and irnet["steps"] == irnet["samples_per_epoch"] // 8
    pseudo = json.loads((root / "metrics/pseudo_masks.json").read_text())
    assert 0 <= pseudo["val"]["miou"] <= 1 and "gain_over_cam_crf" in pseudo
    val = load_manifest(root / "data/splits/val.json")
    stored = {}
    for name, manifest in (("train", train), ("val", val)):
        masks = MaskStore(root / "pseudo_masks" / name)
        stored[name] = {record.id: masks.load(record.id) for record in manifest.records}
        ignored = {IGNORE_INDEX} if name == "train" else set()  # irnet.ignore_uncertain (params.yaml): training masks only
        for record in manifest.records:
            mask = stored[name][record.id]
            assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, *record.labels, *ignored}
    train_pixels = np.stack(list(stored["train"].values()))
    assert pseudo["train"]["ignored_share"] == pytest.approx((train_pixels == IGNORE_INDEX).mean()) and pseudo["train"]["ignored_share"] > 0

    runs = mlflow.search_runs(experiment_names=["wsss"], order_by=["attributes.start_time ASC"])
    assert list(runs["tags.wsss.stage"])[-3:] == ["ir_labels", "train_irnet", "pseudo_masks"]
    client = mlflow.MlflowClient()
    history = client.get_metric_history(runs.iloc[-2]["run_id"], "total")
    assert len(history) == irnet["steps"]  # losses per step
    # the dvc plot: one row per epoch, each loss its mean over the epoch's steps
    with (root / "plots/irnet/training.csv").open(newline="") as handle:
        curve = list(csv.DictReader(handle))
    assert [(int(r["epoch"]), int(r["step"])) for r in curve] == [(1, irnet["steps"])]
    assert float(curve[0]["total"]) == pytest.approx(sum(m.value for m in history) / len(history), abs=1e-5)
    assert float(curve[0]["total"]) == pytest.approx(float(curve[0]["affinity"]) + float(curve[0]["displacement"]), abs=1e-5)
    assert "pseudo_mask_overlays.png" in {a.path for a in client.list_artifacts(runs.iloc[-1]["run_id"])}
    assert pseudo["background"] == "walk" and pseudo["post_crf"] and 0 <= pseudo["val"]["before_crf_miou"] <= 1
    used = yaml.safe_load((root / "params.yaml").read_text())["irnet"]["bg_weight"]
    assert pseudo["bg_weight"] == used and "threshold" not in pseudo  # the background knob in use only

    # without the ignore: the same masks, the uncertain pixels with their labels again; val untouched
    (root / "params.yaml").write_text(yaml.safe_dump(make_document({**STEP2, "irnet.ignore_uncertain": False})))
    assert main(["pseudo-masks", "--root", str(root)]) == 0
    kept = json.loads((root / "metrics/pseudo_masks.json").read_text())
    assert "train" not in kept and kept["val"] == pseudo["val"]
    for name in ("train", "val"):
        masks = MaskStore(root / "pseudo_masks" / name)
        for image_id, with_ignore in stored[name].items():
            full = masks.load(image_id)
            assert IGNORE_INDEX not in full and np.array_equal(full[with_ignore != IGNORE_INDEX], with_ignore[with_ignore != IGNORE_INDEX])

    _check_person_merge(root, capsys)

    # the paper's way: a constant background plane, no CRF after the walk
    (root / "params.yaml").write_text(yaml.safe_dump(make_document({**STEP2, "irnet.background": "plane", "irnet.post_crf": False,
                                                                                   "irnet.ignore_uncertain": False})))
    assert main(["pseudo-masks", "--root", str(root)]) == 0
    plane = json.loads((root / "metrics/pseudo_masks.json").read_text())
    assert plane["background"] == "plane" and "before_crf_miou" not in plane["val"]
    assert "threshold" in plane and "bg_weight" not in plane
    masks = MaskStore(root / "pseudo_masks" / "val")
    for record in val.records:
        assert set(np.unique(masks.load(record.id))) <= {0, *record.labels}
    # val once more with the labels the classifier predicts (cams/index.json), not the image labels
    predicted_labels = json.loads((root / "cams/index.json").read_text())["predicted_labels"]
    predicted = MaskStore(root / "pseudo_masks" / "val_predicted")
    for record in val.records:
        assert set(np.unique(predicted.load(record.id))) <= {0, *predicted_labels[record.id]}
    assert 0 <= plane["val_predicted"]["miou"] <= 1 and "gain_over_cam_crf" in plane["val_predicted"]
    assert plane["person_merge"] is False and "before_person_merge_miou" not in plane["val"]


def write_made_up_person_cams(root: Path, size: int = 32) -> dict[str, dict[str, float]]:
    """Person CAMs as the person_classifier stage stores them in ``root/cams_person`` (made up: its
    training is tested elsewhere): the left half of every image, P(person) 0.01 or 0.9 in turn, presence
    threshold 0.5. Returns
    the probabilities per split."""
    from wsss.cam import ImageCams, cams_arrays
    from wsss.shards import write_index, write_shard

    manifests = {"train": load_manifest(root / "data/splits/train.json"), "val": load_manifest(root / "data/splits/val.json")}
    person = manifests["val"].person_class
    left = np.zeros((1, size, size))
    left[..., : size // 2] = 1.0
    probability = {}
    for split, manifest in manifests.items():
        probability[split] = {r.id: 0.9 if i % 2 else 0.01 for i, r in enumerate(manifest.records)}
        arrays = cams_arrays(ImageCams(np.array([person]), left[:, ::4, ::4], left, np.array([0.5]), np.array([person]), 0.5))
        write_shard(root / "cams_person" / split / "shard-00000.npz", [(r.id, arrays) for r in manifest.records])
        write_index(root / "cams_person" / split)
    # the stage writes the presence threshold it used (chosen on val under person.presence_threshold: auto)
    (root / "cams_person/index.json").write_text(json.dumps({"class_id": person, "probability": probability, "presence_threshold": 0.5}))
    return probability


def _check_person_merge(root: Path, capsys) -> None:
    """person.merge, after the step-2 stages: the person classifier's CAMs turn background pixels of the
    images that show a person into person; val decides by its image labels, val_predicted by the person
    classifier, the training images by their noisy labels or the classifier."""
    from wsss.shards import MaskStore

    unmerged = {split: MaskStore(root / "pseudo_masks" / split) for split in ("train", "val", "val_predicted")}
    unmerged = {split: {i: store.load(i) for i in store.reader.index} for split, store in unmerged.items()}
    person_index = root / "cams_person/index.json"
    assert not person_index.exists()
    (root / "params.yaml").write_text(yaml.safe_dump(make_document({**STEP2, "person.merge": True, "irnet.ignore_uncertain": False,
                                                                    "person.cam_threshold": 0.2, "person.presence_threshold": 0.05})))
    assert main(["pseudo-masks", "--root", str(root)]) == 2  # no person CAMs yet: named, no output replaced
    assert "cams_person/index.json: no person CAMs: run the person_classifier stage first" in capsys.readouterr().err
    assert MaskStore(root / "pseudo_masks/val").load(next(iter(unmerged["val"]))).shape == (32, 32)
    manifests = {"train": load_manifest(root / "data/splits/train.json"), "val": load_manifest(root / "data/splits/val.json")}
    person = manifests["val"].person_class
    probability = write_made_up_person_cams(root)
    assert main(["pseudo-masks", "--root", str(root)]) == 0
    decided = {"train": lambda r: person in r.source_labels or probability["train"][r.id] >= 0.05,
               "val": lambda r: person in r.labels, "val_predicted": lambda r: probability["val"][r.id] >= 0.05}
    for split, shows in decided.items():
        store = MaskStore(root / "pseudo_masks" / split)
        with_person = 0
        for record in manifests["val" if split == "val_predicted" else "train" if split == "train" else "val"].records:
            mask = store.load(record.id)
            if not shows(record):
                assert np.array_equal(mask, unmerged[split][record.id])  # untouched
            with_person += int((mask == person).any())
            assert (mask == person).any() <= shows(record)
        assert with_person > 0, split
    pseudo = json.loads((root / "metrics/pseudo_masks.json").read_text())
    assert pseudo["person_merge"] is True
    for split in ("val", "val_predicted"):
        assert pseudo[split]["iou"]["coat"] > 0 and 0 <= pseudo[split]["before_person_merge_miou"] <= 1

    # person.background_seed (params.yaml: on) floored the walk's background with the person CAM in the images
    # that show a person, and only there: without it those masks change, the others stay the same
    floored = {split: {r: MaskStore(root / "pseudo_masks" / split).load(r) for r in unmerged[split]} for split in unmerged}
    assert make_params().person.background_seed > 0
    (root / "params.yaml").write_text(yaml.safe_dump(make_document({**STEP2, "person.merge": True, "irnet.ignore_uncertain": False,
                                                                    "person.cam_threshold": 0.2, "person.presence_threshold": 0.05,
                                                                    "person.background_seed": 0.0})))
    assert main(["pseudo-masks", "--root", str(root)]) == 0
    for split, shows in decided.items():
        store, changed = MaskStore(root / "pseudo_masks" / split), 0
        for record in manifests["train" if split == "train" else "val"].records:
            same = np.array_equal(store.load(record.id), floored[split][record.id])
            assert same or shows(record), (split, record.id)
            changed += not same
        assert changed > 0, split
