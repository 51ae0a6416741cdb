"""The step-3 stages: ``train_segmenter``, ``oracle``, ``evaluate`` and ``report``.

- ``train_segmenter``: DeepLabv3+ on the training images and their pseudo masks (step 2), best
  epoch by val mIoU: ``models/segmenter/model.pt``, ``metrics/segmenter.json``,
  ``plots/segmenter/training.csv``; resumable from ``checkpoints/segmenter/last.pt``.
- ``oracle``: the same network and budget on the ground-truth training masks (the upper bound of
  weak supervision): ``models/oracle/model.pt``, ``metrics/oracle.json`` (val and test, plain and
  TTA). Data without training masks (LID) gets ``{"available": false}`` and no model.
- ``evaluate``: the segmenter on val and test, plain and with flip x scale TTA: mIoU, mean
  accuracy, pixel accuracy, per-class IoU (``metrics/evaluate.json``); a confusion matrix and the
  paper's Figure 2 (image | CAM + CRF | pseudo mask | prediction | ground truth) as pictures.
- ``report``: ``reports/summary.md`` (the paper's Tables 1 and 2 for this run, the gap to the upper
  bound) and one MLflow run "pipeline" with every stage's metrics and all params flattened.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from torch import nn

from wsss import checkpoint, distributed, tracking, visualize
from wsss.cam import label_map, load_cams
from wsss.config import CrfParams, Params, SegmenterParams, flatten
from wsss.crf import CrfTask, crf_labels, crf_many
from wsss.data.manifest import ImageRecord, Manifest, load_manifest
from wsss.errors import DataError
from wsss.io import read_image, read_json, read_mask, write_csv, write_json
from wsss.metrics import confusion_matrix, predicted_instead, segmentation_scores
from wsss.models.segmenter import CLASSIFIER_ENCODER, SegmenterSpec, build_segmenter, load_segmenter, save_segmenter
from wsss.segmentation import LAST, SegmentationDataset, SegmenterResult, predict_images, predict_pairs, train_segmenter
from wsss.stages.common import unfinished_run
from wsss.stages.paths import CAMS_DIR, CLASSIFIER_PATH, PREPARED_DIR, PSEUDO_DIR, SPLITS_DIR

SEGMENTER_PATH = Path("models/segmenter/model.pt")
ORACLE_PATH = Path("models/oracle/model.pt")
SEGMENTER_METRICS = Path("metrics/segmenter.json")
ORACLE_METRICS = Path("metrics/oracle.json")
EVALUATE_METRICS = Path("metrics/evaluate.json")
SEGMENTER_CURVE = Path("plots/segmenter/training.csv")
ORACLE_CURVE = Path("plots/oracle/training.csv")
EVALUATE_PLOTS = Path("plots/evaluate")
REPORT = Path("reports/summary.md")
_NOT_IN_FINGERPRINT = {"workers", "threads"}  # how fast, not what is computed
# The paper's numbers (LID 2020), for orientation beside this run's.
PAPER_TABLE2_VAL = {"cam_crf": 0.3106, "irnet": 0.3187, "segmentation_tta": 0.3964}
MODES = ("plain", "tta", "tta_crf")  # evaluation modes: no TTA, TTA, TTA + dense CRF (evaluate.crf)
MODE_NAMES = {"plain": "no TTA", "tta": "TTA", "tta_crf": "TTA + CRF"}
PAPER_TABLE1_TEST = {"miou": 0.3734, "mean_accuracy": 0.5487, "pixel_accuracy": 0.8364}


def _segmenter_params(params: Params) -> dict:
    """Logged params: what the run computes (a resumed run may change workers and threads)."""
    return {"seed": params.seed, **flatten(params.segmenter.model_dump(exclude=_NOT_IN_FINGERPRINT), "segmenter.")}


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


def _paths(manifest: Manifest, records: list[ImageRecord], mask_of: Callable[[ImageRecord], Path]) -> tuple[list[Path], list[Path]]:
    return [manifest.image_path(r) for r in records], [mask_of(r) for r in records]


def _truth_paths(manifest: Manifest, split: str) -> tuple[list[Path], list[Path]]:
    records = [r for r in manifest.records if r.mask is not None]
    if not records:
        raise DataError(f"data/splits/{split}.json", f"no {split} image has a ground-truth mask to evaluate on")
    return _paths(manifest, records, manifest.mask_path)


def fit_tracked(config: SegmenterParams, seed: int, spec: SegmenterSpec, dataset: SegmentationDataset, val_images: list[Path],
                val_masks: list[Path], checkpoint_dir: Path, run_fingerprint: str, encoder_weights: str, run_id: str,
                desc: str) -> tuple[SegmenterResult, nn.Module]:
    """Train (or resume) DeepLabv3+ inside the active MLflow run ``run_id``: per-epoch loss, val
    mIoU and learning rate as its metrics, the run id in ``last.pt`` (a resumed run continues the
    same MLflow run). Returns the result and the network with the best epoch's weights."""
    import mlflow

    result = train_segmenter(
        config, seed, spec, dataset, val_images, val_masks, checkpoint_dir, run_fingerprint, encoder_weights=encoder_weights,
        on_epoch=lambda r: mlflow.log_metrics({"loss": r.loss, "val_miou": r.val_miou, "lr": r.lr}, step=r.epoch),
        extra_state={"mlflow_run_id": run_id}, desc=desc)
    model = build_segmenter(spec)
    model.load_state_dict(result.best_state)
    return result, model


def _train_stage(params: Params, root: Path, stage: str, masks: str, evaluate_after: bool = False) -> dict:
    """Train DeepLabv3+ on the training images with their pseudo masks (``masks="pseudo"``) or
    their ground-truth masks (``"truth"``); the best epoch by val mIoU is the model. With
    ``evaluate_after`` it is also scored on val and test, plain and with TTA, in the same run."""
    import mlflow

    train = load_manifest(root / SPLITS_DIR / "train.json")
    val = load_manifest(root / SPLITS_DIR / "val.json")
    if masks == "pseudo":
        images, mask_paths = _paths(train, train.records, lambda r: root / PSEUDO_DIR / "train" / f"{r.id}.png")
        inputs = {"pseudo_masks": root / PSEUDO_DIR / "train", "prepared": root / PREPARED_DIR}
    else:
        images, mask_paths = _paths(train, train.records, train.mask_path)
        inputs = {"prepared": root / PREPARED_DIR}
    val_images, val_masks = _truth_paths(val, "val")
    config = params.segmenter
    encoder_weights, weight_files = encoder_inputs(params, root)
    hashes = tracking.input_hashes({**inputs, **weight_files, "splits": root / SPLITS_DIR})
    run_fingerprint = checkpoint.fingerprint({k: v for k, v in config.model_dump().items() if k not in _NOT_IN_FINGERPRINT},
                                             params.seed, hashes, masks, *distributed.precision_fingerprint())
    checkpoint_dir = root / "checkpoints" / stage
    spec = segmenter_spec(params, train)
    dataset = SegmentationDataset(images, mask_paths, config.image_size, config.augmentation, params.seed, train.num_classes,
                                  config.scale_range)
    if not distributed.current().is_main:  # a torchrun process but rank 0: trains, writes nothing
        train_segmenter(config, params.seed, spec, dataset, val_images, val_masks, checkpoint_dir, run_fingerprint,
                        encoder_weights=encoder_weights, desc=stage)
        return {}
    previous = checkpoint.load_if_compatible(checkpoint_dir / LAST, run_fingerprint)

    with tracking.stage_run(stage, params.tracking.experiment, _segmenter_params(params), root=root, hashes=hashes,
                            resume_run_id=unfinished_run(previous, config.epochs)) as run:
        result, model = fit_tracked(config, params.seed, spec, dataset, val_images, val_masks, checkpoint_dir, run_fingerprint,
                                    encoder_weights, run.info.run_id, desc=stage)
        model_path = root / (SEGMENTER_PATH if masks == "pseudo" else ORACLE_PATH)
        save_segmenter(model_path, model, spec, extra={"trained_on": masks, "best_epoch": result.best_epoch})
        curve = [{"epoch": r.epoch, "loss": f"{r.loss:.6f}", "val_miou": f"{r.val_miou:.6f}", "lr": f"{r.lr:.6g}"} for r in result.history]
        write_csv(root / (SEGMENTER_CURVE if masks == "pseudo" else ORACLE_CURVE), curve)
        metrics = {"trained_on": f"{masks} masks", "train_images": len(images), "best_epoch": result.best_epoch,
                   "best_val_miou": result.best_miou, "epochs": config.epochs, "steps": result.steps}
        mlflow.set_tag("wsss.resumed_from_epoch", str(result.resumed_from))
        mlflow.log_metrics({"best_val_miou": result.best_miou, "best_epoch": result.best_epoch})
        if evaluate_after:
            manifests = {name: load_manifest(root / SPLITS_DIR / f"{name}.json") for name in ("val", "test")}
            scores, _, _ = evaluate_model(model.to(distributed.current().device), manifests, params.evaluate.tta_scales,
                                          post_crf(params))
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


def _scores_dict(matrix: np.ndarray, manifest: Manifest) -> dict:
    scores = segmentation_scores(matrix)
    result = scores.as_dict(manifest.class_names)
    if manifest.person_class is not None:
        result["miou_without_person"] = scores.miou_without(manifest.person_class)
        # what this model would score if it never predicted the person (as a model without person labels cannot)
        result["miou_person_as_background"] = segmentation_scores(predicted_instead(matrix, manifest.person_class)).miou
    return result


def post_crf(params: Params) -> CrfParams | None:
    """The CRF that refines the final predictions (the ``crf`` group), or None without ``evaluate.crf``."""
    return params.crf if params.evaluate.crf else None


def final_mode(crf: bool) -> str:
    """The metrics key of the final model's numbers: ``tta_crf`` under ``evaluate.crf``, else ``tta``."""
    return "tta_crf" if crf else "tta"


def mode_suffix(mode: str) -> str:
    """What a mode adds to a model's name: ``" + TTA + CRF"``, ``" + TTA"``, or nothing."""
    return "" if mode == "plain" else f" + {MODE_NAMES[mode]}"


def crf_refined(items: Iterable[tuple[str, np.ndarray, np.ndarray, np.ndarray]], crf: CrfParams,
                chunk: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(mask, prediction refined by the dense CRF on its image)`` of each ``(name, image, mask,
    prediction)``, in order; a chunk of images at a time is held in memory (and spread over the
    CRF's processes). A failure names the image."""
    def refine(batch):
        tasks = [CrfTask(name, image, prediction) for name, image, _, prediction in batch]
        refined = crf_many(tasks, crf)
        return [(mask, labels) for (_, _, mask, _), (_, labels) in zip(batch, refined, strict=True)]

    batch: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
    for item in items:
        batch.append(item)
        if len(batch) == chunk:
            yield from refine(batch)
            batch = []
    if batch:
        yield from refine(batch)


def evaluate_model(model, manifests: dict[str, Manifest], tta_scales: list[float], crf: CrfParams | None = None,
                   batch_size: int = 16, keep: int = 0) -> tuple[dict, dict[str, np.ndarray], list[np.ndarray]]:
    """Scores of ``model`` on each split: ``plain``, ``tta`` and, with ``crf``, ``tta_crf`` (the TTA
    prediction refined by the dense CRF on the image, DeepLab's post-processing); the final mode's
    confusion matrices; its predictions of the first ``keep`` val images (for pictures)."""
    final = final_mode(crf is not None)
    metrics, matrices, kept = {}, {}, []
    for split, manifest in manifests.items():
        images, masks = _truth_paths(manifest, split)
        num_classes = manifest.num_classes
        split_matrices: dict[str, np.ndarray] = {}

        def add(mode: str, mask: np.ndarray, prediction: np.ndarray) -> None:
            if mode not in split_matrices:
                split_matrices[mode] = np.zeros((num_classes, num_classes), dtype=np.int64)
            split_matrices[mode] += confusion_matrix(mask, prediction, num_classes)
            if split == "val" and mode == final and len(kept) < keep:
                kept.append(prediction)

        def scored_tta() -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
            predictions = predict_images(model, images, masks, num_classes, batch_size, tta_scales)
            for path, (image, mask, prediction) in zip(images, predictions, strict=True):
                add("tta", mask, prediction)
                yield str(path), image, mask, prediction

        for mask, prediction in predict_pairs(model, images, masks, num_classes, batch_size, None):
            add("plain", mask, prediction)
        if crf is None:
            for _ in scored_tta():
                pass
        else:  # streamed: the CRF refines the TTA predictions a chunk at a time
            for mask, prediction in crf_refined(scored_tta(), crf):
                add("tta_crf", mask, prediction)
        metrics[split] = {mode: _scores_dict(matrix, manifest) for mode, matrix in split_matrices.items()}
        matrices[split] = split_matrices[final]
        metrics[split]["tta_gain_miou"] = metrics[split]["tta"]["miou"] - metrics[split]["plain"]["miou"]
        if crf is not None:
            metrics[split]["crf_gain_miou"] = metrics[split]["tta_crf"]["miou"] - metrics[split]["tta"]["miou"]
    return metrics, matrices, kept


def run_oracle(params: Params, root: Path) -> dict:
    train = load_manifest(root / SPLITS_DIR / "train.json")
    missing = sum(r.mask is None for r in train.records)
    if missing:
        # LID's training images have no masks: the upper bound cannot be measured on it.
        metrics = {"available": False, "reason": f"{missing} of {len(train.records)} training images have no ground-truth mask"}
        if distributed.current().is_main:
            (root / ORACLE_PATH.parent).mkdir(parents=True, exist_ok=True)
            (root / ORACLE_PATH.parent / "UNAVAILABLE.txt").write_text(metrics["reason"] + "\n")
            write_json(root / ORACLE_METRICS, metrics)
        return metrics
    metrics = {"available": True, **_train_stage(params, root, "oracle", "truth", evaluate_after=True)}
    if distributed.current().is_main:
        write_json(root / ORACLE_METRICS, metrics)
    return metrics


def _confusion_figure(matrix: np.ndarray, names: tuple[str, ...], title: str):
    import matplotlib.pyplot as plt

    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=np.float64), where=rows > 0)
    figure, axis = plt.subplots(figsize=(1.0 + 0.7 * len(names), 0.8 + 0.6 * len(names)))
    image = axis.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axis.set_yticks(range(len(names)), names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("ground truth")
    axis.set_title(title)
    for (g, p), value in np.ndenumerate(normalised):
        axis.text(p, g, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value > 0.5 else "black")
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    return figure


def _iou_figure(metrics: dict, names: tuple[str, ...], final: str):
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 0.4 * len(names) + 1.2))
    positions = np.arange(len(names))
    bars = (("val", "plain"), ("val", final), ("test", final))
    for offset, (split, mode) in zip((-0.27, 0.0, 0.27), bars, strict=True):
        label = split + mode_suffix(mode)
        values = [metrics[split][mode]["iou"][n] or 0.0 for n in names]
        axis.barh(positions + offset, values, height=0.27, label=f"{label} (mIoU {metrics[split][mode]['miou']:.3f})")
    axis.set_yticks(positions, names)
    axis.set_xlim(0, 1)
    axis.set_xlabel("IoU")
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def run_evaluate(params: Params, root: Path) -> dict:
    import mlflow

    model, spec = load_segmenter(root / SEGMENTER_PATH)
    model.to(distributed.current().device)
    manifests = {name: load_manifest(root / SPLITS_DIR / f"{name}.json") for name in ("val", "test")}
    names = manifests["val"].class_names
    hashes = tracking.input_hashes({"segmenter": root / SEGMENTER_PATH, "splits": root / SPLITS_DIR})
    final = final_mode(params.evaluate.crf)
    logged = {**flatten(params.evaluate.model_dump(), "evaluate."), **(flatten(params.crf.model_dump(), "crf.") if params.evaluate.crf else {})}
    with tracking.stage_run("evaluate", params.tracking.experiment, logged, root=root, hashes=hashes):
        metrics, matrices, predictions = evaluate_model(model, manifests, params.evaluate.tta_scales, post_crf(params),
                                                        keep=params.evaluate.num_figures)
        metrics["tta_scales"] = params.evaluate.tta_scales
        metrics["final_mode"] = final
        modes = [mode for mode in MODES if mode in metrics["val"]]
        write_json(root / EVALUATE_METRICS, metrics)
        plots = root / EVALUATE_PLOTS
        plots.mkdir(parents=True, exist_ok=True)
        write_csv(plots / "per_class_iou.csv", [
            {"class": n, **{f"{split}_{mode}_iou": _cell(metrics[split][mode]["iou"][n]) for split in ("val", "test") for mode in modes},
             "test_final_iou": _cell(metrics["test"][final]["iou"][n])}
            for n in names])
        write_csv(plots / "confusion_matrix.csv", [{"ground_truth": g, "predicted": p, "pixels": int(matrices["test"][i, j])}
                                                   for i, g in enumerate(names) for j, p in enumerate(names)])
        figures = {"confusion_matrix.png": _confusion_figure(matrices["test"], names, f"test, {MODE_NAMES[final]}: share of each true class"),
                   "per_class_iou.png": _iou_figure(metrics, names, final)}
        val = manifests["val"]
        examples = [r for r in val.records if r.mask is not None][: len(predictions)]
        if examples:
            figures["figure2.png"] = _figure2(params, root, val, examples, predictions, f"DeepLabv3+{mode_suffix(final)}")
        for name, figure in figures.items():
            figure.savefig(plots / name, dpi=110)
            mlflow.log_figure(figure, name)
            visualize.close(figure)
        mlflow.log_metrics({f"{split}_{mode}_{key}": metrics[split][mode][key] for split in ("val", "test") for mode in modes
                            for key in ("miou", "mean_accuracy", "pixel_accuracy")})
        mlflow.log_artifact(str(root / EVALUATE_METRICS))
    return metrics


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def _figure2(params: Params, root: Path, val: Manifest, records: list[ImageRecord], predictions: list[np.ndarray], title: str):
    """The paper's Figure 2: image | CAM + CRF | IRNet pseudo mask | DeepLabv3+ | ground truth."""
    rows = []
    for record, prediction in zip(records, predictions, strict=True):
        image = read_image(val.image_path(record))
        cams = load_cams(root / CAMS_DIR / "val" / f"{record.id}.npz", expected_size=image.shape[:2])
        cam_crf = crf_labels(image, label_map(cams.full, cams.class_ids, params.cams.eval_threshold), params.crf)
        pseudo = read_mask(root / PSEUDO_DIR / "val" / f"{record.id}.png")
        truth = read_mask(val.mask_path(record))
        rows.append([image, *(visualize.overlay(image, m) for m in (cam_crf, pseudo, prediction, truth))])
    return visualize.image_grid(rows, titles=["image", "CAM + CRF", "IRNet pseudo mask", title, "ground truth"],
                                row_labels=[r.id for r in records])


def _pct(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _ratio(weak: float, upper: float) -> float:
    return weak / upper if upper > 0 else float("nan")


def summary_markdown(stage_metrics: dict[str, dict]) -> str:
    """``reports/summary.md`` from the stages' metrics (pure: a test can feed it made-up numbers)."""
    cams, pseudo, evaluate = stage_metrics["cams"], stage_metrics["pseudo_masks"], stage_metrics["evaluate"]
    oracle = stage_metrics.get("oracle", {})
    final = evaluate.get("final_mode", "tta")
    test_final = evaluate["test"][final]
    test_modes = list(dict.fromkeys(mode for mode in (final, *reversed(MODES)) if mode in evaluate["test"]))
    val_rows = [(f"Segmentation{mode_suffix(mode)}", evaluate["val"][mode]) for mode in MODES if mode in evaluate["val"]]
    lines = [
        "# wsss: summary of this run",
        "",
        "## Table 2: each step on val (mIoU, %)",
        "",
        "| step | this run | this run, without the person class | paper (LID val) |",
        "|---|---:|---:|---:|",
        f"| Classification + CRF | {_pct(cams['cam_crf']['miou'])} | {_pct(cams['cam_crf'].get('miou_without_person'))} | {_pct(PAPER_TABLE2_VAL['cam_crf'])} |",
        f"| IRNet (pseudo masks) | {_pct(pseudo['val']['miou'])} | {_pct(pseudo['val'].get('miou_without_person'))} | {_pct(PAPER_TABLE2_VAL['irnet'])} |",
        *(f"| {name} | {_pct(scores['miou'])} | {_pct(scores.get('miou_without_person'))} | "
          f"{_pct(PAPER_TABLE2_VAL['segmentation_tta']) if name == 'Segmentation + TTA' else ''} |" for name, scores in val_rows),
        "",
        "## Table 1: the final model on test (%)",
        "",
        "| | mIoU | mean accuracy | pixel accuracy |",
        "|---|---:|---:|---:|",
        *(f"| this run, {MODE_NAMES[mode]} | {_pct(evaluate['test'][mode]['miou'])} | {_pct(evaluate['test'][mode]['mean_accuracy'])} | "
          f"{_pct(evaluate['test'][mode]['pixel_accuracy'])} |" for mode in test_modes),
        f"| paper (LID test) | {_pct(PAPER_TABLE1_TEST['miou'])} | {_pct(PAPER_TABLE1_TEST['mean_accuracy'])} | {_pct(PAPER_TABLE1_TEST['pixel_accuracy'])} |",
        "",
        "## Weak against full supervision",
        "",
    ]
    if oracle.get("available") and final not in oracle["test"]:
        lines.append(f"The upper bound was not scored with {MODE_NAMES[final]}: re-run the oracle stage (`dvc repro oracle`).")
    elif oracle.get("available"):
        upper = oracle["test"][final]
        lines += [
            "The upper bound is the same segmenter, trained with the same budget on the ground-truth training masks.",
            "",
            f"| model (test, {MODE_NAMES[final]}) | mIoU | without the person class | mean accuracy | pixel accuracy |",
            "|---|---:|---:|---:|---:|",
            f"| weakly supervised (image labels only) | {_pct(test_final['miou'])} | {_pct(test_final.get('miou_without_person'))} | "
            f"{_pct(test_final['mean_accuracy'])} | {_pct(test_final['pixel_accuracy'])} |",
            f"| upper bound (true masks) | {_pct(upper['miou'])} | {_pct(upper.get('miou_without_person'))} | "
            f"{_pct(upper['mean_accuracy'])} | {_pct(upper['pixel_accuracy'])} |",
            "",
            f"Weak / full supervision: **{_pct(_ratio(test_final['miou'], upper['miou']))} %** of the upper bound's test mIoU"
            + (f"; {_pct(_ratio(test_final['miou_without_person'], upper['miou_without_person']))} % without the person class, "
               "whose labels the weak model never sees (the paper drops them)." if "miou_without_person" in upper else "."),
        ]
        if "miou_person_as_background" in upper:
            lines += ["", "Ceiling of a model that never predicts the person class (the paper's, which drops its labels): the upper "
                          f"bound's own predictions with every person pixel turned background score {_pct(upper['miou_person_as_background'])} "
                          f"mIoU, **{_pct(_ratio(upper['miou_person_as_background'], upper['miou']))} %** of the upper bound."]
        if final != "tta" and "tta" in oracle["test"]:
            tta_upper = oracle["test"]["tta"]
            ceiling = (f" (ceiling {_pct(_ratio(tta_upper['miou_person_as_background'], tta_upper['miou']))} %)"
                       if "miou_person_as_background" in tta_upper else "")
            lines += ["", f"With TTA only (no CRF on either model): {_pct(_ratio(evaluate['test']['tta']['miou'], tta_upper['miou']))} %{ceiling}."]
    else:
        lines.append(f"No upper bound: {oracle.get('reason', 'the oracle stage did not run')}.")
    lines += ["", "Per-class IoU, the confusion matrix and Figure 2 (image | CAM + CRF | pseudo mask | prediction | "
              "ground truth): `plots/evaluate/`, and the MLflow runs of this pipeline.", ""]
    return "\n".join(lines)


REPORT_INPUTS = {"prepare": "metrics/prepare.json", "data": "metrics/data.json", "classifier": "metrics/classifier.json",
                 "cams": "metrics/cams.json", "ir_labels": "metrics/ir_labels.json", "irnet": "metrics/irnet.json",
                 "pseudo_masks": "metrics/pseudo_masks.json", "segmenter": str(SEGMENTER_METRICS), "oracle": str(ORACLE_METRICS),
                 "evaluate": str(EVALUATE_METRICS)}


def _numbers(payload, prefix: str = "") -> dict[str, float]:
    """Every number in a metrics document, flattened to ``a.b.c`` keys (MLflow metric names)."""
    flat: dict[str, float] = {}
    items = payload.items() if isinstance(payload, dict) else enumerate(payload) if isinstance(payload, list) else ()
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            flat[name] = float(value)
        elif isinstance(value, (dict, list)):
            flat.update(_numbers(value, name + "."))
    return flat


def run_report(params: Params, root: Path) -> dict:
    import mlflow

    stage_metrics = {}
    for stage, relative in REPORT_INPUTS.items():
        if not (root / relative).is_file():
            raise DataError(root / relative, f"metrics of stage {stage} not found: run `dvc repro` (the report reads every stage's metrics)")
        stage_metrics[stage] = read_json(root / relative)
    text = summary_markdown(stage_metrics)
    (root / REPORT).parent.mkdir(parents=True, exist_ok=True)
    from wsss.io import atomic_write_bytes

    atomic_write_bytes(root / REPORT, text.encode())
    hashes = tracking.input_hashes({name: root / relative for name, relative in REPORT_INPUTS.items()})
    with tracking.stage_run("pipeline", params.tracking.experiment, flatten(params), root=root, hashes=hashes):
        metrics = {}
        for stage, payload in stage_metrics.items():
            metrics.update(_numbers(payload, f"{stage}."))
        # MLflow metric names: letters, digits and _ - . / space
        mlflow.log_metrics({name.replace("(", "").replace(")", ""): value for name, value in metrics.items()})
        mlflow.log_artifact(str(root / REPORT))
        mlflow.set_tag("wsss.kind", "pipeline")
    return {"report": str(REPORT), "metrics_logged": len(metrics)}
