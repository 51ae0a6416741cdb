"""Would a dense CRF tuned for the segmenters' predictions lift the final model, or its share of the upper bound?

``evaluate.crf`` refines the TTA predictions of both segmenters with the ``crf`` group, whose settings were
chosen for step 1's CAMs and step 2's walk. This scores ``models/segmenter`` and ``models/oracle`` (run
``dvc repro evaluate`` first) with other settings of that CRF: the flip-TTA predictions are computed once,
each setting refines them on val and test. Settings are ranked by the final (weak) model's val mIoU, the
only fair choice; the test columns and the share are printed beside them, not used to choose. About 1.5 s
per setting and split on 2 cores (val and test of the weak model for every setting, the upper bound for
the top ones).

    python benchmarks/final_crf.py
    python benchmarks/final_crf.py --gt-prob 0.7 0.9 --compat 10 20 --srgb 8 13 --sxy 25 50 --top 4
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch

from _scratch import REPO
from wsss import distributed
from wsss.config import CrfParams, load_params
from wsss.crf import crf_refined
from wsss.data.manifest import load_manifest
from wsss.evaluation import truth_paths
from wsss.metrics import confusion_matrix, segmentation_scores
from wsss.models.segmenter import load_segmenter
from wsss.segmentation import predict_images

MODELS = {"weak": "models/segmenter/model.pt", "upper bound": "models/oracle/model.pt"}


def tta_predictions(model, split: str, params) -> tuple[list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], int]:
    """``(name, image, mask, TTA prediction)`` of every val or test image with a mask, and the class count."""
    manifest = load_manifest(REPO / f"data/splits/{split}.json")
    images, masks = truth_paths(manifest, split)
    predictions = predict_images(model, images, masks, manifest.num_classes, params.compute.eval_batch_size, params.evaluate.tta_scales)
    return [(str(path), image, mask, prediction) for path, (image, mask, prediction) in zip(images, predictions, strict=True)], manifest.num_classes


def miou(items, num_classes: int, crf: CrfParams | None) -> float:
    matrix = np.zeros((num_classes, num_classes), np.int64)
    pairs = ((mask, prediction) for _, _, mask, prediction in items) if crf is None else crf_refined(items, crf)
    for mask, prediction in pairs:
        matrix += confusion_matrix(mask, prediction, num_classes)
    return segmentation_scores(matrix).miou


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gt-prob", type=float, nargs="+", default=[0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--compat", type=float, nargs="+", default=[5, 10, 20], help="bilateral_compat values")
    parser.add_argument("--srgb", type=float, nargs="+", default=[8, 13, 20], help="bilateral_srgb values")
    parser.add_argument("--sxy", type=float, nargs="+", default=[25, 50], help="bilateral_sxy values")
    parser.add_argument("--top", type=int, default=6, help="settings (best weak val mIoU) also scored on test and for the upper bound")
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    distributed.init(params.compute)
    torch.set_num_threads(distributed.current().cpu_threads())
    data = {}
    for name, path in MODELS.items():
        model, _ = load_segmenter(REPO / path)
        data.update({(name, split): tta_predictions(model, split, params) for split in ("val", "test")})

    base = params.crf
    settings = [base] + [base.model_copy(update={"gt_prob": g, "bilateral_compat": c, "bilateral_srgb": s, "bilateral_sxy": x})
                         for g, c, s, x in itertools.product(args.gt_prob, args.compat, args.srgb, args.sxy)]
    ranked = sorted(((miou(*data["weak", "val"], crf), index, crf) for index, crf in enumerate(settings)), key=lambda r: (-r[0], r[1]))
    shown = ranked[: args.top] + [r for r in ranked[args.top:] if r[1] == 0]  # params.yaml's setting always shown

    print(f"{len(settings)} settings ({len(settings) - 1} of the grid and params.yaml's), ranked by the weak model's val mIoU\n")
    print("| setting | gt_prob | bilateral compat / srgb / sxy | weak val | upper bound val | share val | weak test | upper bound test | share test |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for weak_val, index, crf in shown:
        upper_val = miou(*data["upper bound", "val"], crf)
        weak_test, upper_test = miou(*data["weak", "test"], crf), miou(*data["upper bound", "test"], crf)
        label = "params.yaml" if index == 0 else f"#{index}"
        print(f"| {label} | {crf.gt_prob:g} | {crf.bilateral_compat:g} / {crf.bilateral_srgb:g} / {crf.bilateral_sxy:g} | {weak_val:.4f} | "
              f"{upper_val:.4f} | {weak_val / upper_val:.3f} | {weak_test:.4f} | {upper_test:.4f} | {weak_test / upper_test:.3f} |")
    tta = {key: miou(*value, None) for key, value in data.items()}
    print(f"| TTA only (no CRF) | | | {tta['weak', 'val']:.4f} | {tta['upper bound', 'val']:.4f} | {tta['weak', 'val'] / tta['upper bound', 'val']:.3f} | "
          f"{tta['weak', 'test']:.4f} | {tta['upper bound', 'test']:.4f} | {tta['weak', 'test'] / tta['upper bound', 'test']:.3f} |")
    print(f"\nweak val mIoU over the grid: {min(r[0] for r in ranked):.4f} - {ranked[0][0]:.4f}")


if __name__ == "__main__":
    main()
