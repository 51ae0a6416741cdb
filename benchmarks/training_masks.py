"""What the final model trains on: variants of the training pseudo masks, each scored as ``evaluate`` scores.

Recomputes the training pseudo masks from this checkout's IRNet, CAMs and person CAMs (the
``pseudo_masks`` stage's own code, person merged under ``person.merge``), turns them into one
variant per ``--variant``, trains the ``segmenter`` group on each (no checkpoint to resume from)
and prints val and test mIoU (plain, TTA, TTA + CRF under ``evaluate.crf``) and the share of the
upper bound (``metrics/oracle.json``). Run ``dvc repro oracle`` first.

- ``all``: every pixel of the pseudo masks (``irnet.ignore_uncertain: false``)
- ``uncertain``: pixels where the walk and the CRF disagree ignored (``irnet.ignore_uncertain: true``)
- ``confident``: every pixel, only the images above ``irnet.confidence_cutoff`` (IRNet's training set)
- ``selftrain``: one round of self-training: ``models/segmenter/model.pt``'s TTA prediction of each
  training image, restricted to its image labels (and the person where it shows one), dense CRF

    python benchmarks/training_masks.py --variant all uncertain --seed 2020 2021
    python benchmarks/training_masks.py --variant uncertain --background-seed 0 --seed 2020 2021   # the person floor off
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _scratch import REPO
from wsss import augment, distributed
from wsss.cam import CamStore
from wsss.config import load_params
from wsss.crf import CrfTask, crf_many
from wsss.data.manifest import load_manifest
from wsss.evaluation import evaluate_model, final_mode, post_crf, truth_paths
from wsss.io import IGNORE_INDEX, read_image, read_json, read_mask, write_mask_png
from wsss.irnet_inference import load_irnet
from wsss.metrics import confusion_matrix, segmentation_scores
from wsss.models.segmenter import build_segmenter, load_segmenter
from wsss.person import PersonMerge
from wsss.segmentation import SegmentationDataset, train_segmenter
from wsss.stages.paths import CAMS_DIR, CLASSIFIER_PATH, INDEX_FILE, IRNET_PATH, PERSON_CAMS, SEGMENTER_PATH, SPLITS_DIR
from wsss.stages.ir_labels import confident_ids
from wsss.stages.pseudo_masks import mask_shard
from wsss.stages.segmenter import encoder_inputs, segmenter_spec
from wsss.tta import tta_logits

VARIANTS = ("all", "uncertain", "confident", "selftrain")


def walked_masks(params, train, ignore: bool) -> list[np.ndarray]:
    """The training pseudo masks as the ``pseudo_masks`` stage makes them (with ``ignore``: uncertain pixels 255)."""
    model = load_irnet(params, REPO / IRNET_PATH, REPO / CLASSIFIER_PATH)
    merge = None
    if params.person.merge:
        merge = (PersonMerge.of_folder(REPO / PERSON_CAMS, train.person_class, params.person, params.crf), "train", "noisy")
    cams, records, masks = CamStore(REPO / CAMS_DIR / "train"), train.records, []
    for start in range(0, len(records), params.compute.chunk_size):
        arrays, _ = mask_shard(model, train, records[start : start + params.compute.chunk_size], cams, params, False, merge, ignore)
        masks.extend(a["mask"] for a in arrays)
    return masks


def self_trained_masks(params, train) -> list[np.ndarray]:
    """The trained segmenter's TTA prediction of every training image, only its labels (and the person) allowed, CRF'd."""
    model, _ = load_segmenter(REPO / SEGMENTER_PATH)
    model.eval()
    merge = PersonMerge.of_folder(REPO / PERSON_CAMS, train.person_class, params.person, params.crf) if params.person.merge else None
    masks = []
    for start in range(0, len(train.records), 64):
        records = train.records[start : start + 64]
        images = [read_image(train.image_path(r)) for r in records]
        with torch.no_grad():
            logits = tta_logits(model, torch.stack([augment.to_tensor(i) for i in images]), params.evaluate.tta_scales)
        predictions = []
        for record, scores in zip(records, logits, strict=True):
            allowed = {0, *record.labels} | ({train.person_class} if merge and merge.shows_person("train", record, "noisy") else set())
            scores[[c for c in range(train.num_classes) if c not in allowed]] = -torch.inf
            predictions.append(scores.argmax(0).numpy().astype(np.uint8))
        tasks = [CrfTask(str(i), image, p) for i, (image, p) in enumerate(zip(images, predictions, strict=True))]
        masks.extend(refined for _, refined in crf_many(tasks, params.crf))
    return masks


def train_quality(train, records, masks) -> tuple[float, float]:
    """mIoU of the masks against the training images' true masks (ignored pixels left out) and the share kept."""
    matrix = np.zeros((train.num_classes,) * 2, np.int64)
    kept = total = 0
    for record, mask in zip(records, masks, strict=True):
        truth = read_mask(train.mask_path(record)).copy()
        truth[mask == IGNORE_INDEX] = IGNORE_INDEX
        matrix += confusion_matrix(truth, np.where(mask == IGNORE_INDEX, 0, mask).astype(np.uint8), train.num_classes)
        kept, total = kept + int((mask != IGNORE_INDEX).sum()), total + mask.size
    return segmentation_scores(matrix).miou, kept / total


def train_and_score(params, variant, records, mask_paths, quality, kept_share, splits, oracle, seeds) -> list[dict]:
    """One row per seed: the segmenter group trained on ``mask_paths`` (no checkpoint to resume from), scored like ``evaluate``."""
    train, val, test = splits
    config, mode = params.segmenter, final_mode(params.evaluate.crf)
    val_images, val_masks = truth_paths(val, "val")
    spec = segmenter_spec(params, train)
    weights, _ = encoder_inputs(params, REPO)
    rows = []
    for seed in seeds or [params.seed]:
        dataset = SegmentationDataset([train.image_path(r) for r in records], mask_paths, config.image_size, config.augmentation,
                                      seed, train.num_classes, config.scale_range)
        with tempfile.TemporaryDirectory() as checkpoints:
            start = time.perf_counter()
            result = train_segmenter(config, seed, spec, dataset, val_images, val_masks, Path(checkpoints), f"{variant}-{seed}",
                                     encoder_weights=weights, desc=variant)
            seconds = time.perf_counter() - start
        model = build_segmenter(spec)
        model.load_state_dict(result.best_state)
        scores, _, _ = evaluate_model(model, {"val": val, "test": test}, params.evaluate.tta_scales, post_crf(params))
        rows.append({"variant": variant, "seed": seed, "images": len(records), "train_miou": quality, "kept": kept_share,
                     "val_tta": scores["val"]["tta"]["miou"], "val_final": scores["val"][mode]["miou"],
                     "test_tta": scores["test"]["tta"]["miou"], "test_final": scores["test"][mode]["miou"],
                     "share": scores["test"][mode]["miou"] / oracle["test"][mode]["miou"], "seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", nargs="+", choices=VARIANTS, default=["all", "uncertain"])
    parser.add_argument("--seed", nargs="+", type=int, default=None, help="the segmenter's seeds (default: params.yaml's)")
    parser.add_argument("--epochs", type=int, default=None, help="segmenter epochs (default: params.yaml's)")
    parser.add_argument("--background-seed", type=float, default=None, help="person.background_seed (default: params.yaml's)")
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    distributed.init(params.compute)  # compute.precision and compute.device, as the stages run
    if args.background_seed is not None:
        params = params.model_copy(update={"person": params.person.model_copy(update={"background_seed": args.background_seed})})
    if args.epochs:
        params = params.model_copy(update={"segmenter": params.segmenter.model_copy(update={"epochs": args.epochs})})
    train, val, test = (load_manifest(REPO / SPLITS_DIR / f"{n}.json") for n in ("train", "val", "test"))
    oracle = read_json(REPO / "metrics/oracle.json")
    mode = final_mode(params.evaluate.crf)
    rows = []
    for variant in args.variant:
        records = list(train.records)
        if variant == "selftrain":
            masks = self_trained_masks(params, train)
        else:
            masks = walked_masks(params, train, ignore=variant == "uncertain")
        if variant == "confident":
            kept = set(confident_ids(read_json(REPO / CAMS_DIR / INDEX_FILE), params.irnet.confidence_cutoff))
            records, masks = zip(*[(r, m) for r, m in zip(records, masks, strict=True) if r.id in kept])
        quality, kept_share = train_quality(train, records, masks)
        with tempfile.TemporaryDirectory() as masks_dir:
            paths = [Path(masks_dir) / f"{record.id}.png" for record in records]
            for path, mask in zip(paths, masks, strict=True):
                write_mask_png(path, mask)
            rows.extend(train_and_score(params, variant, records, paths, quality, kept_share, (train, val, test), oracle, args.seed))
    print(f"\n| variant | seed | images | train mIoU (kept pixels) | pixels kept | val TTA | val {mode} | test TTA | test {mode} "
          "| share of the upper bound | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['seed']} | {r['images']} | {r['train_miou']:.4f} | {r['kept']:.3f} | {r['val_tta']:.4f} "
              f"| {r['val_final']:.4f} | {r['test_tta']:.4f} | {r['test_final']:.4f} | {r['share']:.3f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
