"""The ``ir_labels`` stage: IR labels of the confident training images.

Outputs: ``ir_labels/shard-*.npz`` + ``shards.json`` (:class:`wsss.shards.MaskStore`: one uint8 map per
image, class ids, 0 background, 255 unsure; a killed run resumes from its last complete shard),
``ir_labels/index.json`` (kept ids and the cutoff), ``metrics/ir_labels.json`` (images kept, share
of fg / bg / ignore pixels, precision of fg and bg pixels against the training masks: a
diagnostic only, never used for training). Under torchrun each process labels its share of the
shards (the CRF is the cost); rank 0 writes the index and metrics and logs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsss import checkpoint, distributed, provenance, tracking
from wsss.cam import CamStore
from wsss.config import SPEED_KNOBS, Params
from wsss.data.manifest import load_manifest
from wsss.errors import ConfigError
from wsss.io import read_image, read_json, read_mask, write_json
from wsss.ir_labels import IrInput, ir_labels_many, label_statistics
from wsss.shards import MASK, fill_shards, metas, resumable_dir, shard_numbers, write_index
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


def label_shard(train, shard_records, cam_store: CamStore, params: Params) -> tuple[list[dict[str, np.ndarray]], dict]:
    """The IR labels of one shard's images (``compute.chunk_size`` per CRF batch: memory follows it,
    not the dataset) and the shard's meta: the pixel counts of :func:`label_statistics`."""
    totals = dict.fromkeys(TOTALS, 0)
    arrays = []
    size = params.compute.chunk_size
    for start in range(0, len(shard_records), size):
        chunk = shard_records[start : start + size]
        items = []
        for record in chunk:
            image = read_image(train.image_path(record))
            cams = cam_store.load(record.id, expected_size=image.shape[:2])
            items.append(IrInput(record.id, image, cams.full, cams.class_ids))
        labels = ir_labels_many(items, params.irnet.conf_fg, params.irnet.conf_bg, params.crf)
        for record in chunk:
            mask_path = train.mask_path(record)
            counts = label_statistics(labels[record.id], read_mask(mask_path) if mask_path else None)
            for key, value in counts.items():
                totals[key] += value
            arrays.append({MASK: labels[record.id]})
    return arrays, {"statistics": totals}


def write_ir_labels(train, records, root: Path, staging: Path, params: Params) -> dict[str, int] | None:
    """The IR labels of ``records`` as shards in ``staging`` (under torchrun each process writes its
    share of the shards; those already there are kept: a killed run resumes). Rank 0 writes the
    shard index and ``index.json`` and returns the pixel counts of every shard summed."""
    context = distributed.current()
    size = params.compute.shard_size
    ids = [r.id for r in records]
    mine = distributed.shard(list(range(len(shard_numbers(len(records), size)))), context)
    cam_store = CamStore(root / CAMS_DIR / "train")
    fill_shards(staging, ids, mine, size, lambda positions: label_shard(train, [records[p] for p in positions], cam_store, params),
                desc="ir_labels", show=context.is_main)
    distributed.barrier(context)
    if not context.is_main:
        return None
    write_index(staging)
    write_json(staging / INDEX_FILE, {"confidence_cutoff": params.irnet.confidence_cutoff, "ids": ids})
    totals = dict.fromkeys(TOTALS, 0)
    for meta in metas(staging):
        for key in TOTALS:
            totals[key] += meta["statistics"][key]
    return totals


def output_fingerprint(params: Params, hashes: dict) -> str:
    """What the IR-label shards are made from: a partial output with another fingerprint is started afresh."""
    made_from = {key: value for key, value in stage_params(params).items() if key not in SPEED_KNOBS}
    return checkpoint.fingerprint(made_from, hashes, provenance.code_digest(__name__), params.compute.shard_size)


def run_ir_labels(params: Params, root: Path) -> dict | None:
    import mlflow

    train = load_manifest(root / SPLITS_DIR / "train.json")
    index = read_json(root / CAMS_DIR / INDEX_FILE)
    kept = set(confident_ids(index, params.irnet.confidence_cutoff))
    records = [r for r in train.records if r.id in kept]
    context = distributed.current()
    if not context.is_main:  # a torchrun process but rank 0: its share, nothing logged
        with resumable_dir(root / IR_LABELS_DIR, "", context) as staging:  # rank 0 checks the fingerprint
            write_ir_labels(train, records, root, staging, params)
        return None
    hashes = tracking.input_hashes({"cams": root / CAMS_DIR, "splits": root / SPLITS_DIR, "prepared": root / PREPARED_DIR})

    with tracking.stage_run("ir_labels", params.tracking.experiment, stage_params(params), root=root, hashes=hashes):
        with resumable_dir(root / IR_LABELS_DIR, output_fingerprint(params, hashes), context) as staging:
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
