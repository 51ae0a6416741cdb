"""The ``ablation_cell`` stage of the ablation grid (``pipelines/ablation/dvc.yaml``; the paper's Table 3).

One per encoder x threshold x person: DeepLabv3+ (the ``segmenter`` group with the encoder
replaced) trained on the masks of :mod:`wsss.stages.ablation` (with the person merged in,
:mod:`wsss.stages.person`), scored on val with and without TTA. Its training is one run of the
stage experiment; each of its two evaluations is one run of the ``ablation`` experiment with the
four factors as params and ``val_miou`` as metric: the rows of Table 3
(:mod:`wsss.stages.ablation_report` renders them).
"""

from __future__ import annotations

from pathlib import Path

from wsss import checkpoint, distributed, provenance, tracking
from wsss.config import Params, SegmenterParams, flatten
from wsss.errors import ConfigError
from wsss.evaluation import evaluate_model
from wsss.io import write_json
from wsss.models.segmenter import CLASSIFIER_ENCODER, save_segmenter
from wsss.segmentation import SegmentationDataset
from wsss.shards import stored_masks
from wsss.stages.common import background_knob, cell_name, load_splits, unfinished_run
from wsss.stages.paths import PREPARED_DIR, SPLITS_DIR
from wsss.stages.segmenter import encoder_inputs, fit_tracked, segmenter_spec

CELL_KIND = "cell"
_NOT_IN_FINGERPRINT = {"workers", "threads"}


def cell_segmenter(params: Params, encoder: str) -> SegmenterParams:
    """A cell's ``segmenter`` group: its encoder and, for an smp encoder, ``ablation.smp_output_stride``
    when set (the classifier encoder keeps ``segmenter.output_stride``, its own 8)."""
    update: dict = {"encoder": encoder}
    smp_stride = params.ablation.smp_output_stride if params.ablation else None
    if encoder != CLASSIFIER_ENCODER and smp_stride is not None:
        update["output_stride"] = smp_stride
    return params.segmenter.model_copy(update=update)


def run_ablation_cell(params: Params, root: Path, encoder: str, threshold: float, person: bool, masks_dir: Path,
                      model_dir: Path, metrics_path: Path) -> dict:
    import mlflow

    manifests = load_splits(root)
    train, val = manifests["train"], manifests["val"]
    if person and train.person_class is None:
        raise ConfigError("params.yaml", [("ablation.person", "true needs a person class, but data.person_class is null; use [false]")])
    config = cell_segmenter(params, encoder)
    name = cell_name(encoder, threshold, person)
    encoder_weights, weight_files = encoder_inputs(params, root, encoder)
    hashes = tracking.input_hashes({"masks": root / masks_dir / "train", "prepared": root / PREPARED_DIR, "splits": root / SPLITS_DIR,
                                    **weight_files})
    run_fingerprint = checkpoint.fingerprint(config.model_dump(exclude=_NOT_IN_FINGERPRINT), params.seed, hashes,
                                             *distributed.precision_fingerprint(), provenance.code_digest(__name__))
    checkpoint_dir = root / "checkpoints/ablation" / name
    previous = checkpoint.load_if_compatible(checkpoint_dir / "last.pt", run_fingerprint)
    spec = segmenter_spec(params, train, config)
    factors = {"encoder": encoder, "threshold": threshold, "person": person}
    logged = {**{f"ablation.{k}": v for k, v in factors.items()}, "seed": params.seed,
              **flatten(config.model_dump(exclude=_NOT_IN_FINGERPRINT), "segmenter.")}
    val_records = [r for r in val.records if r.mask is not None]

    with tracking.stage_run("ablation_cell", params.tracking.experiment, logged, root=root, hashes=hashes,
                            resume_run_id=unfinished_run(previous, config.epochs)) as run:
        dataset = SegmentationDataset([train.image_path(r) for r in train.records], stored_masks(root / masks_dir / "train", [r.id for r in train.records]),
                                      config.image_size, config.augmentation, params.seed, train.num_classes, config.scale_range)
        result, model = fit_tracked(config, params.seed, spec, dataset, [val.image_path(r) for r in val_records],
                                    [val.mask_path(r) for r in val_records], checkpoint_dir, run_fingerprint, encoder_weights,
                                    run.info.run_id, desc=f"cell {name}")
        save_segmenter(root / model_dir / "model.pt", model, spec, extra={"trained_on": str(masks_dir), "best_epoch": result.best_epoch})
        scores, _, _ = evaluate_model(model, {"val": val}, params.evaluate.tta_scales, batch_size=params.compute.eval_batch_size)
        train_run_id = run.info.run_id
        mlflow.log_metrics({"best_val_miou": result.best_miou, "val_plain_miou": scores["val"]["plain"]["miou"],
                            "val_tta_miou": scores["val"]["tta"]["miou"]})

    metrics = {**factors, "output_stride": config.output_stride, "threshold_key": f"irnet.{background_knob(params.irnet)}",
               "best_epoch": result.best_epoch,
               "tta_scales": params.evaluate.tta_scales, "val": {"plain": scores["val"]["plain"], "tta": scores["val"]["tta"]},
               "train_run_id": train_run_id}
    metrics["mlflow_run_ids"] = log_cell_runs(params, root, factors, metrics, train_run_id)
    write_json(root / metrics_path, metrics)
    return metrics


def log_cell_runs(params: Params, root: Path, factors: dict, metrics: dict, train_run_id: str) -> dict[str, str]:
    """Two runs of the ablation experiment, TTA off and on (their ids by ``"plain"`` / ``"tta"``);
    then earlier runs of the same cells are tagged ``wsss.superseded`` so that the MLflow UI can hide them."""
    import mlflow

    experiment = params.ablation.experiment if params.ablation else "ablation"
    experiment_id = tracking.ensure_experiment(experiment, root)
    client = mlflow.MlflowClient()
    name = cell_name(factors["encoder"], factors["threshold"], factors["person"])
    commit, dirty = tracking.git_state(root)
    run_ids = {}
    for mode, tta in (("plain", False), ("tta", True)):
        cell = f"{name}-tta-{'yes' if tta else 'no'}"
        scores = metrics["val"][mode]
        with mlflow.start_run(experiment_id=experiment_id, run_name=cell) as run:
            mlflow.log_params({**factors, "tta": tta, "output_stride": metrics["output_stride"], "threshold_key": metrics["threshold_key"],
                               "tta_scales": metrics["tta_scales"] if tta else None})
            mlflow.log_metrics({"val_miou": scores["miou"], "val_mean_accuracy": scores["mean_accuracy"],
                                "val_pixel_accuracy": scores["pixel_accuracy"],
                                **({"val_miou_without_person": scores["miou_without_person"]} if "miou_without_person" in scores else {}),
                                **{f"val_iou_{k}": v for k, v in scores["iou"].items() if v is not None}})
            mlflow.set_tags({"wsss.kind": CELL_KIND, "wsss.cell": cell, "wsss.train_run_id": train_run_id,
                             "wsss.git_commit": commit, "wsss.git_dirty": str(dirty).lower()})
            run_ids[mode] = run.info.run_id
        for old in client.search_runs([experiment_id], filter_string=f"tags.`wsss.cell` = '{cell}'"):
            if old.info.run_id != run_ids[mode]:
                client.set_tag(old.info.run_id, "wsss.superseded", "true")
    return run_ids
