"""The ``pseudo_masks`` stage (step 2): ``pseudo_masks/{train,val}/<id>.png`` (palette PNGs) for every
train and val image, ``metrics/pseudo_masks.json`` (val mIoU, per-class IoU: the paper's Table 2 row
"IRNet"; with ``irnet.post_crf`` also the mIoU before the CRF), ``plots/pseudo_masks/per_class_iou.csv``;
MLflow gets an overlay figure (image | CAM + CRF | pseudo mask | ground truth). Under torchrun
each process walks its share of the images; the val confusion matrices are summed and rank 0 logs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wsss import distributed, tracking, visualize
from wsss.cam import label_map
from wsss.config import IrnetParams, Params, flatten
from wsss.crf import crf_labels
from wsss.data.manifest import Manifest, load_manifest
from wsss.io import read_json, read_mask, write_csv, write_json, write_mask_png
from wsss.irnet_inference import load_irnet, pseudo_masks
from wsss.metrics import confusion_matrix, segmentation_scores
from wsss.stages.common import background_knob
from wsss.stages.paths import CAMS_DIR, CAMS_METRICS, CLASSIFIER_PATH, IRNET_PATH, PSEUDO_DIR, SPLITS_DIR

PSEUDO_METRICS = Path("metrics/pseudo_masks.json")
PSEUDO_PLOT = Path("plots/pseudo_masks/per_class_iou.csv")
WALK_KEYS = ("infer_radius", "infer_scale", "beta", "exp_times", "background", "threshold", "bg_weight", "post_crf")


def _overlay_figure(examples: list[dict]):
    rows = [[e["image"], visualize.overlay(e["image"], e["cam_crf"]), visualize.overlay(e["image"], e["pseudo"]),
             visualize.overlay(e["image"], e["truth"])] for e in examples]
    return visualize.image_grid(rows, titles=["image", "CAM + CRF", "IRNet pseudo mask", "ground truth"], row_labels=[e["id"] for e in examples])


def write_pseudo_masks(model, manifests: dict[str, Manifest], cams_root: Path, out_dir: Path,
                       params: Params) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Write ``out_dir/<split>/<id>.png`` for each manifest; return the val confusion matrices
    after and before the CRF, and the first ``cams.num_overlays`` val examples for a figure."""
    num_classes = next(iter(manifests.values())).num_classes
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    walk_matrix = np.zeros_like(matrix)
    examples: list[dict] = []
    for split, manifest in manifests.items():
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        for item in pseudo_masks(model, manifest, cams_root / split, params, desc=f"pseudo masks {split}"):
            write_mask_png(out_dir / split / f"{item.record.id}.png", item.mask)
            if split != "val" or item.record.mask is None:
                continue
            truth = read_mask(manifest.mask_path(item.record))
            matrix += confusion_matrix(truth, item.mask, num_classes)
            walk_matrix += confusion_matrix(truth, item.walked, num_classes)
            if len(examples) < params.cams.num_overlays:
                cam_crf = crf_labels(item.image, label_map(item.cams.full, item.cams.class_ids, params.cams.eval_threshold), params.crf)
                examples.append({"id": item.record.id, "image": item.image, "cam_crf": cam_crf, "pseudo": item.mask, "truth": truth})
    return matrix, walk_matrix, examples


def pseudo_mask_metrics(matrix: np.ndarray, walk_matrix: np.ndarray, val: Manifest, walk: IrnetParams) -> dict:
    """``metrics/pseudo_masks.json``'s scores: val mIoU and per-class IoU (without the person class
    too), how the masks were made (the background knob in use only: the other one does not change
    them), and with ``walk.post_crf`` the mIoU before the CRF."""
    scores = segmentation_scores(matrix)
    knob = background_knob(walk)
    metrics = {"val": scores.as_dict(val.class_names), "background": walk.background, knob: getattr(walk, knob),
               "post_crf": walk.post_crf}
    if val.person_class is not None:
        metrics["val"]["miou_without_person"] = scores.miou_without(val.person_class)
    if walk.post_crf:
        metrics["val_before_crf_miou"] = segmentation_scores(walk_matrix).miou
    return metrics


def write_shared_pseudo_masks(model, manifests: dict[str, Manifest], cams_root: Path, out_dir: Path,
                             params: Params) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """:func:`write_pseudo_masks` of this process's share of each manifest (all of it in a single
    process); the val confusion matrices summed over processes."""
    context = distributed.current()
    shares = {split: manifest.derive(distributed.shard(manifest.records, context)) for split, manifest in manifests.items()}
    matrix, walk_matrix, examples = write_pseudo_masks(model, shares, cams_root, out_dir, params)
    return distributed.all_reduce_sum(matrix, context), distributed.all_reduce_sum(walk_matrix, context), examples


def run_pseudo_masks(params: Params, root: Path) -> dict | None:
    import mlflow

    manifests = {name: load_manifest(root / SPLITS_DIR / f"{name}.json") for name in ("train", "val")}
    model = load_irnet(params, root / IRNET_PATH, root / CLASSIFIER_PATH, distributed.current().device)
    torch.set_num_threads(distributed.current().cpu_threads())
    if not distributed.current().is_main:  # a torchrun process but rank 0: its share, nothing logged
        with distributed.shared_atomic_dir(root / PSEUDO_DIR) as staging:
            write_shared_pseudo_masks(model, manifests, root / CAMS_DIR, staging, params)
        return None
    hashes = tracking.input_hashes({"irnet": root / IRNET_PATH, "cams": root / CAMS_DIR, "splits": root / SPLITS_DIR})
    walk = params.irnet
    logged = {f"irnet.{k}": getattr(walk, k) for k in WALK_KEYS}
    if walk.post_crf:
        logged.update(flatten(params.crf.model_dump(), "crf."))

    with tracking.stage_run("pseudo_masks", params.tracking.experiment, logged, root=root, hashes=hashes):
        with distributed.shared_atomic_dir(root / PSEUDO_DIR) as staging:
            matrix, walk_matrix, examples = write_shared_pseudo_masks(model, manifests, root / CAMS_DIR, staging, params)

        metrics = pseudo_mask_metrics(matrix, walk_matrix, manifests["val"], walk)
        scores = segmentation_scores(matrix)
        if (root / CAMS_METRICS).is_file():
            metrics["gain_over_cam_crf"] = scores.miou - read_json(root / CAMS_METRICS)["cam_crf"]["miou"]
        write_json(root / PSEUDO_METRICS, metrics)
        write_csv(root / PSEUDO_PLOT, [{"class": n, "iou": "" if v is None else f"{v:.6f}"} for n, v in metrics["val"]["iou"].items()])
        mlflow.log_metrics({"pseudo_mask_miou": scores.miou, **{f"pseudo_iou_{n}": v for n, v in metrics["val"]["iou"].items() if v is not None},
                            **({"pseudo_mask_miou_before_crf": metrics["val_before_crf_miou"]} if walk.post_crf else {})})
        if examples:
            figure = _overlay_figure(examples)
            mlflow.log_figure(figure, "pseudo_mask_overlays.png")
            visualize.close(figure)
        mlflow.log_artifact(str(root / PSEUDO_METRICS))
    return metrics
