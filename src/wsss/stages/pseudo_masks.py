"""The ``pseudo_masks`` stage (step 2): ``pseudo_masks/{train,val}/shard-*.npz`` + ``shards.json``
(:class:`wsss.shards.MaskStore`: one uint8 class-id map per image; a killed run resumes from its last
complete shard) for every train and val image, ``metrics/pseudo_masks.json`` (val mIoU, per-class IoU: the paper's Table 2 row
"IRNet"; with ``irnet.post_crf`` also the mIoU before the CRF), ``plots/pseudo_masks/per_class_iou.csv``;
MLflow gets an overlay figure (image | CAM + CRF | pseudo mask | ground truth). Under torchrun
each process walks its share of the shards; the val confusion matrices (in the shards' meta) are
summed and rank 0 logs.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch

from wsss import checkpoint, distributed, provenance, tracking, visualize
from wsss.cam import CamStore, label_map
from wsss.config import IrnetParams, Params, flatten
from wsss.crf import crf_labels
from wsss.data.manifest import Manifest, load_manifest
from wsss.io import IGNORE_INDEX, read_image, read_json, read_mask, write_csv, write_json
from wsss.irnet_inference import load_irnet, pseudo_masks
from wsss.metrics import confusion_matrix, segmentation_scores
from wsss.shards import (MASK, MaskStore, fill_shards, matrix_from_meta, matrix_meta, metas, resumable_dir, shard_numbers,
                         write_index)
from wsss.errors import ConfigError, DataError
from wsss.person import PersonMerge
from wsss.uncertain import uncertain_pixels
from wsss.stages.common import background_knob
from wsss.stages.paths import (CAMS_DIR, CAMS_METRICS, CLASSIFIER_PATH, INDEX_FILE, IRNET_PATH, PERSON_CAMS, PREDICTED, PSEUDO_DIR,
                               SPLITS_DIR)

PSEUDO_METRICS = Path("metrics/pseudo_masks.json")
PSEUDO_PLOT = Path("plots/pseudo_masks/per_class_iou.csv")
WALK_KEYS = ("infer_radius", "infer_scale", "beta", "exp_times", "background", "threshold", "bg_weight", "post_crf",
             "ignore_uncertain")


def _overlay_figure(examples: list[dict]):
    rows = [[e["image"], visualize.overlay(e["image"], e["cam_crf"]), visualize.overlay(e["image"], e["pseudo"]),
             visualize.overlay(e["image"], e["truth"])] for e in examples]
    return visualize.image_grid(rows, titles=["image", "CAM + CRF", "IRNet pseudo mask", "ground truth"], row_labels=[e["id"] for e in examples])


# The splits this stage writes, and whose image labels its masks are made with: train and val their
# own (irn's protocol for val), val_predicted the classifier's predictions (cams/val_predicted)
SPLIT_SOURCES = {"train": "train", "val": "val", PREDICTED: "val"}
PRESENCE = {"train": "noisy", "val": "labels", PREDICTED: "predicted"}  # who says an image shows a person
CONFUSIONS = ("confusion", "walk_confusion", "unmerged_confusion")


def stage_manifests(root: Path) -> dict[str, Manifest]:
    """train, val and val with the predicted labels the ``cams`` stage chose (``cams/index.json``)."""
    manifests = {name: load_manifest(root / SPLITS_DIR / f"{name}.json") for name in ("train", "val")}
    index = read_json(root / CAMS_DIR / INDEX_FILE)
    try:
        predicted = index["predicted_labels"]
        manifests[PREDICTED] = manifests["val"].derive([r.with_labels(tuple(predicted[r.id])) for r in manifests["val"].records])
    except KeyError as error:
        raise DataError(root / CAMS_DIR / INDEX_FILE, f"no predicted labels for val image {error} (re-run the cams stage)") from None
    return manifests


def mask_shard(model, manifest: Manifest, shard_records: list, cams: CamStore, params: Params, scored: bool,
               merge: tuple[PersonMerge, str, str] | None = None, ignore: bool = False) -> tuple[list[dict[str, np.ndarray]], dict]:
    """The pseudo masks of one shard's images and the shard's meta: with ``scored`` (val) the confusion
    matrices of its masks against the ground truth: final, of the walk alone (before any CRF) and,
    with ``merge`` (the person merge, its person-CAM split and presence rule), before the merge; under
    ``merge`` and ``person.background_seed`` the person CAM floors the walk's background seed. With
    ``ignore`` (training masks under ``irnet.ignore_uncertain``) the pixels where the walk and the CRF
    disagree are stored as 255 (:mod:`wsss.uncertain`), and the meta counts them."""
    num_classes = manifest.num_classes
    matrices = {name: np.zeros((num_classes, num_classes), dtype=np.int64) for name in CONFUSIONS}
    floor = None
    if merge is not None:
        person_merge, split, presence = merge
        floor = partial(person_merge.background_floor, split, presence=presence)  # None per image when off
    items = list(pseudo_masks(model, manifest.derive(shard_records), cams, params, show=False, background_floor=floor))
    masks = [item.mask for item in items]
    if merge is not None:
        masks, _ = person_merge.apply(split, shard_records, lambda p: items[p].image, masks, presence)
    if scored:
        for item, mask in zip(items, masks, strict=True):
            if item.record.mask is not None:
                truth = read_mask(manifest.mask_path(item.record))
                matrices["confusion"] += confusion_matrix(truth, mask, num_classes)
                matrices["walk_confusion"] += confusion_matrix(truth, item.walked, num_classes)
                matrices["unmerged_confusion"] += confusion_matrix(truth, item.mask, num_classes)
    meta = {name: matrix_meta(m) for name, m in matrices.items()} if scored else {}
    if ignore:
        uncertain = [uncertain_pixels(item.walked, item.mask, mask) for item, mask in zip(items, masks, strict=True)]
        masks = [np.where(u, np.uint8(IGNORE_INDEX), mask).astype(np.uint8) for u, mask in zip(uncertain, masks, strict=True)]
        meta.update(ignored=int(sum(u.sum() for u in uncertain)), pixels=int(sum(u.size for u in uncertain)))
    return [{MASK: mask} for mask in masks], meta


def write_pseudo_masks(model, manifests: dict[str, Manifest], cams_root: Path, out_dir: Path, params: Params,
                       merge: PersonMerge | None = None, ignore_uncertain: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """The pseudo masks of each manifest as shards in ``out_dir/<split>/`` (:class:`MaskStore`; under
    torchrun each process writes its share of the shards; shards already there are kept: a killed
    run resumes), with the person merged in under ``merge`` and, with ``ignore_uncertain``, the
    uncertain pixels of the training masks as 255; returns each scored split's (every one but train)
    confusion matrices (:data:`CONFUSIONS`), summed over the shards."""
    context = distributed.current()
    size = params.compute.shard_size
    for split, manifest in manifests.items():
        records = manifest.records
        mine = distributed.shard(list(range(len(shard_numbers(len(records), size)))), context)
        split_merge = None if merge is None else (merge, SPLIT_SOURCES[split], PRESENCE[split])

        def make(positions, manifest=manifest, records=records, cams=CamStore(cams_root / split), scored=split != "train",
                 split_merge=split_merge, ignore=ignore_uncertain and split == "train"):
            return mask_shard(model, manifest, [records[p] for p in positions], cams, params, scored, split_merge, ignore)

        fill_shards(out_dir / split, [r.id for r in records], mine, size, make, desc=f"pseudo masks {split}", show=context.is_main)
    distributed.barrier(context)
    if context.is_main:
        for split in manifests:
            write_index(out_dir / split)
    distributed.barrier(context)
    num_classes = manifests["val"].num_classes
    empty = np.zeros((num_classes,) * 2, np.int64)
    return {split: {name: sum((matrix_from_meta(meta[name], num_classes) for meta in metas(out_dir / split)), empty)
                    for name in CONFUSIONS}
            for split in manifests if split != "train"}


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


def output_fingerprint(params: Params, hashes: dict, merged: bool = False) -> str:
    """What pseudo-mask shards are made from (with ``merged``, the person merge's settings too; its CAMs are
    in ``hashes``): a partial output with another fingerprint is started afresh."""
    person = [params.person.model_dump(exclude={"epochs"})] if merged else []
    return checkpoint.fingerprint(params.irnet.model_dump(exclude={"workers", "threads"}), params.crf.model_dump(exclude={"workers"}),
                                  hashes, provenance.code_digest(__name__),
                                  distributed.current().device.type, params.compute.shard_size, params.compute.chunk_size,
                                  *person)


def split_scores(matrices: dict[str, np.ndarray], val: Manifest, walk: IrnetParams, merged: bool) -> dict:
    """One split's block of ``metrics/pseudo_masks.json``: mIoU and per-class IoU (without the person
    class too), with ``walk.post_crf`` the mIoU of the walk alone, with ``merged`` that before the merge."""
    scores = segmentation_scores(matrices["confusion"])
    block = scores.as_dict(val.class_names)
    if val.person_class is not None:
        block["miou_without_person"] = scores.miou_without(val.person_class)
    if walk.post_crf:
        block["before_crf_miou"] = segmentation_scores(matrices["walk_confusion"]).miou
    if merged:
        block["before_person_merge_miou"] = segmentation_scores(matrices["unmerged_confusion"]).miou
    return block


def pseudo_mask_metrics(matrices: dict[str, dict[str, np.ndarray]], val: Manifest, walk: IrnetParams, merged: bool = False) -> dict:
    """``metrics/pseudo_masks.json``'s scores: each scored split's block (:func:`split_scores`; ``val``
    with the image labels, irn's protocol, ``val_predicted`` with the classifier's), how the masks were
    made (the background knob in use only: the other one does not change them) and whether the
    person was merged in."""
    knob = background_knob(walk)
    metrics = {split: split_scores(split_matrices, val, walk, merged) for split, split_matrices in matrices.items()}
    return {**metrics, "background": walk.background, knob: getattr(walk, knob), "post_crf": walk.post_crf, "person_merge": merged}


def ignored_share(shard_metas: list[dict]) -> float:
    """The share of the training masks' pixels stored as 255 (uncertain), from their shards' meta."""
    pixels = sum(meta["pixels"] for meta in shard_metas)
    return sum(meta["ignored"] for meta in shard_metas) / pixels if pixels else 0.0


def load_person_merge(params: Params, root: Path, person: int | None) -> PersonMerge | None:
    """The person merge of ``params.person`` on the person_classifier stage's CAMs (None when ``person.merge`` is off)."""
    if not params.person.merge:
        return None
    if person is None:
        raise ConfigError("params.yaml", [("person.merge", "true needs a person class, but data.person_class is null")])
    return PersonMerge.of_folder(root / PERSON_CAMS, person, params.person, params.crf)


def run_pseudo_masks(params: Params, root: Path) -> dict | None:
    import mlflow

    manifests = stage_manifests(root)
    context = distributed.current()
    model = load_irnet(params, root / IRNET_PATH, root / CLASSIFIER_PATH, context.device)
    merge = load_person_merge(params, root, manifests["val"].person_class)
    torch.set_num_threads(context.cpu_threads())
    if not context.is_main:  # a torchrun process but rank 0: its share, nothing logged
        with resumable_dir(root / PSEUDO_DIR, "", context) as staging:  # rank 0 checks the fingerprint
            write_pseudo_masks(model, manifests, root / CAMS_DIR, staging, params, merge, params.irnet.ignore_uncertain)
        return None
    hashes = tracking.input_hashes({"irnet": root / IRNET_PATH, "cams": root / CAMS_DIR, "splits": root / SPLITS_DIR,
                                    **({"person_cams": root / PERSON_CAMS} if merge else {})})
    walk = params.irnet
    logged = {**{f"irnet.{k}": getattr(walk, k) for k in WALK_KEYS}, "person.merge": params.person.merge}
    if walk.post_crf or (merge and params.person.post_crf):
        logged.update(flatten(params.crf.model_dump(), "crf."))
    if merge:
        logged.update({f"person.{k}": getattr(params.person, k) for k in ("presence_threshold", "cam_threshold", "post_crf", "background_seed")})

    with tracking.stage_run("pseudo_masks", params.tracking.experiment, logged, root=root, hashes=hashes):
        with resumable_dir(root / PSEUDO_DIR, output_fingerprint(params, hashes, merge is not None), context) as staging:
            matrices = write_pseudo_masks(model, manifests, root / CAMS_DIR, staging, params, merge, walk.ignore_uncertain)
        examples = overlay_examples(manifests[PREDICTED], root / PSEUDO_DIR / PREDICTED, root / CAMS_DIR / PREDICTED, params)

        metrics = pseudo_mask_metrics(matrices, manifests["val"], walk, merge is not None)
        if walk.ignore_uncertain:
            metrics["train"] = {"ignored_share": ignored_share(metas(root / PSEUDO_DIR / "train"))}
        if (root / CAMS_METRICS).is_file():
            cams = read_json(root / CAMS_METRICS)
            metrics["gain_over_cam_crf"] = metrics["val"]["miou"] - cams["cam_crf"]["miou"]
            if PREDICTED in cams:
                metrics[PREDICTED]["gain_over_cam_crf"] = metrics[PREDICTED]["miou"] - cams[PREDICTED]["cam_crf"]["miou"]
        write_json(root / PSEUDO_METRICS, metrics)
        write_csv(root / PSEUDO_PLOT, [{"class": n, "iou": _cell(v), "iou_predicted_labels": _cell(metrics[PREDICTED]["iou"][n])}
                                       for n, v in metrics["val"]["iou"].items()])
        logged_metrics = {"pseudo_mask_miou": metrics["val"]["miou"], "pseudo_mask_miou_predicted_labels": metrics[PREDICTED]["miou"],
                          **{f"pseudo_iou_{n}": v for n, v in metrics["val"]["iou"].items() if v is not None}}
        for split, suffix in (("val", ""), (PREDICTED, "_predicted_labels")):
            for key, name in (("before_crf_miou", "pseudo_mask_miou_before_crf"), ("before_person_merge_miou", "pseudo_mask_miou_before_person_merge")):
                if key in metrics[split]:
                    logged_metrics[name + suffix] = metrics[split][key]
        if "train" in metrics:
            logged_metrics["pseudo_mask_train_ignored_share"] = metrics["train"]["ignored_share"]
        mlflow.log_metrics(logged_metrics)
        if examples:
            figure = _overlay_figure(examples)
            mlflow.log_figure(figure, "pseudo_mask_overlays.png")
            visualize.close(figure)
        mlflow.log_artifact(str(root / PSEUDO_METRICS))
    return metrics


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"
