"""Metrics shared by every step: segmentation (confusion matrix, IoU) and multi-label F1.

Segmentation: one confusion matrix over all classes, background included, ground-truth pixels of
value 255 ignored. ``IoU_c = TP / (GT_c + Pred_c - TP)``; a class absent from both ground truth
and prediction has no IoU (NaN) and is left out of the mean (``nanmean``); mean accuracy is the
mean per-class recall over classes present in the ground truth; pixel accuracy = trace / total.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wsss.io import IGNORE_INDEX


def confusion_matrix(ground_truth: np.ndarray, prediction: np.ndarray, num_classes: int) -> np.ndarray:
    """``matrix[g, p]`` = number of pixels of true class g predicted as p (255 in g ignored)."""
    if ground_truth.shape != prediction.shape:
        raise ValueError(f"shapes differ: ground truth {ground_truth.shape}, prediction {prediction.shape}")
    truth = ground_truth.astype(np.int64).ravel()
    predicted = prediction.astype(np.int64).ravel()
    valid = truth != IGNORE_INDEX
    truth, predicted = truth[valid], predicted[valid]
    if truth.size and (truth.max() >= num_classes or predicted.max() >= num_classes or predicted.min() < 0):
        raise ValueError(f"class ids must be below {num_classes}")
    return np.bincount(truth * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)


def predicted_instead(matrix: np.ndarray, class_id: int, instead: int = 0) -> np.ndarray:
    """The confusion matrix of the same predictions with every pixel predicted ``class_id``
    predicted ``instead`` (background): e.g. a model as good as this one that never predicts the
    person class, the ceiling of a method that drops its labels."""
    moved = matrix.copy()
    moved[:, instead] += moved[:, class_id]
    moved[:, class_id] = 0
    return moved


@dataclass(frozen=True)
class SegmentationScores:
    iou: np.ndarray  # per class, NaN where the class is in neither ground truth nor prediction
    miou: float
    mean_accuracy: float
    pixel_accuracy: float

    def miou_without(self, class_id: int) -> float:
        """mIoU over every class but one (e.g. the person class, which step 1 cannot see)."""
        return float(np.nanmean(np.delete(self.iou, class_id)))

    def as_dict(self, class_names: tuple[str, ...] | list[str]) -> dict:
        return {
            "miou": self.miou,
            "mean_accuracy": self.mean_accuracy,
            "pixel_accuracy": self.pixel_accuracy,
            "iou": {name: (None if np.isnan(v) else float(v)) for name, v in zip(class_names, self.iou, strict=True)},
        }


def segmentation_scores(matrix: np.ndarray) -> SegmentationScores:
    """mIoU, mean accuracy and pixel accuracy from a confusion matrix."""
    matrix = matrix.astype(np.float64)
    true_positive = np.diag(matrix)
    ground_truth = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    union = ground_truth + predicted - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
        recall = np.where(ground_truth > 0, true_positive / ground_truth, np.nan)
    total = matrix.sum()
    return SegmentationScores(
        iou=iou,
        miou=float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        mean_accuracy=float(np.nanmean(recall)) if np.isfinite(recall).any() else float("nan"),
        pixel_accuracy=float(true_positive.sum() / total) if total else float("nan"),
    )


@dataclass(frozen=True)
class F1Scores:
    micro: float
    macro: float
    per_class: np.ndarray


def multilabel_f1(probabilities: np.ndarray, targets: np.ndarray, threshold: float = 0.5) -> F1Scores:
    """Image-level F1 of multi-label predictions (``probabilities > threshold``).

    A class absent from both targets and predictions has no F1 (NaN) and is left out of the macro
    mean, as absent classes are left out of the mIoU: a val set without a class cannot say how well
    it is recognised. Micro-F1 pools every decision (NaN only when nothing is positive anywhere)."""
    predicted = probabilities > threshold
    truth = targets > 0.5
    true_positive = (predicted & truth).sum(axis=0).astype(np.float64)
    false_positive = (predicted & ~truth).sum(axis=0)
    false_negative = (~predicted & truth).sum(axis=0)
    denominator = 2 * true_positive + false_positive + false_negative
    per_class = np.where(denominator > 0, 2 * true_positive / np.maximum(denominator, 1), np.nan)
    total = 2 * true_positive.sum() + false_positive.sum() + false_negative.sum()
    micro = float(2 * true_positive.sum() / total) if total else float("nan")
    macro = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")
    return F1Scores(micro=micro, macro=macro, per_class=per_class)
