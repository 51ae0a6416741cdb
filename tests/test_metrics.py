from __future__ import annotations

import numpy as np
import pytest

from wsss.metrics import confusion_matrix, multilabel_f1, predicted_instead, segmentation_scores


def test_confusion_matrix_by_hand_with_ignored_pixels():
    truth = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    predicted = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    matrix = confusion_matrix(truth, predicted, num_classes=4)
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 0] = 1  # (0,0)
    expected[0, 1] = 1  # (0,1)
    expected[1, 1] = 2  # (0,2) (0,3)
    expected[2, 2] = 1  # (1,0)
    expected[2, 0] = 1  # (1,1)
    expected[1, 0] = 1  # (1,3); (1,2) is 255: ignored
    assert np.array_equal(matrix, expected)


def test_scores_from_a_hand_made_matrix():
    matrix = np.array([[5, 1, 0, 0], [2, 6, 0, 0], [0, 0, 0, 0], [1, 0, 0, 3]])
    scores = segmentation_scores(matrix)
    # IoU = TP / (GT + Pred - TP): class 0: 5/(6+8-5); 1: 6/(8+7-6); 2: absent (NaN); 3: 3/(4+3-3)
    expected = [5 / 9, 6 / 9, np.nan, 3 / 4]
    assert np.allclose(scores.iou, expected, equal_nan=True)
    assert scores.miou == pytest.approx(np.mean([5 / 9, 6 / 9, 3 / 4]))
    assert scores.mean_accuracy == pytest.approx(np.mean([5 / 6, 6 / 8, 3 / 4]))
    assert scores.pixel_accuracy == pytest.approx(14 / 18)


def test_predicted_but_absent_class_counts_as_zero():
    truth = np.zeros((2, 2), dtype=np.uint8)
    predicted = np.array([[0, 0], [0, 3]])
    scores = segmentation_scores(confusion_matrix(truth, predicted, 4))
    assert scores.iou[3] == 0 and np.isnan(scores.iou[1])
    assert scores.miou == pytest.approx((0.75 + 0) / 2)


def test_confusion_matrix_rejects_shape_mismatch_and_bad_ids():
    with pytest.raises(ValueError, match="shapes differ"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 2)
    with pytest.raises(ValueError, match="below 2"):
        confusion_matrix(np.zeros((2, 2)), np.full((2, 2), 5), 2)


def test_multilabel_f1_by_hand():
    probabilities = np.array([[0.9, 0.2, 0.1], [0.8, 0.7, 0.1], [0.1, 0.6, 0.1]])
    targets = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0]])
    scores = multilabel_f1(probabilities, targets)
    # class 0: tp 2 -> 1.0; class 1: tp 1, fp 1 -> 2/3; class 2: nothing to find, nothing found -> no F1
    assert np.allclose(scores.per_class[:2], [1.0, 2 / 3]) and np.isnan(scores.per_class[2])
    assert scores.micro == pytest.approx(2 * 3 / (2 * 3 + 1))
    assert scores.macro == pytest.approx((1 + 2 / 3) / 2)


def test_macro_f1_leaves_out_classes_absent_from_truth_and_prediction():
    # the case: car found nowhere (0), cat half right (0.5), dog missed (0), two classes absent everywhere
    targets = np.array([[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0]])
    probabilities = np.array([[0.1, 0.9, 0.1, 0.1, 0.1], [0.1, 0.9, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1, 0.1]])
    scores = multilabel_f1(probabilities, targets)
    assert scores.per_class[0] == 0.0 and scores.per_class[1] == pytest.approx(0.5) and scores.per_class[2] == 0.0
    assert np.isnan(scores.per_class[3:]).all()
    assert scores.macro == pytest.approx(0.5 / 3)
    empty = multilabel_f1(np.zeros((2, 2)), np.zeros((2, 2)))
    assert np.isnan(empty.macro) and np.isnan(empty.micro)


def test_predictions_of_one_class_moved_to_background():
    truth = np.array([[0, 0, 1, 2], [2, 2, 1, 0]])
    predicted = np.array([[0, 2, 1, 2], [2, 0, 2, 0]])
    matrix = confusion_matrix(truth, predicted, num_classes=3)
    moved = predicted_instead(matrix, class_id=2)
    assert np.array_equal(moved, confusion_matrix(truth, np.where(predicted == 2, 0, predicted), num_classes=3))
    assert moved.sum() == matrix.sum() and moved[:, 2].sum() == 0
    scores = segmentation_scores(moved)
    assert scores.iou[2] == 0.0 and scores.iou[1] == pytest.approx(1 / 2)  # class 1 untouched: 1 of 2 true pixels
    assert np.array_equal(matrix, confusion_matrix(truth, predicted, num_classes=3))  # the input is not changed
