"""The person CAM as a floor of the walk's background seed (``person.background_seed``): val pseudo masks per value.

Walks the val images with this checkout's IRNet, CAMs and person CAMs (run ``dvc repro pseudo_masks``
first) as the ``pseudo_masks`` stage does (its own ``mask_shard``: walk, CRF, person merge), once per
``--values`` entry, with the image labels (irn's protocol) and with the classifier's predicted labels,
and prints mIoU and the IoU of the classes an object's spill over the person hurts. What the final model
gains: ``benchmarks/training_masks.py --background-seed``.

    python benchmarks/person_floor.py --values 0 0.3 0.45 0.5 0.6 0.7
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _scratch import REPO
from wsss.cam import CamStore
from wsss.config import load_params
from wsss.irnet_inference import load_irnet
from wsss.metrics import segmentation_scores
from wsss.person import PersonMerge
from wsss.shards import matrix_from_meta
from wsss.stages.paths import CAMS_DIR, CLASSIFIER_PATH, IRNET_PATH, PERSON_CAMS, PREDICTED
from wsss.stages.pseudo_masks import PRESENCE, SPLIT_SOURCES, mask_shard, stage_manifests

SHOWN = ("trouser", "dress", "coat", "sneaker", "ankle_boot", "t_shirt", "bag")


def val_scores(params, manifests, model, split: str) -> tuple[float, dict[str, float]]:
    """mIoU and per-class IoU of one scored split's pseudo masks (``val`` or ``val_predicted``)."""
    manifest = manifests[split]
    merge = PersonMerge.of_folder(REPO / PERSON_CAMS, manifest.person_class, params.person, params.crf)
    cams, records = CamStore(REPO / CAMS_DIR / split), list(manifest.records)
    matrix = np.zeros((manifest.num_classes,) * 2, np.int64)
    for start in range(0, len(records), params.compute.chunk_size):
        chunk = records[start : start + params.compute.chunk_size]
        _, meta = mask_shard(model, manifest, chunk, cams, params, True, (merge, SPLIT_SOURCES[split], PRESENCE[split]))
        matrix += matrix_from_meta(meta["confusion"], manifest.num_classes)
    scores = segmentation_scores(matrix)
    return scores.miou, dict(zip(manifest.class_names, scores.iou, strict=True))


def walk_inputs(what: str):
    """``params.yaml``, the stage's manifests and the trained IRNet, on 2 threads; exits unless the person
    is merged and the background walked (``what``: the subject of that message)."""
    base = load_params(REPO / "params.yaml")
    if not base.person.merge or base.irnet.background != "walk":
        raise SystemExit(f"{what} with person.merge: true and irnet.background: walk (params.yaml)")
    torch.set_num_threads(2)
    return base, stage_manifests(REPO), load_irnet(base, REPO / IRNET_PATH, REPO / CLASSIFIER_PATH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", nargs="+", type=float, default=[0.0, 0.3, 0.45, 0.5, 0.6, 0.7])
    args = parser.parse_args()
    base, manifests, model = walk_inputs("person.background_seed acts")
    rows = []
    for value in args.values:
        params = base.model_copy(update={"person": base.person.model_copy(update={"background_seed": value})})
        start = time.perf_counter()
        miou, iou = val_scores(params, manifests, model, "val")
        predicted, _ = val_scores(params, manifests, model, PREDICTED)
        rows.append((value, miou, predicted, iou, time.perf_counter() - start))
        print(f"background_seed {value}: val {miou:.4f}, predicted labels {predicted:.4f}", flush=True)
    print("\n| background_seed | val mIoU (image labels) | val mIoU (predicted labels) | " + " | ".join(SHOWN) + " | seconds |")
    print("|---:|---:|---:|" + "---:|" * len(SHOWN) + "---:|")
    for value, miou, predicted, iou, seconds in rows:
        print(f"| {value} | {miou:.4f} | {predicted:.4f} | " + " | ".join(f"{iou[n]:.3f}" for n in SHOWN) + f" | {seconds:.0f} |")


if __name__ == "__main__":
    main()
