"""Pictures for people: mask overlays and image grids (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from wsss.io import IGNORE_INDEX, voc_palette

_PALETTE = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)


def colorize(mask: np.ndarray) -> np.ndarray:
    """Class-index mask -> RGB with the VOC palette (ignore = white)."""
    rgb = _PALETTE[mask]
    rgb[mask == IGNORE_INDEX] = 255
    return rgb


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blend the mask's colours over the image where the mask is not background."""
    blended = image.astype(np.float32)
    foreground = mask > 0
    blended[foreground] = (1 - alpha) * blended[foreground] + alpha * colorize(mask)[foreground]
    return blended.clip(0, 255).astype(np.uint8)


def class_legend(masks: Sequence[np.ndarray], class_names: Sequence[str]) -> list[tuple[str, np.ndarray]]:
    """(name, RGB colour of :func:`colorize`) of each class present in ``masks``, by class id; ``ignore``
    (white) last where a mask has it."""
    present: set[int] = set()
    for mask in masks:
        present.update(int(value) for value in np.unique(mask))
    entries = [(class_names[i] if i < len(class_names) else f"class {i}", _PALETTE[i]) for i in sorted(present) if i != IGNORE_INDEX]
    if IGNORE_INDEX in present:
        entries.append(("ignore", np.array([255, 255, 255], dtype=np.uint8)))
    return entries


LEGEND_INCHES = 1.7  # the column beside the grid that holds the class legend


def image_grid(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str] | None = None, row_labels: Sequence[str] | None = None,
               legend: Sequence[tuple[str, np.ndarray]] | None = None):
    """A matplotlib figure with one image per cell; ``titles`` name the columns; ``legend``
    (:func:`class_legend`) puts a colour key of the classes beside the grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    num_rows, num_cols = len(rows), max(len(row) for row in rows)
    grid_width = 1.6 * num_cols
    width = grid_width + (LEGEND_INCHES if legend else 0.0)
    figure, axes = plt.subplots(num_rows, num_cols, figsize=(width, 1.6 * num_rows), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(num_cols):
            axis = axes[r][c]
            axis.axis("off")
            if c < len(row):
                axis.imshow(row[c], interpolation="nearest")
            if titles and r == 0 and c < len(titles):
                axis.set_title(titles[c], fontsize=8)
            if row_labels and c == 0:
                axis.text(-2, row[0].shape[0] / 2, row_labels[r], fontsize=6, ha="right", va="center")
    if legend:
        figure.tight_layout(rect=(0, 0, grid_width / width, 1))
        handles = [Patch(facecolor=np.asarray(colour) / 255, edgecolor="black", linewidth=0.5, label=name) for name, colour in legend]
        figure.legend(handles=handles, loc="center left", bbox_to_anchor=(grid_width / width, 0.5), fontsize=7, title="class", title_fontsize=8, frameon=False,
                      ncols=1 if len(handles) <= 2.5 * num_rows * 3 else 2)
    else:
        figure.tight_layout()
    return figure


def close(figure) -> None:
    import matplotlib.pyplot as plt

    plt.close(figure)
