"""The ``evaluate`` stage: the final segmenter on val and test, plain and with flip x scale TTA (and
the dense CRF under ``evaluate.crf``): mIoU, mean accuracy, pixel accuracy, per-class IoU
(``metrics/evaluate.json``); the confusion matrix, per-class IoU bars and the paper's Figure 2
(image | CAM + CRF | pseudo mask | prediction | ground truth) as pictures, in ``plots/evaluate`` and MLflow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsss import distributed, tracking, visualize
from wsss.cam import CamStore, label_map
from wsss.config import Params, flatten
from wsss.crf import crf_labels
from wsss.data.manifest import ImageRecord, Manifest, load_manifest
from wsss.evaluation import MODE_NAMES, MODES, evaluate_model, final_mode, mode_suffix, post_crf
from wsss.figures import confusion_figure, iou_bars
from wsss.io import read_image, read_mask, write_csv, write_json
from wsss.models.segmenter import load_segmenter
from wsss.shards import MaskStore
from wsss.stages.paths import CAMS_DIR, EVALUATE_METRICS, PREDICTED, PSEUDO_DIR, SEGMENTER_PATH, SPLITS_DIR

EVALUATE_PLOTS = Path("plots/evaluate")


def _iou_figure(metrics: dict, names: tuple[str, ...], final: str):
    series = [(f"{split}{mode_suffix(mode)} (mIoU {metrics[split][mode]['miou']:.3f})", metrics[split][mode]["iou"])
              for split, mode in (("val", "plain"), ("val", final), ("test", final))]
    return iou_bars(series, names)


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
                                                        batch_size=params.compute.eval_batch_size, keep=params.evaluate.num_figures,
                                                        chunk=params.compute.chunk_size)
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
        figures = {"confusion_matrix.png": confusion_figure(matrices["test"], names, f"test, {MODE_NAMES[final]}: share of each true class"),
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
    """The paper's Figure 2: image | CAM + CRF | IRNet pseudo mask | DeepLabv3+ | ground truth, the masks in
    solid palette colours (one colour per class in every column) with the classes shown named beside; steps
    1-2 on the classes the classifier predicts, as the segmenter sees an image: without its labels."""
    rows, masks = [], []
    # steps 1-2 as on an image nobody labelled: on the classes the classifier predicts (the segmenter's footing)
    store, pseudo_store = CamStore(root / CAMS_DIR / PREDICTED), MaskStore(root / PSEUDO_DIR / PREDICTED)  # each index read once
    for record, prediction in zip(records, predictions, strict=True):
        image = read_image(val.image_path(record))
        cams = store.load(record.id, expected_size=image.shape[:2])
        cam_crf = crf_labels(image, label_map(cams.full, cams.class_ids, params.cams.eval_threshold), params.crf)
        pseudo = pseudo_store.load(record.id, expected_size=image.shape[:2])
        truth = read_mask(val.mask_path(record))
        shown = (cam_crf, pseudo, prediction, truth)
        rows.append([image, *(visualize.colorize(mask) for mask in shown)])
        masks.extend(shown)
    return visualize.image_grid(rows, titles=["image", "CAM + CRF\n(predicted labels)", "IRNet pseudo mask\n(predicted labels)", title, "ground truth"],
                                row_labels=[r.id for r in records], legend=visualize.class_legend(masks, val.class_names))
