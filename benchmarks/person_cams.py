"""The person CAM alone against the true person masks, under several threshold rules: for each project
(a run's ``cams_person/val`` and ``data/splits/val.json``), the IoU over the val images that show a
person of the max-normalised person CAM thresholded by a constant, by Otsu's threshold of the image,
or by the image's own mean (``person.cam_threshold: mean``), and the share of the image each covers.

    python benchmarks/person_cams.py PROJECT [PROJECT ...]      # e.g. . /tmp/wsss-seeds/seed-2021
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from skimage.filters import threshold_otsu

from wsss.cam import CamStore
from wsss.data.manifest import load_manifest
from wsss.io import read_mask
from wsss.person import peak_normalised

RULES = {
    "0.3": lambda cam: 0.3,
    "0.4": lambda cam: 0.4,
    "Otsu per image": lambda cam: threshold_otsu(cam) if cam.max() > cam.min() else 0.5,
    "each image's mean": lambda cam: float(cam.mean()),
}


def rule_scores(project: Path) -> dict[str, tuple[float, float]]:
    """Rule -> (IoU with the true person pixels, mean share of the image the thresholded CAM covers)."""
    val = load_manifest(project / "data/splits/val.json")
    store, person = CamStore(project / "cams_person/val"), val.person_class
    totals = {name: [0, 0, []] for name in RULES}
    for record in val.records:
        if person not in record.labels or record.mask is None:
            continue
        truth = read_mask(val.mask_path(record)) == person
        cam = peak_normalised(store.load(record.id, expected_size=truth.shape).full[0])
        for name, rule in RULES.items():
            predicted = cam >= rule(cam)
            totals[name][0] += int((predicted & truth).sum())
            totals[name][1] += int((predicted | truth).sum())
            totals[name][2].append(float(predicted.mean()))
    return {name: (inter / max(union, 1), float(np.mean(areas))) for name, (inter, union, areas) in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("projects", type=Path, nargs="+")
    args = parser.parse_args()
    print("| project | " + " | ".join(f"{name}: IoU (area)" for name in RULES) + " |")
    print("|---" + "|---:" * len(RULES) + "|")
    for project in args.projects:
        scores = rule_scores(project.resolve())
        print(f"| {project} | " + " | ".join(f"{100 * iou:.1f} ({100 * area:.0f} %)" for iou, area in scores.values()) + " |")


if __name__ == "__main__":
    main()
