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


def test_figure2_legend_names_each_class_shown_in_its_palette_colour():
    from matplotlib.colors import to_rgba

    from wsss.visualize import class_legend, colorize, image_grid

    class_names = ["background", "cat", "dog", "person"]
    prediction = np.array([[0, 1], [1, 3]], dtype=np.uint8)
    truth = np.array([[0, 1], [255, 3]], dtype=np.uint8)
    legend = class_legend([prediction, truth], class_names)
    assert [name for name, _ in legend] == ["background", "cat", "person", "ignore"]  # dog is not shown
    for name, colour in legend[:-1]:
        pixels = colorize(prediction)[prediction == class_names.index(name)]
        assert (pixels == colour).all()  # the key's colour is the one each column paints the class with
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    figure = image_grid([[image, colorize(prediction), colorize(truth)]], titles=["image", "prediction", "truth"], legend=legend)
    (key,) = figure.legends
    assert [text.get_text() for text in key.get_texts()] == ["background", "cat", "person", "ignore"]
    assert key.legend_handles[2].get_facecolor() == to_rgba(tuple(legend[2][1] / 255))
    grid_right = max(axis.get_position().x1 for axis in figure.axes)
    assert grid_right < 1 - 0.9 / figure.get_size_inches()[0]  # the grid leaves the legend its own column
    close(figure)
