"""The data stages as DVC runs them: read params, compute, write outputs atomically, log MLflow.

Outputs (relative to the project root)::

    prepare  data/prepared/manifest.json (pointing into data.root; images/ and masks/ for the embedded source)
             metrics/prepare.json
    split    data/splits/{train,val,test}.json             metrics/data.json
             plots/data/class_histogram.csv (dvc plots)    class_histogram.png (MLflow artifact)
"""

from __future__ import annotations

from pathlib import Path

from wsss import tracking, visualize
from wsss.config import Params, flatten
from wsss.data.manifest import Manifest, load_manifest
from wsss.data.prepare import MANIFEST_NAME, prepare_dataset
from wsss.data.split import SplitResult, split_records, write_splits
from wsss.io import read_image, read_mask, write_csv, write_json
from wsss.stages.paths import PREPARED_DIR, SPLITS_DIR

PREPARE_METRICS = Path("metrics/prepare.json")
DATA_METRICS = Path("metrics/data.json")
CLASS_HISTOGRAM = Path("plots/data/class_histogram.csv")


def _prepare_params(params: Params) -> dict:
    data = params.data
    group = {"data.seed": data.seed, "data.source": data.source, "data.root": data.root,
             "data.person_class": data.person_class, "data.person_label_drop": data.person_label_drop}
    source_group = {"embedded": data.embedded, "voc": data.voc, "lid": data.lid}[data.source]
    group.update(flatten(source_group.model_dump(), f"data.{data.source}."))
    return group


def _split_params(params: Params) -> dict:
    data = params.data
    return {"data.seed": data.seed, "data.drop_person_labels": data.drop_person_labels,
            "data.test_fraction": data.test_fraction, **flatten(data.balance.model_dump(), "data.balance.")}


def listing_digest(manifest: Manifest) -> str:
    """One digest of a VOC or LID tree as the manifest lists it: every record's paths and file MD5s."""
    import hashlib

    lines = sorted(f"{r.image} {r.provenance.get('image_md5')} {r.mask} {r.provenance.get('mask_md5')}" for r in manifest.records)
    return "md5:" + hashlib.md5("\n".join(lines).encode()).hexdigest()


def source_root(params: Params, root: Path) -> Path:
    return (root / params.data.root).resolve()


def prepare_metrics(manifest: Manifest) -> dict:
    subsets = {name: len(manifest.subset(name)) for name in ("train", "heldout")}
    return {
        "source": manifest.source,
        "num_classes": manifest.num_classes - 1,
        "images": subsets,
        "train_with_masks": sum(r.mask is not None for r in manifest.subset("train")),
    }


def samples_figure(manifest: Manifest, count: int = 8):
    """Training samples: image above its mask overlay, titled with the given labels
    (a person present in the mask but missing from the labels is marked)."""
    records = manifest.subset("train")[:count]
    images = [read_image(manifest.image_path(r)) for r in records]
    overlays = [visualize.overlay(image, read_mask(manifest.mask_path(r))) if r.mask else image
                for image, r in zip(images, records, strict=True)]
    titles = []
    for record in records:
        names = [manifest.class_names[c] for c in record.labels]
        person = manifest.person_class
        if record.mask_labels and person in record.mask_labels and person not in record.labels:
            names.append(f"({manifest.class_names[person]} unlabelled)")
        titles.append("\n".join(names))
    return visualize.image_grid([images, overlays], titles=titles)


def run_prepare(params: Params, root: Path) -> Manifest:
    """The ``prepare`` stage."""
    source = source_root(params, root)
    # a VOC or LID tree is read once, by prepare_dataset, which records each file's MD5; the embedded
    # source is one small file, hashed here
    inputs = {"source": source} if params.data.source == "embedded" else {}
    with tracking.stage_run("prepare", params.tracking.experiment, _prepare_params(params), inputs, root):
        import mlflow

        manifest = prepare_dataset(params, source, root / PREPARED_DIR)
        if params.data.source != "embedded":
            mlflow.set_tag("wsss.input.source", listing_digest(manifest))
        metrics = prepare_metrics(manifest)
        write_json(root / PREPARE_METRICS, metrics)
        mlflow.log_metrics({"images_train": metrics["images"]["train"], "images_heldout": metrics["images"]["heldout"], "num_classes": metrics["num_classes"]})
        mlflow.log_artifact(str(root / PREPARED_DIR / MANIFEST_NAME))
        figure = samples_figure(manifest)
        mlflow.log_figure(figure, "train_samples.png")
        visualize.close(figure)
    return manifest


def data_metrics(manifest: Manifest, result: SplitResult) -> dict:
    names = manifest.class_names
    return {
        "sizes": {"train": len(result.train), "val": len(result.val), "test": len(result.test)},
        "train_pool": len(manifest.subset("train")),
        "unlabelled_after_person_drop": result.unlabelled,
        "removed_by_balancing": len(manifest.subset("train")) - result.unlabelled - len(result.train),
        "balance_cap": result.cap,
        "person_class": names[manifest.person_class] if manifest.person_class is not None else None,
        "person_label_drop_rate_observed": result.person_drop_rate,
        "class_counts_before": {names[c]: n for c, n in result.counts_before.items()},
        "class_counts_after": {names[c]: n for c, n in result.counts_after.items()},
        "max_class_count_after": max(result.counts_after.values(), default=0),
    }


def class_histogram_rows(manifest: Manifest, result: SplitResult) -> list[dict]:
    return [
        {"class": manifest.class_names[c], "before_balancing": result.counts_before[c], "after_balancing": result.counts_after[c]}
        for c in result.counts_before
    ]


def class_histogram_figure(rows: list[dict], cap: int | None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axis = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.5))
    positions = np.arange(len(rows))
    axis.barh(positions - 0.2, [r["before_balancing"] for r in rows], height=0.4, label="before balancing")
    axis.barh(positions + 0.2, [r["after_balancing"] for r in rows], height=0.4, label="after balancing")
    if cap is not None:
        axis.axvline(cap, color="black", linestyle="--", linewidth=1, label=f"cap {cap}")
    axis.set_yticks(positions, [r["class"] for r in rows])
    axis.invert_yaxis()
    axis.set_xlabel("training images with the label")
    axis.legend(loc="lower right")
    figure.tight_layout()
    return figure


def run_split(params: Params, root: Path) -> SplitResult:
    """The ``split`` stage."""
    manifest = load_manifest(root / PREPARED_DIR / MANIFEST_NAME)
    inputs = {"prepared": root / PREPARED_DIR}
    with tracking.stage_run("split", params.tracking.experiment, _split_params(params), inputs, root):
        import mlflow

        result = split_records(manifest, params)
        metrics = data_metrics(manifest, result)
        rows = class_histogram_rows(manifest, result)
        write_splits(manifest, result, root / SPLITS_DIR)
        write_csv(root / CLASS_HISTOGRAM, rows)
        write_json(root / DATA_METRICS, metrics)

        flat = {f"size_{k}": v for k, v in metrics["sizes"].items()}
        flat["unlabelled_after_person_drop"] = metrics["unlabelled_after_person_drop"]
        flat["removed_by_balancing"] = metrics["removed_by_balancing"]
        flat["max_class_count_after"] = metrics["max_class_count_after"]
        if result.cap is not None:
            flat["balance_cap"] = result.cap
        if result.person_drop_rate is not None:
            flat["person_label_drop_rate_observed"] = result.person_drop_rate
        mlflow.log_metrics(flat)
        figure = class_histogram_figure(rows, result.cap)
        mlflow.log_figure(figure, "class_histogram.png")
        visualize.close(figure)
        mlflow.log_artifact(str(root / DATA_METRICS))
    return result
