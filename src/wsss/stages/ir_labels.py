"""The ``ir_labels`` stage: IR labels of the confident training images.

Outputs: ``ir_labels/<id>.png`` (palette PNG: class ids, 0 background, 255 unsure),
``ir_labels/index.json`` (kept ids and the cutoff), ``metrics/ir_labels.json`` (images kept, share
of fg / bg / ignore pixels, precision of fg and bg pixels against the training masks: a
diagnostic only, never used for training). Under torchrun each process labels its share of the
images (the CRF is the cost); rank 0 writes the index and metrics and logs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from wsss import distributed, tracking
from wsss.cam import CamStore
from wsss.config import Params
from wsss.data.manifest import load_manifest
from wsss.errors import ConfigError
from wsss.io import read_image, read_json, read_mask, write_json, write_mask_png
from wsss.ir_labels import IrInput, ir_labels_many, label_statistics
from wsss.stages.paths import CAMS_DIR, INDEX_FILE, IR_LABELS_DIR, PREPARED_DIR, SPLITS_DIR

METRICS = Path("metrics/ir_labels.json")


def stage_params(params: Params) -> dict:
    irnet = params.irnet
    return {"irnet.confidence_cutoff": irnet.confidence_cutoff, "irnet.conf_fg": irnet.conf_fg, "irnet.conf_bg": irnet.conf_bg,
            **{f"crf.{k}": v for k, v in params.crf.model_dump().items()}}


def confident_ids(index: dict, cutoff: float) -> list[str]:
    """Training images whose confidence exceeds ``cutoff``; an empty result is a parameter error."""
    entries = index["images"]["train"]
    kept = [entry["id"] for entry in entries if entry["confidence"] > cutoff]
    if not kept:
        best = max((entry["confidence"] for entry in entries), default=0.0)
        raise ConfigError("params.yaml", [("irnet.confidence_cutoff", f"{cutoff} keeps no training image "
                                           f"(the highest confidence is {best:.3f}); lower it")])
    return kept


TOTALS = ("fg", "bg", "ignore", "fg_checked", "bg_checked", "fg_correct", "bg_correct")


def write_ir_labels(train, records, root: Path, staging: Path, params: Params) -> dict[str, int]:
    """The IR labels of ``records`` into ``staging`` (this process's share under torchrun), and
    the pixel counts of :func:`label_statistics`, summed over every process."""
    context = distributed.current()
    share = distributed.shard(records, context)
    totals = dict.fromkeys(TOTALS, 0)
    store = CamStore(root / CAMS_DIR / "train")
    size = params.compute.chunk_size  # images per CRF batch: memory follows it, not the dataset
    for start in tqdm(range(0, len(share), size), desc="ir_labels", unit="chunk", disable=not context.is_main):
        chunk = share[start : start + size]
        items = []
        for record in chunk:
            image = read_image(train.image_path(record))
            cams = store.load(record.id, expected_size=image.shape[:2])
            items.append(IrInput(record.id, image, cams.full, cams.class_ids))
        labels = ir_labels_many(items, params.irnet.conf_fg, params.irnet.conf_bg, params.crf)
        for record in chunk:
            write_mask_png(staging / f"{record.id}.png", labels[record.id])
            mask_path = train.mask_path(record)
            counts = label_statistics(labels[record.id], read_mask(mask_path) if mask_path else None)
            for key, value in counts.items():
                totals[key] += value
    if context.is_main:
        write_json(staging / INDEX_FILE, {"confidence_cutoff": params.irnet.confidence_cutoff, "ids": [r.id for r in records]})
    summed = distributed.all_reduce_sum(np.array([totals[key] for key in TOTALS], dtype=np.int64), context)
    return {key: int(value) for key, value in zip(TOTALS, summed, strict=True)}


def run_ir_labels(params: Params, root: Path) -> dict | None:
    import mlflow

    train = load_manifest(root / SPLITS_DIR / "train.json")
    index = read_json(root / CAMS_DIR / INDEX_FILE)
    kept = set(confident_ids(index, params.irnet.confidence_cutoff))
    records = [r for r in train.records if r.id in kept]
    if not distributed.current().is_main:  # a torchrun process but rank 0: its share, nothing logged
        with distributed.shared_atomic_dir(root / IR_LABELS_DIR) as staging:
            write_ir_labels(train, records, root, staging, params)
        return None
    hashes = tracking.input_hashes({"cams": root / CAMS_DIR, "splits": root / SPLITS_DIR, "prepared": root / PREPARED_DIR})

    with tracking.stage_run("ir_labels", params.tracking.experiment, stage_params(params), root=root, hashes=hashes):
        with distributed.shared_atomic_dir(root / IR_LABELS_DIR) as staging:
            totals = write_ir_labels(train, records, root, staging, params)

        pixels = totals["fg"] + totals["bg"] + totals["ignore"]
        metrics = {
            "images_kept": len(records),
            "images_train": len(train.records),
            "kept_share": len(records) / len(train.records),
            "fg_share": totals["fg"] / pixels,
            "bg_share": totals["bg"] / pixels,
            "ignore_share": totals["ignore"] / pixels,
            "fg_precision": totals["fg_correct"] / totals["fg_checked"] if totals["fg_checked"] else None,
            "bg_precision": totals["bg_correct"] / totals["bg_checked"] if totals["bg_checked"] else None,
        }
        write_json(root / METRICS, metrics)
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
        mlflow.log_artifact(str(root / METRICS))
    return metrics
