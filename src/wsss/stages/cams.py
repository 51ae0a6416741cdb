"""The ``cams`` stage: CAMs of train and val, and the step-1 evaluation on val.

Outputs: ``cams/{train,val}/<id>.npz`` and ``cams/index.json`` (per image: classes with a map and
confidence), ``metrics/cams.json`` (mIoU of CAM and CAM+CRF on val, per-class IoU), ``plots/cams/per_class_iou.csv`` (dvc plots). MLflow gets the same numbers, an overlay figure
(image | CAM | CAM label map | CAM+CRF | ground truth) and a per-class IoU bar chart.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from wsss import tracking, visualize
from wsss.cam_inference import CamEvaluation, compute_cams, evaluate_cams
from wsss.config import Params, flatten
from wsss.data.manifest import Manifest, load_manifest
from wsss.io import atomic_dir, write_csv, write_json
from wsss.metrics import segmentation_scores
from wsss.models.classifier import load_trained_classifier
from wsss.stages.classifier import MODEL_PATH
from wsss.stages.data import PREPARED_DIR, SPLITS_DIR

CAMS_DIR = Path("cams")
INDEX = "index.json"
METRICS = Path("metrics/cams.json")
PER_CLASS_PLOT = Path("plots/cams/per_class_iou.csv")
SPLITS = ("train", "val")


def stage_params(params: Params) -> dict:
    return {**flatten(params.cams.model_dump(), "cams."), **flatten(params.crf.model_dump(), "crf.")}


def cams_metrics(manifest: Manifest, evaluation: CamEvaluation, params: Params) -> dict:
    names = manifest.class_names
    cam = segmentation_scores(evaluation.cam_matrix)
    crf = segmentation_scores(evaluation.crf_matrix)
    person = manifest.person_class
    metrics = {
        "val_images": sum(r.mask is not None for r in manifest.records),
        "eval_threshold": params.cams.eval_threshold,
        "cam": cam.as_dict(names),
        "cam_crf": crf.as_dict(names),
        "crf_gain_miou": crf.miou - cam.miou,
    }
    if person is not None:  # the classifier has no person maps: the same scores without that class
        metrics["cam"]["miou_without_person"] = cam.miou_without(person)
        metrics["cam_crf"]["miou_without_person"] = crf.miou_without(person)
    return metrics


def _per_class_rows(metrics: dict) -> list[dict]:
    def cell(value):
        return "" if value is None else f"{value:.6f}"

    return [{"class": name, "cam_iou": cell(value), "cam_crf_iou": cell(metrics["cam_crf"]["iou"][name])}
            for name, value in metrics["cam"]["iou"].items()]


def overlay_figure(evaluation: CamEvaluation):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps

    rows = []
    for example in evaluation.examples:
        heat = (colormaps["jet"](np.clip(example["heat"], 0, 1))[..., :3] * 255).astype(np.uint8)
        heat = (0.5 * heat + 0.5 * example["image"]).astype(np.uint8)
        rows.append([example["image"], heat, visualize.overlay(example["image"], example["cam"]),
                     visualize.overlay(example["image"], example["crf"]), visualize.overlay(example["image"], example["truth"])])
    return visualize.image_grid(rows, titles=["image", "CAM", "CAM labels", "CAM + CRF", "ground truth"],
                                row_labels=[e["id"] for e in evaluation.examples])


def per_class_figure(metrics: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(metrics["cam"]["iou"])
    cam = [metrics["cam"]["iou"][n] or 0.0 for n in names]
    crf = [metrics["cam_crf"]["iou"][n] or 0.0 for n in names]
    figure, axis = plt.subplots(figsize=(7, 0.35 * len(names) + 1.5))
    positions = np.arange(len(names))
    axis.barh(positions - 0.2, cam, height=0.4, label=f"CAM (mIoU {metrics['cam']['miou']:.3f})")
    axis.barh(positions + 0.2, crf, height=0.4, label=f"CAM + CRF (mIoU {metrics['cam_crf']['miou']:.3f})")
    axis.set_yticks(positions, names)
    axis.invert_yaxis()
    axis.set(xlabel="IoU on val", xlim=(0, 1))
    axis.legend(loc="lower right")
    figure.tight_layout()
    return figure


def run_cams(params: Params, root: Path) -> dict:
    import mlflow

    manifests = {name: load_manifest(root / SPLITS_DIR / f"{name}.json") for name in SPLITS}
    model, state = load_trained_classifier(root / MODEL_PATH)
    hashes = tracking.input_hashes({"model": root / MODEL_PATH, "splits": root / SPLITS_DIR, "prepared": root / PREPARED_DIR})
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    with tracking.stage_run("cams", params.tracking.experiment, stage_params(params), root=root, hashes=hashes):
        with atomic_dir(root / CAMS_DIR) as staging:
            index = {"class_ids": state["class_ids"], "scales": params.cams.scales, "normalize": params.cams.normalize, "images": {}}
            for name, manifest in manifests.items():
                summaries = compute_cams(model, state["class_ids"], manifest, staging / name, params.cams, device, desc=f"cams {name}")
                index["images"][name] = [vars(summary) for summary in summaries]
            write_json(staging / INDEX, index)
            evaluation = evaluate_cams(manifests["val"], staging / "val", params.cams, params.crf, params.cams.num_overlays)

        metrics = cams_metrics(manifests["val"], evaluation, params)
        confidences = [entry["confidence"] for entry in index["images"]["train"]]
        metrics["train_confidence_median"] = float(np.median(confidences)) if confidences else None
        write_csv(root / PER_CLASS_PLOT, _per_class_rows(metrics))
        write_json(root / METRICS, metrics)

        mlflow.log_metrics({"cam_miou": metrics["cam"]["miou"], "cam_crf_miou": metrics["cam_crf"]["miou"],
                            "crf_gain_miou": metrics["crf_gain_miou"],
                            **{f"cam_iou_{n}": v for n, v in metrics["cam"]["iou"].items() if v is not None},
                            **{f"cam_crf_iou_{n}": v for n, v in metrics["cam_crf"]["iou"].items() if v is not None}})
        for name, figure in (("cam_overlays.png", overlay_figure(evaluation) if evaluation.examples else None),
                             ("per_class_iou.png", per_class_figure(metrics))):
            if figure is not None:
                mlflow.log_figure(figure, name)
                visualize.close(figure)
        mlflow.log_artifact(str(root / METRICS))
    return metrics
