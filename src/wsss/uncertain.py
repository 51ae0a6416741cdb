"""Uncertain pseudo-mask pixels, left out of the segmenter's training (``irnet.ignore_uncertain``).

A pixel of a training pseudo mask is uncertain when the two views step 2 has of it disagree: the
random walk's label (before any CRF) and the dense CRF's label (after the walk). The person merge
comes after both; a pixel it changed keeps its label (the walk never saw the person class). Such
pixels are stored as 255 (:data:`wsss.io.IGNORE_INDEX`), which the segmenter's loss skips.
"""

from __future__ import annotations

import numpy as np


def uncertain_pixels(walked: np.ndarray, refined: np.ndarray, final: np.ndarray) -> np.ndarray:
    """Boolean map: the walk (``walked``) and the CRF (``refined``) disagree, and the final mask
    (``final``: ``refined`` after the person merge, if any) kept the CRF's label."""
    if not walked.shape == refined.shape == final.shape:
        raise ValueError(f"walked {walked.shape}, refined {refined.shape} and final {final.shape} masks differ in size")
    return (walked != refined) & (final == refined)

