"""How much of the gap between the final model and the pseudo masks on val is class identity?

The val pseudo masks (Table 2, step 2) are computed from the CAMs of the classes each val image is
labelled with, as in irn and the paper; the segmenter has to find every pixel's class on its own.
This scores ``models/segmenter/model.pt`` on val twice, with flip TTA at ``evaluate.tta_scales``:
as it is, and with its logits restricted to background plus the image's labelled classes (the
information the pseudo masks get). Run after ``dvc repro evaluate``.

    python benchmarks/class_identity.py
"""

from __future__ import annotations

import numpy as np
import torch

from _scratch import REPO
from wsss.augment import to_tensor
from wsss.config import load_params
from wsss.data.manifest import load_manifest
from wsss.io import read_image, read_json, read_mask
from wsss.metrics import confusion_matrix, segmentation_scores
from wsss.models.segmenter import load_segmenter
from wsss.tta import tta_logits


def main() -> None:
    params = load_params(REPO / "params.yaml")
    model, spec = load_segmenter(REPO / "models/segmenter/model.pt")
    val = load_manifest(REPO / "data/splits/val.json")
    person = val.person_class
    matrices = {"free": np.zeros((spec.num_classes,) * 2, np.int64), "labels": np.zeros((spec.num_classes,) * 2, np.int64)}
    with torch.no_grad():
        for record in (r for r in val.records if r.mask is not None):
            truth = read_mask(val.mask_path(record))
            logits = tta_logits(model, to_tensor(read_image(val.image_path(record)))[None], params.evaluate.tta_scales)[0]
            matrices["free"] += confusion_matrix(truth, logits.argmax(0).numpy().astype(np.uint8), spec.num_classes)
            allowed = torch.full((spec.num_classes,), -torch.inf)
            allowed[[0, *(c for c in record.labels if c != person)]] = 0  # the person never reaches the pseudo masks
            restricted = (logits + allowed[:, None, None]).argmax(0).numpy().astype(np.uint8)
            matrices["labels"] += confusion_matrix(truth, restricted, spec.num_classes)
    pseudo = read_json(REPO / "metrics/pseudo_masks.json")["val"]
    print("| val, flip TTA | mIoU | without the person class |")
    print("|---|---:|---:|")
    print(f"| pseudo masks (image labels given) | {pseudo['miou']:.3f} | {pseudo['miou_without_person']:.3f} |")
    for name, title in (("free", "DeepLabv3+ (no labels: the final model)"), ("labels", "DeepLabv3+, classes restricted to the image labels")):
        scores = segmentation_scores(matrices[name])
        print(f"| {title} | {scores.miou:.3f} | {scores.miou_without(person):.3f} |")


if __name__ == "__main__":
    main()
