"""Scoring a segmenter: val and test, plain, with flip x scale TTA and, optionally, TTA refined by
the dense CRF (DeepLab's post-processing), from streamed confusion matrices (background included,
255 ignored). Shared by the ``oracle`` and ``evaluate`` stages and the ablation cells.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from wsss.config import CrfParams, Params
from wsss.crf import crf_refined
from wsss.data.manifest import Manifest
from wsss.errors import DataError
from wsss.metrics import confusion_matrix, predicted_instead, segmentation_scores
from wsss.segmentation import predict_images, predict_pairs

MODES = ("plain", "tta", "tta_crf")  # evaluation modes: no TTA, TTA, TTA + dense CRF (evaluate.crf)
MODE_NAMES = {"plain": "no TTA", "tta": "TTA", "tta_crf": "TTA + CRF"}


def truth_paths(manifest: Manifest, split: str) -> tuple[list[Path], list[Path]]:
    """Images and ground-truth masks of the records of ``manifest`` that have a mask."""
    records = [r for r in manifest.records if r.mask is not None]
    if not records:
        raise DataError(f"data/splits/{split}.json", f"no {split} image has a ground-truth mask to evaluate on")
    return [manifest.image_path(r) for r in records], [manifest.mask_path(r) for r in records]


def scores_dict(matrix: np.ndarray, manifest: Manifest) -> dict:
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


def evaluate_model(model, manifests: dict[str, Manifest], tta_scales: list[float], crf: CrfParams | None = None,
                   batch_size: int = 16, keep: int = 0, chunk: int = 64) -> tuple[dict, dict[str, np.ndarray], list[np.ndarray]]:
    """Scores of ``model`` on each split: ``plain``, ``tta`` and, with ``crf``, ``tta_crf`` (the TTA
    prediction refined by the dense CRF on the image, DeepLab's post-processing); the final mode's
    confusion matrices; its predictions of the first ``keep`` val images (for pictures)."""
    final = final_mode(crf is not None)
    metrics, matrices, kept = {}, {}, []
    for split, manifest in manifests.items():
        images, masks = truth_paths(manifest, split)
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
            for mask, prediction in crf_refined(scored_tta(), crf, chunk):
                add("tta_crf", mask, prediction)
        metrics[split] = {mode: scores_dict(matrix, manifest) for mode, matrix in split_matrices.items()}
        matrices[split] = split_matrices[final]
        metrics[split]["tta_gain_miou"] = metrics[split]["tta"]["miou"] - metrics[split]["plain"]["miou"]
        if crf is not None:
            metrics[split]["crf_gain_miou"] = metrics[split]["tta_crf"]["miou"] - metrics[split]["tta"]["miou"]
    return metrics, matrices, kept
