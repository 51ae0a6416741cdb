"""Per-class figures stay readable at LID's 200 classes and keep every number at the default's 8."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402

from wsss.figures import MAX_INCHES, confusion_figure, iou_bars, shown_classes  # noqa: E402
from wsss.visualize import close  # noqa: E402


def names(count: int) -> list[str]:
    return ["background"] + [f"class_{i}" for i in range(1, count)]


def test_confusion_figure_annotates_small_matrices_only_and_stays_bounded():
    rng = np.random.default_rng(0)
    small = confusion_figure(rng.integers(0, 50, (8, 8)), names(8), "test")
    assert len(small.axes[0].texts) == 64
    close(small)
    large = confusion_figure(rng.integers(0, 50, (201, 201)), names(201), "test")
    axis = large.axes[0]
    assert len(axis.texts) == 0  # not 40,401 labels
    assert max(large.get_size_inches()) <= MAX_INCHES + 1.0
    assert len(axis.get_xticks()) <= 61 and axis.get_xticklabels()[1].get_text() == "class_4"
    close(large)


def test_iou_bars_show_every_class_or_the_lowest_and_highest():
    few = {n: 0.1 * i for i, n in enumerate(names(8))}
    assert shown_classes(names(8), few) == (names(8), False)
    many = {n: (i * 37 % 201) / 201 for i, n in enumerate(names(201))}
    many["class_7"] = None  # absent from truth and prediction
    shown, partial = shown_classes(names(201), many)
    ranked = sorted((n for n in many if many[n] is not None), key=many.get)
    assert partial and len(shown) == 40 and set(shown) == set(ranked[:20]) | set(ranked[-20:])
    figure = iou_bars([("val", many), ("test", many)], names(201))
    axis = figure.axes[0]
    assert len(axis.patches) == 80 and "40 of 201 classes" in axis.get_title()
    assert max(figure.get_size_inches()) <= MAX_INCHES
    close(figure)
