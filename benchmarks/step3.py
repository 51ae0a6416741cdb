"""Step 3 against its targets: Table 2 ordering on val, weak vs upper bound on test, timings.

Runs ``train_segmenter``, ``oracle``, ``evaluate`` and ``report`` on ``params.yaml`` in a scratch
folder (reusing this checkout's data, CAMs, pseudo masks and step-1/2 metrics: run
``dvc repro pseudo_masks`` first) with a scratch MLflow store and no checkpoint to resume from,
and prints a table. Targets (issue 5): segmentation + TTA > pseudo masks > CAM + CRF on val;
final test mIoU (TTA) >= 85 % of the upper bound's. The whole ``dvc repro`` time is measured by
``benchmarks/pipeline.py``.

    python benchmarks/step3.py
"""

from __future__ import annotations

import os
import time

from _scratch import REPO, scratch_project
from wsss.config import load_params
from wsss.io import read_json
from wsss.stages import STAGES

REUSED = ("data/prepared", "data/splits", "cams", "pseudo_masks", "metrics/prepare.json", "metrics/data.json",
          "metrics/classifier.json", "metrics/cams.json", "metrics/ir_labels.json", "metrics/irnet.json",
          "metrics/pseudo_masks.json")


def main() -> None:
    params = load_params(REPO / "params.yaml")
    with scratch_project(REUSED) as root:
        timings = {}
        for stage in ("train-segmenter", "oracle", "evaluate", "report"):
            start = time.perf_counter()
            STAGES[stage](params, root)
            timings[stage] = time.perf_counter() - start
        cams, pseudo = read_json(root / "metrics/cams.json"), read_json(root / "metrics/pseudo_masks.json")
        evaluate, oracle = read_json(root / "metrics/evaluate.json"), read_json(root / "metrics/oracle.json")
        segmenter = read_json(root / "metrics/segmenter.json")
    s = params.segmenter
    print(f"DeepLabv3+ {s.encoder} OS{s.output_stride} decoder {s.decoder_channels}, {s.optimizer} lr {s.lr}, batch {s.batch_size}, "
          f"{s.epochs} epochs, augmentation {s.augmentation}; TTA scales {params.evaluate.tta_scales}; {os.cpu_count()} cores")
    val, test, upper = evaluate["val"], evaluate["test"], oracle["test"]["tta"]
    ordered = val["tta"]["miou"] > pseudo["val"]["miou"] > cams["cam_crf"]["miou"]
    print("| measure | value | target |")
    print("|---|---:|---|")
    print(f"| val mIoU: CAM + CRF / pseudo masks / segmentation / segmentation + TTA | {cams['cam_crf']['miou']:.3f} / "
          f"{pseudo['val']['miou']:.3f} / {val['plain']['miou']:.3f} / {val['tta']['miou']:.3f} | "
          f"seg + TTA > pseudo > CAM + CRF: {'met' if ordered else 'not met'} |")
    print(f"| the same without the person class | {cams['cam_crf']['miou_without_person']:.3f} / "
          f"{pseudo['val']['miou_without_person']:.3f} / {val['plain']['miou_without_person']:.3f} / "
          f"{val['tta']['miou_without_person']:.3f} | |")
    print(f"| test, TTA: mIoU / mean accuracy / pixel accuracy | {test['tta']['miou']:.3f} / {test['tta']['mean_accuracy']:.3f} / "
          f"{test['tta']['pixel_accuracy']:.3f} | |")
    print(f"| upper bound, test, TTA: mIoU / without person | {upper['miou']:.3f} / {upper['miou_without_person']:.3f} | |")
    ratio = test["tta"]["miou"] / upper["miou"]
    print(f"| weak / upper bound, test mIoU (TTA) | {ratio:.3f} | >= 0.85: {'met' if ratio >= 0.85 else 'not met'} |")
    print(f"| the same without the person class | {test['tta']['miou_without_person'] / upper['miou_without_person']:.3f} | |")
    print(f"| segmenter best epoch, TTA gain on val | {segmenter['best_epoch']} of {s.epochs}, {val['tta_gain_miou']:+.3f} | |")
    for stage, seconds in timings.items():
        print(f"| {stage} seconds | {seconds:.0f} | |")


if __name__ == "__main__":
    main()
