"""Step 3 on tiny data: train_segmenter, oracle, evaluate, report and `wsss predict`, end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from conftest import make_document, make_params
from test_step1 import STEP2

from wsss import serving, tracking
from wsss.cli import main
from wsss.data.manifest import load_manifest
from wsss.io import read_image, read_mask
from wsss.models.segmenter import load_segmenter
from wsss.person import best_f1_threshold
from wsss.stages.report import SEEDS_REPORT, headline_metrics, summary_markdown

STEP3 = {**STEP2, "person.merge": True, "segmenter.epochs": 2, "segmenter.batch_size": 8, "segmenter.image_size": 32, "segmenter.decoder_channels": 16,
         "segmenter.threads": 1, "evaluate.tta_scales": [1.0, 0.5], "evaluate.num_figures": 2,
         "segmenter.skip_disagreement": 0.3, "segmenter.skip_after_epochs": 1}  # low: a 1-epoch network contradicts some labels


@pytest.fixture
def step2_project(project: Path, mlflow_store) -> Path:
    (project / "params.yaml").write_text(yaml.safe_dump(make_document(STEP3)))
    for stage in ("prepare", "split", "train-classifier", "cams", "person-classifier", "ir-labels", "train-irnet", "pseudo-masks"):
        assert main([stage, "--root", str(project)]) == 0, stage
    return project


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_step3_stages_train_evaluate_and_report(step2_project):
    root = step2_project
    # the person classifier of the default: its last epoch kept, its presence threshold the best F1 on val
    person = json.loads((root / "metrics/person_classifier.json").read_text())
    index = json.loads((root / "cams_person/index.json").read_text())
    val = load_manifest(root / "data/splits/val.json")
    truth = np.array([val.person_class in r.labels for r in val.records])
    chosen = best_f1_threshold(np.array([index["probability"]["val"][r.id] for r in val.records]), truth)
    assert person["presence_rule"].startswith("auto") and person["presence_threshold"] == index["presence_threshold"] == chosen
    assert person["checkpoint"] == "last" and person["kept_epoch"] == make_params(STEP3).person.epochs
    for stage in ("train-segmenter", "oracle", "evaluate", "report"):
        assert main([stage, "--root", str(root)]) == 0, stage

    model, spec = load_segmenter(root / "models/segmenter/model.pt")
    assert spec.num_classes == 8 and spec.decoder_channels == 16
    assert (spec.encoder, spec.classifier_arch, spec.output_stride) == ("classifier", "small_cnn", 8)  # the CPU default
    segmenter = json.loads((root / "metrics/segmenter.json").read_text())
    assert segmenter["trained_on"] == "pseudo masks" and 1 <= segmenter["best_epoch"] <= 2
    curve = _rows(root / "plots/segmenter/training.csv")
    assert [int(r["epoch"]) for r in curve] == [1, 2]
    assert float(curve[0]["skipped"]) == 0 and 0 < float(curve[1]["skipped"]) < 1  # skipping starts after the warm-up epoch
    assert all(float(r["skipped"]) == 0 for r in _rows(root / "plots/oracle/training.csv"))  # never on the true masks

    oracle = json.loads((root / "metrics/oracle.json").read_text())
    assert oracle["available"] and oracle["trained_on"] == "truth masks"
    evaluate = json.loads((root / "metrics/evaluate.json").read_text())
    assert evaluate["final_mode"] == oracle["final_mode"] == "tta_crf"  # evaluate.crf: true, the CPU default
    for split in ("val", "test"):
        for mode in ("plain", "tta", "tta_crf"):
            scores = evaluate[split][mode]
            assert set(scores) >= {"miou", "mean_accuracy", "pixel_accuracy", "iou", "miou_without_person", "miou_person_as_background"}
            assert 0 <= scores["miou"] <= 1 and 0 <= scores["pixel_accuracy"] <= 1
            assert 0 <= oracle[split][mode]["miou"] <= 1
        assert evaluate[split]["tta_gain_miou"] == pytest.approx(evaluate[split]["tta"]["miou"] - evaluate[split]["plain"]["miou"])
        assert evaluate[split]["crf_gain_miou"] == pytest.approx(evaluate[split]["tta_crf"]["miou"] - evaluate[split]["tta"]["miou"])

    # the confusion matrix counts every labelled test pixel once
    test = load_manifest(root / "data/splits/test.json")
    labelled = sum(int((read_mask(test.mask_path(r)) != 255).sum()) for r in test.records)
    cells = _rows(root / "plots/evaluate/confusion_matrix.csv")
    assert len(cells) == 64 and sum(int(c["pixels"]) for c in cells) == labelled
    iou_rows = _rows(root / "plots/evaluate/per_class_iou.csv")
    assert [r["test_final_iou"] for r in iou_rows] == [r["test_tta_crf_iou"] for r in iou_rows]  # the dvc plot shows the final model
    for picture in ("confusion_matrix.png", "per_class_iou.png", "figure2.png"):
        assert (root / "plots/evaluate" / picture).stat().st_size > 1000

    summary = (root / "reports/summary.md").read_text()
    headline = json.loads((root / "metrics/summary.json").read_text())
    assert headline["test_miou"] == round(evaluate["test"]["tta_crf"]["miou"], 6)
    assert headline["share_of_upper_bound"] == pytest.approx(evaluate["test"]["tta_crf"]["miou"] / oracle["test"]["tta_crf"]["miou"], abs=1e-5)
    assert "Table 2" in summary and "Table 1" in summary and "of the upper bound's test mIoU" in summary
    assert f"| this run, TTA + CRF | {100 * evaluate['test']['tta_crf']['miou']:.2f} |" in summary
    assert f"| Segmentation + TTA + CRF | {100 * evaluate['val']['tta_crf']['miou']:.2f} |" in summary

    runs = mlflow.search_runs(experiment_names=["wsss"], order_by=["attributes.start_time ASC"])
    stages = list(runs["tags.wsss.stage"])
    assert stages[-4:] == ["train_segmenter", "oracle", "evaluate", "pipeline"]  # one run per stage
    pipeline = runs.iloc[-1]
    assert pipeline["params.segmenter.encoder"] == "classifier" and pipeline["params.irnet.background"] == "walk"
    assert pipeline["metrics.evaluate.test.tta.miou"] == pytest.approx(evaluate["test"]["tta"]["miou"])
    assert pipeline["metrics.evaluate.test.tta_crf.miou"] == pytest.approx(evaluate["test"]["tta_crf"]["miou"])
    assert runs.iloc[-2]["params.evaluate.crf"] == "True" and runs.iloc[-2]["params.crf.gt_prob"] == "0.7"
    assert pipeline["metrics.pseudo_masks.val.miou"] == pytest.approx(json.loads((root / "metrics/pseudo_masks.json").read_text())["val"]["miou"])
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(runs.iloc[-4]["run_id"], "val_miou")) == 2  # per epoch
    assert runs.iloc[-4]["params.segmenter.skip_disagreement"] == "0.3" and runs.iloc[-3]["params.segmenter.skip_disagreement"] == "None"
    for run in (runs.iloc[-4], runs.iloc[-3]):  # the classifier encoder's weights are a lineage input of both
        assert run["tags.wsss.input.classifier"] == tracking.input_hashes({"c": root / "models/classifier/model.pt"})["c"]
    assert runs.iloc[-3]["metrics.test_tta_miou"] == pytest.approx(oracle["test"]["tta"]["miou"])
    assert runs.iloc[-3]["metrics.test_tta_crf_miou"] == pytest.approx(oracle["test"]["tta_crf"]["miou"])
    assert {"figure2.png", "confusion_matrix.png"} <= {a.path for a in client.list_artifacts(runs.iloc[-2]["run_id"])}

    # the trained model segments images of any size from the command line
    out = root / "predictions"
    val = load_manifest(root / "data/splits/val.json")
    assert main(["predict", "--model", str(root / "models/segmenter/model.pt"), str(val.image_path(val.records[0])), "--out", str(out)]) == 0
    assert read_mask(out / f"{val.records[0].id}.png").shape == (32, 32)

    # the registered MLflow model is the final segmenter and predicts what `wsss predict` does
    version = client.get_model_version_by_alias(serving.REGISTERED_NAME, serving.ALIAS)
    assert version.run_id == runs.iloc[-4]["run_id"]
    registered = mlflow.pyfunc.load_model(f"models:/{serving.REGISTERED_NAME}@{serving.ALIAS}")
    image = read_image(val.image_path(val.records[0]))
    assert np.array_equal(registered.predict(image), read_mask(out / f"{val.records[0].id}.png"))
    assert registered.metadata.get_input_schema().inputs[0].shape == (-1, -1, 3)
    models = {m.name: m for m in mlflow.search_logged_models(experiment_ids=[runs.iloc[-1]["experiment_id"]], output_format="list")}
    assert models["upper_bound"].source_run_id == runs.iloc[-3]["run_id"]  # logged, not registered
    assert [v.version for v in client.search_model_versions(f"name = '{serving.REGISTERED_NAME}'")] == [version.version]


def test_oracle_without_training_masks_reports_unavailable(project, mlflow_store):
    (project / "params.yaml").write_text(yaml.safe_dump(make_document(STEP3)))
    assert main(["prepare", "--root", str(project)]) == 0 and main(["split", "--root", str(project)]) == 0
    document = json.loads((project / "data/splits/train.json").read_text())
    for image in document["images"]:
        image["mask"] = None  # as LID: no training masks
    (project / "data/splits/train.json").write_text(json.dumps(document))
    assert main(["oracle", "--root", str(project)]) == 0
    oracle = json.loads((project / "metrics/oracle.json").read_text())
    assert oracle["available"] is False and "have no ground-truth mask" in oracle["reason"]
    assert not (project / "models/oracle/model.pt").exists()


def test_report_needs_every_stage_metrics(project, mlflow_store, capsys):
    assert main(["report", "--root", str(project)]) == 2
    assert "metrics/prepare.json" in capsys.readouterr().err
    assert not (project / "reports/summary.md").exists()


def _scores(miou: float) -> dict:
    return {"miou": miou, "mean_accuracy": miou + 0.1, "pixel_accuracy": 0.9, "iou": {}, "miou_without_person": miou + 0.05}


def test_summary_tables_and_the_ratio_to_the_upper_bound():
    metrics = {
        "cams": {"cam_crf": _scores(0.40), "val_predicted": {"cam_crf": _scores(0.35)}},
        "pseudo_masks": {"val": _scores(0.45), "val_predicted": _scores(0.42)},
        "evaluate": {"val": {"plain": _scores(0.50), "tta": _scores(0.52)}, "test": {"plain": _scores(0.48), "tta": _scores(0.51)}},
        "oracle": {"available": True, "test": {"tta": _scores(0.60)}},
    }
    text = summary_markdown(metrics)
    assert "| Classification + CRF | 40.00 | 35.00 | 40.00 | 31.06 |" in text  # image labels, predicted labels, the same without person
    assert "| IRNet (pseudo masks) | 45.00 | 42.00 | 47.00 | 31.87 |" in text
    assert "| Segmentation + TTA | 52.00 | 52.00 | 57.00 | 39.64 |" in text  # the segmenter needs no labels: one value
    assert ("Each step improves on the last (predicted labels, no CRF after the segmenter: Classification + CRF < IRNet (pseudo masks) "
            "< Segmentation + TTA): "
            "**yes** (35.00, 42.00, 52.00)") in text
    assert "| this run, TTA | 51.00 | 61.00 | 90.00 |" in text
    assert "**85.00 %** of the upper bound's test mIoU; 86.15 % without the person class" in text
    assert "CRF" not in text.split("## Table 1")[1].split("Per-class IoU")[0]
    assert "One run of one `seed`" in text.split("## Table 2")[0] and f"`{SEEDS_REPORT}`" in text  # the mean over seeds is elsewhere

    # with evaluate.crf the final numbers, the upper bound's included, are those after the CRF
    crf = {**metrics, "evaluate": {"final_mode": "tta_crf",
                                   "val": {**metrics["evaluate"]["val"], "tta_crf": _scores(0.55)},
                                   "test": {**metrics["evaluate"]["test"], "tta_crf": _scores(0.54)}},
           "oracle": {"available": True, "test": {"tta": _scores(0.60), "tta_crf": _scores(0.72)}}}
    text = summary_markdown(crf)
    assert "| Segmentation + TTA + CRF | 55.00 | 55.00 | 60.00 |  |" in text and "| Segmentation + TTA | 52.00 | 52.00 | 57.00 | 39.64 |" in text
    # the ordering is read on the predicted labels and without the CRF after the segmenter
    below = {**crf, "pseudo_masks": {"val": _scores(0.45), "val_predicted": _scores(0.53), "person_merge": True}}
    assert "| IRNet (pseudo masks), person merged | 45.00 | 53.00 |" in summary_markdown(below)
    assert "**no** (35.00, 53.00, 52.00)" in summary_markdown(below)
    table1 = text.split("## Table 1")[1].split("## Weak")[0]
    assert table1.index("| this run, TTA + CRF | 54.00 |") < table1.index("| this run, TTA | 51.00 |") < table1.index("no TTA")
    assert "**75.00 %** of the upper bound's test mIoU" in text and "With TTA only (no CRF on either model): 85.00 %." in text
    # the ceiling of a model that never predicts the person: the upper bound with its person pixels as background
    capped = {**crf, "oracle": {"available": True, "test": {"tta": {**_scores(0.60), "miou_person_as_background": 0.48},
                                                            "tta_crf": {**_scores(0.72), "miou_person_as_background": 0.63}}}}
    text = summary_markdown(capped)
    assert "turned background score 63.00 mIoU, **87.50 %** of the upper bound." in text
    assert "With TTA only (no CRF on either model): 85.00 % (ceiling 80.00 %)." in text
    stale = summary_markdown({**crf, "oracle": {"available": True, "test": {"tta": _scores(0.60)}}})
    assert "The upper bound was not scored with TTA + CRF" in stale and "of the upper bound's test mIoU" not in stale
    unavailable = summary_markdown({**metrics, "oracle": {"available": False, "reason": "no masks"}})
    assert "No upper bound: no masks." in unavailable and "of the upper bound" not in unavailable


def test_headline_metrics_are_flat_and_follow_the_final_mode():
    metrics = {
        "cams": {"cam_crf": _scores(0.40), "val_predicted": {"cam_crf": _scores(0.35)}},
        "pseudo_masks": {"val": _scores(0.45), "val_predicted": _scores(0.42)},
        "evaluate": {"final_mode": "tta_crf", "val": {"tta": _scores(0.52), "tta_crf": _scores(0.55)},
                     "test": {"tta": _scores(0.51), "tta_crf": _scores(0.54)}},
        "oracle": {"available": True, "test": {"tta": _scores(0.60), "tta_crf": _scores(0.72)}},
    }
    headline = headline_metrics(metrics)
    assert headline == {"val_cam_crf_miou": 0.35, "val_pseudo_masks_miou": 0.42, "val_cam_crf_miou_image_labels": 0.40,
                        "val_pseudo_masks_miou_image_labels": 0.45, "val_segmentation_tta_miou": 0.52, "val_segmentation_miou": 0.55,
                        "table2_ordering_holds": True, "test_miou": 0.54, "test_pixel_accuracy": 0.9, "final_mode": "tta_crf",
                        "upper_bound_test_miou": 0.72, "share_of_upper_bound": 0.75,
                        "share_of_upper_bound_without_person": round(0.59 / 0.77, 6)}
    # LID: no upper bound, no keys for it (never a NaN that DVC could not read)
    lid = headline_metrics({**metrics, "oracle": {"available": False, "reason": "no masks"}})
    assert "upper_bound_test_miou" not in lid and "share_of_upper_bound" not in lid
    assert "share_of_upper_bound" not in headline_metrics({**metrics, "oracle": {"available": True, "test": {"tta_crf": _scores(0.0)}}})
