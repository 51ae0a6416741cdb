"""Figures of per-class results that stay readable from 7 classes (the embedded default) to 200 (LID):
the confusion matrix (numbers in the cells only while they fit) and per-class IoU bars (every class
while they fit, else the lowest and the highest; the CSV next to the figure holds them all).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ANNOTATED_CLASSES = 25  # cells carry their value up to this many classes
LABELLED_CLASSES = 60  # every class named on the axes up to this many, else every k-th
BARS_SHOWN = 40  # per-class bars: all classes up to this many, else the lowest and highest half each
MAX_INCHES = 16.0


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def row_normalised(matrix: np.ndarray) -> np.ndarray:
    """Each row of a confusion matrix divided by its sum (the share of each true class; 0 where empty)."""
    rows = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=np.float64), where=rows > 0)


def confusion_figure(matrix: np.ndarray, names: Sequence[str], title: str):
    """Row-normalised confusion matrix: values written in the cells up to ``ANNOTATED_CLASSES``
    classes, every class named up to ``LABELLED_CLASSES`` (else every k-th), at most ``MAX_INCHES`` wide."""
    plt = _matplotlib()
    count = len(names)
    normalised = row_normalised(matrix)
    side = min(MAX_INCHES, 1.5 + 0.6 * count)
    figure, axis = plt.subplots(figsize=(side + 1.0, side))
    image = axis.imshow(normalised, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    step = 1 if count <= LABELLED_CLASSES else int(np.ceil(count / LABELLED_CLASSES))
    ticks = list(range(0, count, step))
    fontsize = 8 if count <= ANNOTATED_CLASSES else 6
    axis.set_xticks(ticks, [names[i] for i in ticks], rotation=90 if count > ANNOTATED_CLASSES else 45,
                    ha="center" if count > ANNOTATED_CLASSES else "right", fontsize=fontsize)
    axis.set_yticks(ticks, [names[i] for i in ticks], fontsize=fontsize)
    axis.set(xlabel="predicted", ylabel="ground truth", title=title)
    if count <= ANNOTATED_CLASSES:
        for (truth, predicted), value in np.ndenumerate(normalised):
            axis.text(predicted, truth, f"{value:.2f}", ha="center", va="center", fontsize=7,
                      color="white" if value > 0.5 else "black")
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    return figure


def shown_classes(names: Sequence[str], key: dict[str, float | None], limit: int = BARS_SHOWN) -> tuple[list[str], bool]:
    """The classes a bar chart shows: all of them up to ``limit``, else the ``limit // 2`` lowest and
    highest by ``key`` (classes without a value last); and whether some were left out."""
    if len(names) <= limit:
        return list(names), False
    scored = sorted((n for n in names if key.get(n) is not None), key=lambda n: key[n])
    half = limit // 2
    chosen = set(scored[:half]) | set(scored[-half:])
    return [n for n in names if n in chosen], True


def iou_bars(series: Sequence[tuple[str, dict[str, float | None]]], names: Sequence[str], xlabel: str = "IoU"):
    """Horizontal bars of per-class IoU, one colour per series (``(label, {class: IoU or None})``);
    with many classes only the lowest and highest of the last series, the title says how many."""
    plt = _matplotlib()
    shown, partial = shown_classes(names, series[-1][1])
    height = 0.8 / len(series)
    figure, axis = plt.subplots(figsize=(7, min(MAX_INCHES, 0.12 + 0.32 * len(series) * len(shown) / 2 + 1.4)))
    positions = np.arange(len(shown))
    for number, (label, values) in enumerate(series):
        offset = (number - (len(series) - 1) / 2) * height
        axis.barh(positions + offset, [values.get(n) or 0.0 for n in shown], height=height, label=label)
    axis.set_yticks(positions, shown, fontsize=8 if len(shown) <= 20 else 6)
    axis.invert_yaxis()
    axis.set(xlabel=xlabel, xlim=(0, 1))
    if partial:
        axis.set_title(f"{len(shown)} of {len(names)} classes: the {len(shown) // 2} lowest and highest of "
                       f"{series[-1][0]} (all in the CSV)", fontsize=9)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure
