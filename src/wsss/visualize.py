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


def image_grid(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str] | None = None, row_labels: Sequence[str] | None = None):
    """A matplotlib figure with one image per cell; ``titles`` name the columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_rows, num_cols = len(rows), max(len(row) for row in rows)
    figure, axes = plt.subplots(num_rows, num_cols, figsize=(1.6 * num_cols, 1.6 * num_rows), squeeze=False)
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
    figure.tight_layout()
    return figure


def close(figure) -> None:
    import matplotlib.pyplot as plt

    plt.close(figure)
