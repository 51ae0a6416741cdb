"""The person stages of the ablation (``pipelines/ablation/dvc.yaml``; the paper's Table 3, column "Person").

- ``person_classifier``: a binary person classifier trained like the step-1 classifier on the
  training images' noisy person labels (before ``split`` dropped them); its person CAM of every
  train and val image (``cams_person/``); its F1 on val (``metrics/person_classifier.json``).
- ``person_masks`` (one per threshold of the grid): a folder of pseudo masks with the person CAMs
  merged in (:func:`wsss.person.merge_person`), then the dense CRF (``person.post_crf``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from wsss import checkpoint, distributed, provenance, tracking
from wsss.cam_inference import compute_cams
from wsss.classifier import BEST, LAST, train_classifier
from wsss.config import Params, flatten
from wsss.io import atomic_dir, read_image, read_mask, write_json
from wsss.metrics import confusion_matrix, segmentation_scores
from wsss.models.classifier import classifier_state, load_trained_classifier
from wsss.person import PersonMerge, best_f1_threshold, person_view
from wsss.shards import MASK, MaskStore, shard_name, shard_numbers, write_index, write_shard
from wsss.stages.common import load_splits, unfinished_run
from wsss.stages.paths import INDEX_FILE, PERSON_CAMS, PERSON_METRICS, PERSON_MODEL, PREPARED_DIR, SPLITS_DIR

PERSON_CHECKPOINTS = Path("checkpoints/person_classifier")
_NOT_IN_FINGERPRINT = {"workers", "threads"}
NO_PERSON = "no person class (data.person_class: null): nothing to classify or merge; the grid's person cells need one"


def binary_scores(predicted: np.ndarray, truth: np.ndarray) -> dict:
    """Precision, recall and F1 of boolean predictions (0, not NaN, when a count is empty)."""
    true_positives = int((predicted & truth).sum())
    precision = true_positives / int(predicted.sum()) if predicted.any() else 0.0
    recall = true_positives / int(truth.sum()) if truth.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"f1": f1, "precision": precision, "recall": recall, "images": int(truth.size), "positives": int(truth.sum())}


def run_person_classifier(params: Params, root: Path) -> dict:
    import mlflow

    manifests = load_splits(root)
    train, val = manifests["train"], manifests["val"]
    person = train.person_class
    if person is None:  # data.person_class: null: the grid's person cells cannot run, the others can
        with atomic_dir(root / PERSON_MODEL.parent) as staging:
            (staging / "UNAVAILABLE.txt").write_text(NO_PERSON + "\n")
        with atomic_dir(root / PERSON_CAMS) as staging:
            write_json(staging / INDEX_FILE, {"available": False})
        metrics = {"available": False, "reason": NO_PERSON}
        write_json(root / PERSON_METRICS, metrics)
        return metrics
    views = {"train": person_view(train, noisy=True), "val": person_view(val, noisy=False)}
    config = params.classifier.model_copy(update={"epochs": params.person.epochs})
    # the step-1 training loop, on the binary view: its one class is the person
    binary_params = params.model_copy(update={"classifier": config, "data": params.data.model_copy(update={"drop_person_labels": False})})
    hashes = tracking.input_hashes({"splits": root / SPLITS_DIR, "prepared": root / PREPARED_DIR})
    run_fingerprint = checkpoint.fingerprint(config.model_dump(exclude=_NOT_IN_FINGERPRINT), params.seed, "person", hashes,
                                             *distributed.precision_fingerprint(), provenance.code_digest(__name__))
    previous = checkpoint.load_if_compatible(root / PERSON_CHECKPOINTS / LAST, run_fingerprint)
    logged = {"seed": params.seed, **flatten(config.model_dump(exclude=_NOT_IN_FINGERPRINT), "classifier."),
              **flatten(params.person.model_dump(), "person.")}

    with tracking.stage_run("person_classifier", params.tracking.experiment, logged, root=root, hashes=hashes,
                            resume_run_id=unfinished_run(previous, config.epochs)) as run:
        result = train_classifier(binary_params, views["train"], views["val"], root / PERSON_CHECKPOINTS, run_fingerprint,
                                  lambda r: mlflow.log_metrics({"loss": r.loss, "val_f1_at_0.5": r.macro_f1}, step=r.epoch),
                                  extra_state={"mlflow_run_id": run.info.run_id})
        kept_epoch = config.epochs if params.person.checkpoint == "last" else result.best_epoch
        kept = checkpoint.load(root / PERSON_CHECKPOINTS / (LAST if params.person.checkpoint == "last" else BEST))
        checkpoint.save(root / PERSON_MODEL, classifier_state(kept["model"], config.arch, config.extra_convs, [person],
                                                              train.class_names, config.image_size))
        model, _ = load_trained_classifier(root / PERSON_MODEL)
        torch.set_num_threads(distributed.available_cpus())
        probability: dict[str, dict[str, float]] = {}
        with atomic_dir(root / PERSON_CAMS) as staging:
            for split, manifest in manifests.items():
                everyone = manifest.derive([replace(r, labels=(person,)) for r in manifest.records])  # a map for every image
                summaries = compute_cams(model, [person], everyone, staging / split, params.cams, distributed.current().device,
                                         desc=f"person cams {split}", workers=params.compute.workers,
                                         shard_size=params.compute.shard_size)
                probability[split] = {s.id: s.confidence for s in summaries}
            val_truth = np.array([person in r.labels for r in val.records])  # complete: from the masks
            val_probability = np.array([probability["val"][r.id] for r in val.records])
            threshold = params.person.presence_threshold
            if threshold == "auto":
                threshold = best_f1_threshold(val_probability, val_truth)
            write_json(staging / INDEX_FILE, {"class_id": person, "probability": probability, "presence_threshold": threshold})

        val_scores = binary_scores(val_probability >= threshold, val_truth)
        metrics = {"presence_threshold": threshold, "presence_rule": "auto (best F1 on val)" if params.person.presence_threshold == "auto" else "fixed",
                   "checkpoint": params.person.checkpoint, "kept_epoch": kept_epoch, "best_epoch": result.best_epoch, "val": val_scores}
        shown = [r for r in train.records if r.mask_labels is not None and person in r.mask_labels]
        if shown:  # embedded and VOC data know which training images really show a person
            unlabelled = [r for r in shown if person not in r.source_labels]
            metrics["train"] = {
                "images_showing_person": len(shown),
                "labelled_share": 1 - len(unlabelled) / len(shown),
                "found_unlabelled_share": (sum(probability["train"][r.id] >= threshold for r in unlabelled) / len(unlabelled)
                                           if unlabelled else None),
            }
        write_json(root / PERSON_METRICS, metrics)
        mlflow.log_metrics({f"val_{k}": v for k, v in val_scores.items()} | {"best_epoch": result.best_epoch, "kept_epoch": kept_epoch,
                                                                             "presence_threshold": threshold})
        mlflow.log_artifact(str(root / PERSON_METRICS))
    return metrics


def run_person_masks(params: Params, root: Path, masks_dir: Path, out_dir: Path, metrics_path: Path) -> dict:
    """``masks_dir``'s pseudo masks with the person merged in where the image shows one."""
    import mlflow

    manifests = load_splits(root)
    person = manifests["train"].person_class
    if person is None:
        with atomic_dir(root / out_dir) as staging:
            (staging / "UNAVAILABLE.txt").write_text(NO_PERSON + "\n")
        metrics = {"person": True, "available": False, "reason": NO_PERSON}
        write_json(root / metrics_path, metrics)
        return metrics
    merge = PersonMerge.of_folder(root / PERSON_CAMS, person, params.person, params.crf)
    config = params.person
    num_classes = manifests["val"].num_classes
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    hashes = tracking.input_hashes({"masks": root / masks_dir, "person_cams": root / PERSON_CAMS})
    logged = {**flatten(config.model_dump(), "person."), **(flatten(params.crf.model_dump(), "crf.") if config.post_crf else {})}
    with_person: dict[str, int] = {}
    with tracking.stage_run("person_masks", params.tracking.experiment, logged, root=root, hashes=hashes):
        with atomic_dir(root / out_dir) as staging:
            for split, manifest in manifests.items():
                (staging / split).mkdir()
                mask_store = MaskStore(root / masks_dir / split)
                records = list(manifest.records)
                masks = [mask_store.load(r.id) for r in records]
                # val: its labels are complete (from the masks) and, as for every other class of the
                # val pseudo masks, they decide; train: the noisy labels or the classifier
                merged, with_person[split] = merge.apply(split, records, lambda p: read_image(manifest.image_path(records[p])),
                                                         masks, "noisy" if split == "train" else "labels")
                for number, positions in enumerate(shard_numbers(len(records), params.compute.shard_size)):
                    write_shard(staging / split / shard_name(number), [(records[p].id, {MASK: merged[p]}) for p in positions])
                write_index(staging / split)
                for record, mask in zip(records, merged, strict=True):
                    if split == "val" and record.mask is not None:
                        matrix += confusion_matrix(read_mask(manifest.mask_path(record)), mask, num_classes)
        scores = segmentation_scores(matrix)
        metrics = {"person": True, "val": scores.as_dict(manifests["val"].class_names), "images_given_person": with_person}
        write_json(root / metrics_path, metrics)
        mlflow.log_metrics({"pseudo_mask_miou": scores.miou})
    return metrics
