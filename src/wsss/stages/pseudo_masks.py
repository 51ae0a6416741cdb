"""The ``pseudo_masks`` stage (step 2): ``pseudo_masks/{train,val}/shard-*.npz`` + ``shards.json``
(:class:`wsss.shards.MaskStore`: one uint8 class-id map per image; a killed run resumes from its last
complete shard) for every train and val image, ``metrics/pseudo_masks.json`` (val mIoU, per-class IoU: the paper's Table 2 row
"IRNet"; with ``irnet.post_crf`` also the mIoU before the CRF), ``plots/pseudo_masks/per_class_iou.csv``;
MLflow gets an overlay figure (image | CAM + CRF | pseudo mask | ground truth). Under torchrun
each process walks its share of the shards; the val confusion matrices (in the shards' meta) are
summed and rank 0 logs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wsss import checkpoint, distributed, provenance, tracking, visualize
from wsss.cam import CamStore, label_map
from wsss.config import IrnetParams, Params, flatten
from wsss.crf import crf_labels
from wsss.data.manifest import Manifest, load_manifest
from wsss.io import read_image, read_json, read_mask, write_csv, write_json
from wsss.irnet_inference import load_irnet, pseudo_masks
from wsss.metrics import confusion_matrix, segmentation_scores
from wsss.shards import (MASK, MaskStore, fill_shards, matrix_from_meta, matrix_meta, metas, resumable_dir, shard_numbers,
                         write_index)
from wsss.stages.common import background_knob
from wsss.stages.paths import CAMS_DIR, CAMS_METRICS, CLASSIFIER_PATH, IRNET_PATH, PSEUDO_DIR, SPLITS_DIR

PSEUDO_METRICS = Path("metrics/pseudo_masks.json")
PSEUDO_PLOT = Path("plots/pseudo_masks/per_class_iou.csv")
WALK_KEYS = ("infer_radius", "infer_scale", "beta", "exp_times", "background", "threshold", "bg_weight", "post_crf")


def _overlay_figure(examples: list[dict]):
    rows = [[e["image"], visualize.overlay(e["image"], e["cam_crf"]), visualize.overlay(e["image"], e["pseudo"]),
             visualize.overlay(e["image"], e["truth"])] for e in examples]
    return visualize.image_grid(rows, titles=["image", "CAM + CRF", "IRNet pseudo mask", "ground truth"], row_labels=[e["id"] for e in examples])


def mask_shard(model, manifest: Manifest, shard_records: list, cams: CamStore, params: Params,
               scored: bool) -> tuple[list[dict[str, np.ndarray]], dict]:
    """The pseudo masks of one shard's images and the shard's meta: with ``scored`` (val) the confusion
    matrices of its masks after and before the CRF against the ground truth."""
    num_classes = manifest.num_classes
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    walk_matrix = np.zeros_like(matrix)
    arrays = []
    for item in pseudo_masks(model, manifest.derive(shard_records), cams, params, show=False):
        arrays.append({MASK: item.mask})
        if scored and item.record.mask is not None:
            truth = read_mask(manifest.mask_path(item.record))
            matrix += confusion_matrix(truth, item.mask, num_classes)
            walk_matrix += confusion_matrix(truth, item.walked, num_classes)
    return arrays, ({"confusion": matrix_meta(matrix), "walk_confusion": matrix_meta(walk_matrix)} if scored else {})


def write_pseudo_masks(model, manifests: dict[str, Manifest], cams_root: Path, out_dir: Path,
                       params: Params) -> tuple[np.ndarray, np.ndarray]:
    """The pseudo masks of each manifest as shards in ``out_dir/<split>/`` (:class:`MaskStore`; under
    torchrun each process writes its share of the shards; shards already there are kept: a killed
    run resumes); returns the val confusion matrices after and before the CRF, summed over the shards."""
    context = distributed.current()
    size = params.compute.shard_size
    for split, manifest in manifests.items():
        records = manifest.records
        mine = distributed.shard(list(range(len(shard_numbers(len(records), size)))), context)

        def make(positions, manifest=manifest, records=records, cams=CamStore(cams_root / split), scored=split == "val"):
            return mask_shard(model, manifest, [records[p] for p in positions], cams, params, scored)

        fill_shards(out_dir / split, [r.id for r in records], mine, size, make, desc=f"pseudo masks {split}", show=context.is_main)
    distributed.barrier(context)
    if context.is_main:
        for split in manifests:
            write_index(out_dir / split)
    distributed.barrier(context)
    num_classes = manifests["val"].num_classes
    val_metas = metas(out_dir / "val")
    return (sum((matrix_from_meta(meta["confusion"], num_classes) for meta in val_metas), np.zeros((num_classes,) * 2, np.int64)),
            sum((matrix_from_meta(meta["walk_confusion"], num_classes) for meta in val_metas), np.zeros((num_classes,) * 2, np.int64)))


def overlay_examples(val: Manifest, masks_dir: Path, cams_dir: Path, params: Params) -> list[dict]:
    """The first ``cams.num_overlays`` val images with a mask: image, CAM + CRF, stored pseudo mask, truth."""
    records = [r for r in val.records if r.mask is not None][: params.cams.num_overlays]
    if not records:
        return []
    masks, cams = MaskStore(masks_dir), CamStore(cams_dir)
    examples = []
    for record in records:
        image = read_image(val.image_path(record))
        maps = cams.load(record.id, expected_size=image.shape[:2])
        cam_crf = crf_labels(image, label_map(maps.full, maps.class_ids, params.cams.eval_threshold), params.crf)
        examples.append({"id": record.id, "image": image, "cam_crf": cam_crf, "pseudo": masks.load(record.id, image.shape[:2]),
                         "truth": read_mask(val.mask_path(record))})
    return examples


def output_fingerprint(params: Params, hashes: dict) -> str:
    """What pseudo-mask shards are made from: a partial output with another fingerprint is started afresh."""
    return checkpoint.fingerprint(params.irnet.model_dump(exclude={"workers", "threads"}), params.crf.model_dump(exclude={"workers"}),
                                  hashes, provenance.code_digest(__name__),
                                  distributed.current().device.type, params.compute.shard_size, params.compute.chunk_size)


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


def run_pseudo_masks(params: Params, root: Path) -> dict | None:
    import mlflow

    manifests = {name: load_manifest(root / SPLITS_DIR / f"{name}.json") for name in ("train", "val")}
    context = distributed.current()
    model = load_irnet(params, root / IRNET_PATH, root / CLASSIFIER_PATH, context.device)
    torch.set_num_threads(context.cpu_threads())
    if not context.is_main:  # a torchrun process but rank 0: its share, nothing logged
        with resumable_dir(root / PSEUDO_DIR, "", context) as staging:  # rank 0 checks the fingerprint
            write_pseudo_masks(model, manifests, root / CAMS_DIR, staging, params)
        return None
    hashes = tracking.input_hashes({"irnet": root / IRNET_PATH, "cams": root / CAMS_DIR, "splits": root / SPLITS_DIR})
    walk = params.irnet
    logged = {f"irnet.{k}": getattr(walk, k) for k in WALK_KEYS}
    if walk.post_crf:
        logged.update(flatten(params.crf.model_dump(), "crf."))

    with tracking.stage_run("pseudo_masks", params.tracking.experiment, logged, root=root, hashes=hashes):
        with resumable_dir(root / PSEUDO_DIR, output_fingerprint(params, hashes), context) as staging:
            matrix, walk_matrix = write_pseudo_masks(model, manifests, root / CAMS_DIR, staging, params)
        examples = overlay_examples(manifests["val"], root / PSEUDO_DIR / "val", root / CAMS_DIR / "val", params)

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
