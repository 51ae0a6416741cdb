"""The step-3 training stages: ``train_segmenter`` and ``oracle``.

- ``train_segmenter``: DeepLabv3+ on the training images and their pseudo masks (step 2), best
  epoch by val mIoU: ``models/segmenter/model.pt``, ``metrics/segmenter.json``,
  ``plots/segmenter/training.csv``; resumable from ``checkpoints/train_segmenter/last.pt``.
- ``oracle``: the same network and budget on the ground-truth training masks (the upper bound of
  weak supervision): ``models/oracle/model.pt``, ``metrics/oracle.json`` (val and test, plain and
  TTA). Data without training masks (LID) gets ``{"available": false}``, no model and a training
  curve of no epochs.

Each run logs its model file as an MLflow pyfunc model (:mod:`wsss.serving`): ``segmenter`` (registered as
a new version of ``wsss-segmenter``, alias ``newest``) and ``upper_bound``.
Evaluation is :mod:`wsss.stages.evaluate`'s, the summary :mod:`wsss.stages.report`'s.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from wsss import checkpoint, distributed, provenance, serving, tracking
from wsss.config import Params, SegmenterParams, flatten
from wsss.data.manifest import Manifest, load_manifest
from wsss.evaluation import MODES, evaluate_model, final_mode, post_crf, truth_paths
from wsss.io import read_image, write_csv, write_json
from wsss.models.segmenter import CLASSIFIER_ENCODER, SegmenterSpec, build_segmenter, save_segmenter
from wsss.segmentation import LAST, SegmentationDataset, SegmenterResult, train_segmenter
from wsss.shards import stored_masks
from wsss.stages.common import unfinished_run
from wsss.stages.paths import (CLASSIFIER_PATH, ORACLE_METRICS, ORACLE_PATH, PREPARED_DIR, PSEUDO_DIR, SEGMENTER_METRICS,
                               SEGMENTER_PATH, SPLITS_DIR)

SEGMENTER_CURVE = Path("plots/segmenter/training.csv")
ORACLE_CURVE = Path("plots/oracle/training.csv")
CURVE_COLUMNS = ("epoch", "loss", "val_miou", "lr", "skipped")  # plots/{segmenter,oracle}/training.csv
_NOT_IN_FINGERPRINT = {"workers", "threads"}  # how fast, not what is computed
# the MLflow model of each stage's run; the final one is registered (wsss.serving.REGISTERED_NAME)
MLFLOW_MODEL_NAMES = {"pseudo": "segmenter", "truth": "upper_bound"}


def _segmenter_params(params: Params, config: SegmenterParams) -> dict:
    """Logged params: what the run computes (a resumed run may change workers and threads)."""
    return {"seed": params.seed, **flatten(config.model_dump(exclude=_NOT_IN_FINGERPRINT), "segmenter.")}


def segmenter_spec(params: Params, train: Manifest, config: SegmenterParams | None = None) -> SegmenterSpec:
    """The network of the ``segmenter`` group (or of ``config``, an ablation cell's)."""
    config = config or params.segmenter
    encoder = config.encoder
    from_classifier = encoder == CLASSIFIER_ENCODER
    return SegmenterSpec(encoder, train.num_classes, config.output_stride, config.decoder_channels, tuple(train.class_names),
                         tuple(config.atrous_rates), params.classifier.arch if from_classifier else "",
                         params.classifier.extra_convs if from_classifier else 0)


def encoder_inputs(params: Params, root: Path, encoder: str | None = None) -> tuple[str, dict[str, Path]]:
    """The encoder's initial weights (``segmenter.encoder_weights``; the step-1 model file for the
    ``classifier`` encoder) and the files they come from, for the run's input hashes."""
    if (encoder or params.segmenter.encoder) == CLASSIFIER_ENCODER:
        return str(root / CLASSIFIER_PATH), {"classifier": root / CLASSIFIER_PATH}
    return params.segmenter.encoder_weights, {}


def fit_tracked(config: SegmenterParams, seed: int, spec: SegmenterSpec, dataset: SegmentationDataset, val_images: list[Path],
                val_masks: list[Path], checkpoint_dir: Path, run_fingerprint: str, encoder_weights: str, run_id: str,
                desc: str) -> tuple[SegmenterResult, nn.Module]:
    """Train (or resume) DeepLabv3+ inside the active MLflow run ``run_id``: per-epoch loss, val
    mIoU and learning rate as its metrics, the run id in ``last.pt`` (a resumed run continues the
    same MLflow run). Returns the result and the network with the best epoch's weights."""
    import mlflow

    result = train_segmenter(
        config, seed, spec, dataset, val_images, val_masks, checkpoint_dir, run_fingerprint, encoder_weights=encoder_weights,
        on_epoch=lambda r: mlflow.log_metrics({"loss": r.loss, "val_miou": r.val_miou, "lr": r.lr, "skipped_pixels": r.skipped}, step=r.epoch),
        extra_state={"mlflow_run_id": run_id}, desc=desc)
    model = build_segmenter(spec)
    model.load_state_dict(result.best_state)
    return result, model.to(distributed.current().device)


def _train_stage(params: Params, root: Path, stage: str, masks: str, evaluate_after: bool = False) -> dict:
    """Train DeepLabv3+ on the training images with their pseudo masks (``masks="pseudo"``) or
    their ground-truth masks (``"truth"``); the best epoch by val mIoU is the model. With
    ``evaluate_after`` it is also scored on val and test, plain and with TTA, in the same run."""
    import mlflow

    train = load_manifest(root / SPLITS_DIR / "train.json")
    val = load_manifest(root / SPLITS_DIR / "val.json")
    if masks == "pseudo":
        mask_paths = stored_masks(root / PSEUDO_DIR / "train", [r.id for r in train.records])
        inputs = {"pseudo_masks": root / PSEUDO_DIR / "train", "prepared": root / PREPARED_DIR}
    else:
        mask_paths = [train.mask_path(r) for r in train.records]
        inputs = {"prepared": root / PREPARED_DIR}
    images = [train.image_path(r) for r in train.records]
    val_images, val_masks = truth_paths(val, "val")
    config = params.segmenter
    if masks == "truth":
        # skip_disagreement is for noisy pseudo masks: on true masks it would only drop right labels, and a weaker
        # upper bound (test TTA + CRF 0.779 -> 0.774, benchmarks/README.md) would flatter the weak model's share
        config = config.model_copy(update={"skip_disagreement": None})
    encoder_weights, weight_files = encoder_inputs(params, root)
    hashes = tracking.input_hashes({**inputs, **weight_files, "splits": root / SPLITS_DIR})
    run_fingerprint = checkpoint.fingerprint({k: v for k, v in config.model_dump().items() if k not in _NOT_IN_FINGERPRINT},
                                             params.seed, hashes, masks, *distributed.precision_fingerprint(),
                                             provenance.code_digest(__name__))
    checkpoint_dir = root / "checkpoints" / stage
    spec = segmenter_spec(params, train)
    dataset = SegmentationDataset(images, mask_paths, config.image_size, config.augmentation, params.seed, train.num_classes,
                                  config.scale_range)
    if not distributed.current().is_main:  # a torchrun process but rank 0: trains, writes nothing
        train_segmenter(config, params.seed, spec, dataset, val_images, val_masks, checkpoint_dir, run_fingerprint,
                        encoder_weights=encoder_weights, desc=stage)
        return {}
    previous = checkpoint.load_if_compatible(checkpoint_dir / LAST, run_fingerprint)

    with tracking.stage_run(stage, params.tracking.experiment, _segmenter_params(params, config), root=root, hashes=hashes,
                            resume_run_id=unfinished_run(previous, config.epochs)) as run:
        result, model = fit_tracked(config, params.seed, spec, dataset, val_images, val_masks, checkpoint_dir, run_fingerprint,
                                    encoder_weights, run.info.run_id, desc=stage)
        model_path = root / (SEGMENTER_PATH if masks == "pseudo" else ORACLE_PATH)
        save_segmenter(model_path, model, spec, extra={"trained_on": masks, "best_epoch": result.best_epoch})
        serving.log_segmenter_model(model_path, MLFLOW_MODEL_NAMES[masks], serving.example_image(read_image(val_images[0])),
                                    register=masks == "pseudo")
        curve = [dict(zip(CURVE_COLUMNS, (r.epoch, f"{r.loss:.6f}", f"{r.val_miou:.6f}", f"{r.lr:.6g}", f"{r.skipped:.6f}"), strict=True))
                 for r in result.history]
        write_csv(root / (SEGMENTER_CURVE if masks == "pseudo" else ORACLE_CURVE), curve)
        metrics = {"trained_on": f"{masks} masks", "train_images": len(images), "best_epoch": result.best_epoch,
                   "best_val_miou": result.best_miou, "epochs": config.epochs, "steps": result.steps}
        mlflow.set_tag("wsss.resumed_from_epoch", str(result.resumed_from))
        mlflow.log_metrics({"best_val_miou": result.best_miou, "best_epoch": result.best_epoch})
        if evaluate_after:
            manifests = {name: load_manifest(root / SPLITS_DIR / f"{name}.json") for name in ("val", "test")}
            scores, _, _ = evaluate_model(model, manifests, params.evaluate.tta_scales, post_crf(params),
                                          batch_size=params.compute.eval_batch_size, chunk=params.compute.chunk_size)
            metrics.update(scores, final_mode=final_mode(params.evaluate.crf))
            mlflow.log_params({"evaluate.tta_scales": params.evaluate.tta_scales, "evaluate.crf": params.evaluate.crf})
            mlflow.log_metrics({f"{split}_{mode}_miou": scores[split][mode]["miou"] for split in manifests for mode in MODES
                                if mode in scores[split]})
    return metrics


def run_train_segmenter(params: Params, root: Path) -> dict:
    metrics = _train_stage(params, root, "train_segmenter", "pseudo")
    if distributed.current().is_main:
        write_json(root / SEGMENTER_METRICS, metrics)
    return metrics


def run_oracle(params: Params, root: Path) -> dict:
    train = load_manifest(root / SPLITS_DIR / "train.json")
    missing = sum(r.mask is None for r in train.records)
    if missing:
        # LID's training images have no masks: the upper bound cannot be measured on it.
        metrics = {"available": False, "reason": f"{missing} of {len(train.records)} training images have no ground-truth mask"}
        if distributed.current().is_main:
            (root / ORACLE_PATH.parent).mkdir(parents=True, exist_ok=True)
            (root / ORACLE_PATH.parent / "UNAVAILABLE.txt").write_text(metrics["reason"] + "\n")
            write_csv(root / ORACLE_CURVE, [], fieldnames=list(CURVE_COLUMNS))  # a declared output: no epochs
            write_json(root / ORACLE_METRICS, metrics)
        return metrics
    metrics = {"available": True, **_train_stage(params, root, "oracle", "truth", evaluate_after=True)}
    if distributed.current().is_main:
        write_json(root / ORACLE_METRICS, metrics)
    return metrics
