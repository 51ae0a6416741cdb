"""The ``cams`` stage: CAMs of train and val, and the step-1 evaluation on val.

Outputs: ``cams/{train,val,val_predicted}/shard-*.npz`` + ``shards.json`` (:mod:`wsss.shards`: 128 images a
file; a killed run resumes from its last complete shard; ``val_predicted``: val's CAMs of the classes the
classifier predicts, not of its image labels) and ``cams/index.json`` (per image: classes with a map and
confidence; val's predicted labels), ``metrics/cams.json`` (mIoU of CAM and CAM+CRF on val with the image
labels, irn's protocol, and under ``val_predicted`` with the predicted labels; per-class IoU),
``plots/cams/per_class_iou.csv`` (dvc plots). MLflow gets the same numbers, an overlay figure
(image | CAM | CAM label map | CAM+CRF | ground truth) and a per-class IoU bar chart.
Under torchrun each process computes and evaluates its share of the images; rank 0 logs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wsss import checkpoint, distributed, provenance, tracking, visualize
from wsss.cam import CamStore
from wsss.cam_inference import CamEvaluation, compute_cams, evaluate_cams, predicted_view
from wsss.config import Params, flatten
from wsss.data.manifest import Manifest, load_manifest
from wsss.figures import iou_bars
from wsss.io import write_csv, write_json
from wsss.metrics import segmentation_scores
from wsss.models.classifier import load_trained_classifier
from wsss.shards import resumable_dir, shard_numbers, write_index
from wsss.stages.paths import CAMS_DIR, CAMS_METRICS, CLASSIFIER_PATH, INDEX_FILE, PREDICTED, PREPARED_DIR, SPLITS_DIR

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


def label_scores(true_labels: list[tuple[int, ...]], predicted: list[tuple[int, ...]], class_ids: list[int],
                 names: tuple[str, ...]) -> dict:
    """Image-level F1 per class of ``predicted`` against ``true_labels`` (the classes ``class_ids``),
    their macro mean, and the share of images whose predicted set is exactly right."""
    f1 = {}
    for class_id in class_ids:
        truth = np.array([class_id in labels for labels in true_labels])
        guess = np.array([class_id in labels for labels in predicted])
        hits = int((truth & guess).sum())
        denominator = int(truth.sum()) + int(guess.sum())
        f1[names[class_id]] = 2 * hits / denominator if denominator else None
    scored = [value for value in f1.values() if value is not None]
    exact = [set(t) & set(class_ids) == set(p) for t, p in zip(true_labels, predicted, strict=True)]
    return {"f1": f1, "macro_f1": float(np.mean(scored)) if scored else 0.0, "exact_share": float(np.mean(exact)) if exact else 0.0}


def predicted_metrics(val: Manifest, evaluation: CamEvaluation, index: dict, params: Params) -> dict:
    """Step 1 on val with the predicted labels: CAM and CAM + CRF scores, and how good the labels are."""
    scores = {key: value for key, value in cams_metrics(val, evaluation, params).items() if key in ("cam", "cam_crf")}
    records = [r for r in val.records if r.mask is not None]
    predicted = [tuple(index["predicted_labels"][r.id]) for r in records]
    return {"threshold": index["predicted_label_threshold"], **scores,
            "labels": label_scores([r.labels for r in records], predicted, index["class_ids"], val.class_names)}


def _per_class_rows(metrics: dict) -> list[dict]:
    def cell(value):
        return "" if value is None else f"{value:.6f}"

    return [{"class": name, "cam_iou": cell(value), "cam_crf_iou": cell(metrics["cam_crf"]["iou"][name]),
             "cam_crf_iou_predicted_labels": cell(metrics[PREDICTED]["cam_crf"]["iou"][name])}
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
    return iou_bars([(f"CAM (mIoU {metrics['cam']['miou']:.3f})", metrics["cam"]["iou"]),
                     (f"CAM + CRF (mIoU {metrics['cam_crf']['miou']:.3f})", metrics["cam_crf"]["iou"])],
                    list(metrics["cam"]["iou"]), xlabel="IoU on val")


def _cams_of(model, class_ids: list[int], manifests: dict[str, Manifest], staging: Path, params: Params,
             reuse: CamStore | None = None) -> dict[str, list]:
    """Each manifest's CAMs into ``staging/<name>/`` (under torchrun each process its share of the
    shards; shards already there are kept; maps ``reuse`` has are copied), the shard indexes written;
    the summaries per manifest."""
    context = distributed.current()
    size = params.compute.shard_size
    summaries = {}
    for name, manifest in manifests.items():
        mine = distributed.shard(list(range(len(shard_numbers(len(manifest.records), size)))), context)
        done = compute_cams(model, class_ids, manifest, staging / name, params.cams, context.device, desc=f"cams {name}",
                            workers=params.compute.workers, shards=mine, shard_size=size, reuse=reuse)
        summaries[name] = distributed.gather_json([vars(summary) for summary in done], context)
    distributed.barrier(context)
    if context.is_main:
        for name in manifests:
            write_index(staging / name)
    distributed.barrier(context)
    return summaries


def _evaluate(val: Manifest, folder: Path, params: Params, overlays: int) -> CamEvaluation:
    context = distributed.current()
    evaluation = evaluate_cams(val.derive(distributed.shard(val.records, context)), folder, params.cams, params.crf,
                               overlays if context.is_main else 0, params.compute.workers, params.compute.chunk_size)
    return CamEvaluation(distributed.all_reduce_sum(evaluation.cam_matrix, context),
                         distributed.all_reduce_sum(evaluation.crf_matrix, context), evaluation.examples)


def write_cams(model, class_ids: list[int], manifests: dict[str, Manifest], staging: Path,
               params: Params) -> tuple[dict, dict[str, CamEvaluation]]:
    """The CAMs of every image into ``staging/<split>/`` (shards; those already there are kept), then
    those of val on the classes the classifier predicts (``staging/val_predicted/``: what step 1 gives
    on an unlabelled image), ``staging/index.json``, and both val evaluations (``val``: the image
    labels, irn's protocol; ``val_predicted``); under torchrun each process computes its share."""
    context = distributed.current()
    index = {"class_ids": class_ids, "scales": params.cams.scales, "normalize": params.cams.normalize, "images": {}}
    index["images"].update(_cams_of(model, class_ids, manifests, staging, params))
    threshold = params.cams.predicted_label_threshold
    labelled = CamStore(staging / "val")
    predicted = predicted_view(manifests["val"], labelled, threshold)
    index["images"].update(_cams_of(model, class_ids, {PREDICTED: predicted}, staging, params, reuse=labelled))
    index["predicted_label_threshold"] = threshold
    index["predicted_labels"] = {r.id: list(r.labels) for r in predicted.records}
    if context.is_main:
        write_json(staging / INDEX_FILE, index)
    distributed.barrier(context)
    evaluations = {"val": _evaluate(manifests["val"], staging / "val", params, params.cams.num_overlays),
                   PREDICTED: _evaluate(predicted, staging / PREDICTED, params, 0)}
    return index, evaluations


def output_fingerprint(params: Params, hashes: dict) -> str:
    """What the CAM shards are made from: a partial output with another fingerprint is started afresh."""
    return checkpoint.fingerprint(params.cams.model_dump(), hashes, provenance.code_digest(__name__), distributed.current().device.type,
                                 params.compute.shard_size)


def run_cams(params: Params, root: Path) -> dict | None:
    import mlflow

    manifests = {name: load_manifest(root / SPLITS_DIR / f"{name}.json") for name in SPLITS}
    model, state = load_trained_classifier(root / CLASSIFIER_PATH)
    context = distributed.current()
    torch.set_num_threads(context.cpu_threads())
    if not context.is_main:  # a torchrun process but rank 0: its share of the CAMs, nothing logged
        with resumable_dir(root / CAMS_DIR, "", context) as staging:  # rank 0 checks the fingerprint
            write_cams(model, state["class_ids"], manifests, staging, params)
        return None
    hashes = tracking.input_hashes({"model": root / CLASSIFIER_PATH, "splits": root / SPLITS_DIR, "prepared": root / PREPARED_DIR})

    with tracking.stage_run("cams", params.tracking.experiment, stage_params(params), root=root, hashes=hashes):
        with resumable_dir(root / CAMS_DIR, output_fingerprint(params, hashes), context) as staging:
            index, evaluations = write_cams(model, state["class_ids"], manifests, staging, params)
        evaluation = evaluations["val"]
        metrics = cams_metrics(manifests["val"], evaluation, params)
        metrics[PREDICTED] = predicted_metrics(manifests["val"], evaluations[PREDICTED], index, params)
        confidences = [entry["confidence"] for entry in index["images"]["train"]]
        metrics["train_confidence_median"] = float(np.median(confidences)) if confidences else None
        write_csv(root / PER_CLASS_PLOT, _per_class_rows(metrics))
        write_json(root / CAMS_METRICS, metrics)

        mlflow.log_metrics({"cam_miou": metrics["cam"]["miou"], "cam_crf_miou": metrics["cam_crf"]["miou"],
                            "crf_gain_miou": metrics["crf_gain_miou"],
                            "cam_miou_predicted_labels": metrics[PREDICTED]["cam"]["miou"],
                            "cam_crf_miou_predicted_labels": metrics[PREDICTED]["cam_crf"]["miou"],
                            "predicted_labels_macro_f1": metrics[PREDICTED]["labels"]["macro_f1"],
                            **{f"cam_iou_{n}": v for n, v in metrics["cam"]["iou"].items() if v is not None},
                            **{f"cam_crf_iou_{n}": v for n, v in metrics["cam_crf"]["iou"].items() if v is not None}})
        for name, figure in (("cam_overlays.png", overlay_figure(evaluation) if evaluation.examples else None),
                             ("per_class_iou.png", per_class_figure(metrics))):
            if figure is not None:
                mlflow.log_figure(figure, name)
                visualize.close(figure)
        mlflow.log_artifact(str(root / CAMS_METRICS))
    return metrics
