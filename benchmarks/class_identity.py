"""How much of the gap between the final model and the pseudo masks on val is class identity?

The val pseudo masks (Table 2, step 2) are computed from the CAMs of the classes each val image is
labelled with, as in irn and the paper; the segmenter has to find every pixel's class on its own.
This scores ``models/segmenter/model.pt`` on val twice, with flip TTA at ``evaluate.tta_scales``:
as it is, and with its logits restricted to background plus the image's labelled classes (the
information the pseudo masks get), and with them restricted to the classes the step-1 classifier
predicts (P >= 0.5, flip-averaged; its top class when none): could the classifier fix class
identity at test time? It also prints both models' image-level macro-F1 on val (the segmenter's
presence of a class: its max pixel probability >= 0.5). Run after ``dvc repro evaluate``.

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
from wsss.models.classifier import load_trained_classifier
from wsss.models.segmenter import load_segmenter
from wsss.tta import tta_logits


def main() -> None:
    params = load_params(REPO / "params.yaml")
    model, spec = load_segmenter(REPO / "models/segmenter/model.pt")
    val = load_manifest(REPO / "data/splits/val.json")
    person = val.person_class
    classifier, state = load_trained_classifier(REPO / "models/classifier/model.pt")
    class_ids = list(state["class_ids"])
    matrices = {name: np.zeros((spec.num_classes,) * 2, np.int64) for name in ("free", "labels", "classifier")}
    presence = {"truth": [], "segmenter": [], "classifier": []}

    def restricted(logits: torch.Tensor, classes: list[int]) -> np.ndarray:
        allowed = torch.full((spec.num_classes,), -torch.inf)
        allowed[[0, *classes]] = 0
        return (logits + allowed[:, None, None]).argmax(0).numpy().astype(np.uint8)

    with torch.no_grad():
        for record in (r for r in val.records if r.mask is not None):
            truth = read_mask(val.mask_path(record))
            image = to_tensor(read_image(val.image_path(record)))[None]
            logits = tta_logits(model, image, params.evaluate.tta_scales)[0]
            matrices["free"] += confusion_matrix(truth, logits.argmax(0).numpy().astype(np.uint8), spec.num_classes)
            # the person never reaches the pseudo masks
            matrices["labels"] += confusion_matrix(truth, restricted(logits, [c for c in record.labels if c != person]), spec.num_classes)
            probability = torch.sigmoid((classifier(image) + classifier(image.flip(-1))) / 2)[0]
            predicted = [c for c, p in zip(class_ids, probability, strict=True) if p >= 0.5] or [class_ids[int(probability.argmax())]]
            matrices["classifier"] += confusion_matrix(truth, restricted(logits, predicted), spec.num_classes)
            presence["truth"].append([c in record.labels for c in class_ids])
            presence["classifier"].append([bool(p >= 0.5) for p in probability])
            pixel_max = logits.softmax(0).flatten(1).amax(1)
            presence["segmenter"].append([bool(pixel_max[c] >= 0.5) for c in class_ids])
    pseudo = read_json(REPO / "metrics/pseudo_masks.json")["val"]
    print("| val, flip TTA | mIoU | without the person class |")
    print("|---|---:|---:|")
    print(f"| pseudo masks (image labels given) | {pseudo['miou']:.3f} | {pseudo['miou_without_person']:.3f} |")
    for name, title in (("free", "DeepLabv3+ (no labels: the final model)"), ("labels", "DeepLabv3+, classes restricted to the image labels"),
                        ("classifier", "DeepLabv3+, classes restricted to the step-1 classifier's predictions")):
        scores = segmentation_scores(matrices[name])
        print(f"| {title} | {scores.miou:.3f} | {scores.miou_without(person):.3f} |")
    truth = np.array(presence["truth"])
    print("\n| val, image level | macro-F1 |\n|---|---:|")
    for name in ("classifier", "segmenter"):
        predicted = np.array(presence[name])
        f1 = [2 * (predicted[:, k] & truth[:, k]).sum() / max(1, predicted[:, k].sum() + truth[:, k].sum()) for k in range(len(class_ids))]
        print(f"| {'step-1 classifier' if name == 'classifier' else 'DeepLabv3+ (max pixel probability)'} | {np.mean(f1):.3f} |")


if __name__ == "__main__":
    main()
