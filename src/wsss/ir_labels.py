"""Inter-pixel relation (IR) labels: the reliable foreground and background seeds IRNet learns from.

For an image with full-resolution CAMs: the *foreground* map is the argmax over a background
plane at ``irnet.conf_fg`` (0.30) and the CAMs, refined by the dense CRF; the *background* map
the same with the plane at ``irnet.conf_bg`` (0.05). A pixel takes the foreground map's class
where that map says object; where it says background, the pixel is 255 (unsure) unless the
low-threshold map also calls it background, then 0 (background). Only images whose confidence
exceeds ``irnet.confidence_cutoff`` take part.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wsss.cam import label_map
from wsss.config import CrfParams
from wsss.crf import CrfTask, crf_many
from wsss.io import IGNORE_INDEX


def combine(foreground: np.ndarray, background: np.ndarray) -> np.ndarray:
    """IR label from the CRF'd high-threshold (fg) and low-threshold (bg) label maps."""
    labels = foreground.astype(np.uint8).copy()
    labels[foreground == 0] = IGNORE_INDEX
    labels[(foreground == 0) & (background == 0)] = 0
    return labels


def seed_maps(cams_full: np.ndarray, class_ids: np.ndarray, conf_fg: float, conf_bg: float) -> tuple[np.ndarray, np.ndarray]:
    """The two label maps before the CRF."""
    return label_map(cams_full, class_ids, conf_fg), label_map(cams_full, class_ids, conf_bg)


@dataclass(frozen=True)
class IrInput:
    id: str
    image: np.ndarray
    cams_full: np.ndarray
    class_ids: np.ndarray


def ir_labels_many(items: list[IrInput], conf_fg: float, conf_bg: float, crf: CrfParams) -> dict[str, np.ndarray]:
    """IR labels of many images; the two CRFs of every image run across the process pool."""
    tasks = []
    for item in items:
        foreground, background = seed_maps(item.cams_full, item.class_ids, conf_fg, conf_bg)
        tasks += [CrfTask(f"{item.id}#fg", item.image, foreground), CrfTask(f"{item.id}#bg", item.image, background)]
    refined = dict(crf_many(tasks, crf))
    return {item.id: combine(refined[f"{item.id}#fg"], refined[f"{item.id}#bg"]) for item in items}


def label_statistics(labels: np.ndarray, truth: np.ndarray | None) -> dict[str, int]:
    """Pixel counts of fg / bg / ignore, and (when a mask is known) of checked and correct ones."""
    foreground = (labels != 0) & (labels != IGNORE_INDEX)
    background = labels == 0
    counts = {"fg": int(foreground.sum()), "bg": int(background.sum()), "ignore": int((labels == IGNORE_INDEX).sum())}
    if truth is not None:
        counts.update(fg_checked=counts["fg"], bg_checked=counts["bg"],
                      fg_correct=int((foreground & (truth == labels)).sum()), bg_correct=int((background & (truth == 0)).sum()))
    return counts
