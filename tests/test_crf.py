from __future__ import annotations

import numpy as np
import pytest

from wsss.config import CrfParams
from wsss.crf import CrfError, CrfTask, crf_labels, crf_many


def toy(size: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A bright square on a dark image, and a 'blurred' label map that overflows it by 4 px."""
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[10:30, 12:30] = (200, 180, 40)
    truth = np.zeros((size, size), dtype=np.uint8)
    truth[10:30, 12:30] = 3
    blurred = np.zeros_like(truth)
    blurred[6:34, 8:34] = 3
    return image, truth, blurred


def test_crf_snaps_a_blurred_map_to_the_image_edges():
    image, truth, blurred = toy()
    image.flags.writeable = False  # as decoded images come from PIL
    refined = crf_labels(image, blurred, CrfParams(bilateral_sxy=10))
    assert (refined == truth).mean() > 0.98
    assert (blurred == truth).mean() < 0.8
    assert set(np.unique(refined)) == {0, 3}  # only the labels of the input map


def test_single_label_maps_pass_through():
    image, _, _ = toy()
    flat = np.full((40, 40), 2, dtype=np.uint8)
    assert np.array_equal(crf_labels(image, flat, CrfParams()), flat)


def test_pool_matches_serial_and_names_failed_images():
    image, _, blurred = toy()
    tasks = [CrfTask(f"img{i}", image, np.roll(blurred, i, axis=1)) for i in range(4)]
    serial = dict(crf_many(tasks, CrfParams(workers=1)))
    pooled = dict(crf_many(tasks, CrfParams(workers=2), chunksize=1))
    assert serial.keys() == pooled.keys() and all(np.array_equal(serial[k], pooled[k]) for k in serial)

    broken = [*tasks[:2], CrfTask("bad_image", image[:20], blurred), tasks[3]]
    with pytest.raises(CrfError, match=r"failed on 1 image\(s\): bad_image \(ValueError"):
        list(crf_many(broken, CrfParams(workers=2), chunksize=1))


def test_crf_refinement_of_predictions_streams_in_order_over_chunks():
    """evaluate.crf: the TTA predictions are refined a chunk at a time, each against its own image;
    an image that fails is named."""
    from wsss.metrics import confusion_matrix, segmentation_scores
    from wsss.crf import crf_refined

    items = []
    for index in range(5):
        image, truth, blurred = toy()
        shifted = [np.roll(a, 2 * index, axis=1) for a in (image, truth, blurred)]  # five different images
        items.append((f"image-{index}", *shifted))
    params = CrfParams(bilateral_sxy=10, workers=1)
    refined = list(crf_refined(iter(items), params, chunk=2))

    assert len(refined) == 5
    before, after = np.zeros((4, 4), np.int64), np.zeros((4, 4), np.int64)
    for (_, image, truth, blurred), (mask, prediction) in zip(items, refined, strict=True):
        assert mask is truth
        assert np.array_equal(prediction, crf_labels(image, blurred, params))
        before += confusion_matrix(truth, blurred, 4)
        after += confusion_matrix(truth, prediction, 4)
    assert segmentation_scores(after).miou > segmentation_scores(before).miou + 0.1

    name, image, truth, blurred = items[3]
    items[3] = (name, image[:20], truth, blurred)  # image and labels of different sizes
    with pytest.raises(CrfError, match="image-3"):
        list(crf_refined(iter(items), params, chunk=2))
