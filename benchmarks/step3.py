"""Step 3 against its targets: Table 2 ordering on val, weak vs upper bound on test, timings.

Runs ``train_segmenter``, ``oracle``, ``evaluate`` and ``report`` on ``params.yaml`` in a scratch
folder (reusing this checkout's data, CAMs, pseudo masks and step-1/2 metrics: run
``dvc repro pseudo_masks`` first) with a scratch MLflow store and no checkpoint to resume from,
and prints a table. Targets (issue 5): segmentation + TTA > pseudo masks > CAM + CRF on val;
final test mIoU (TTA) >= 85 % of the upper bound's. "final" is TTA + CRF under ``evaluate.crf``
(the CPU default), TTA otherwise; both models are scored the same way. The whole ``dvc repro`` time is measured by
``benchmarks/pipeline.py``.

    python benchmarks/step3.py
"""

from __future__ import annotations

import os
import time

from _scratch import REPO, scratch_project
from wsss import distributed
from wsss.config import load_params
from wsss.io import read_json
from wsss.stages import STAGES

REUSED = ("data/prepared", "data/splits", "cams", "pseudo_masks", "metrics/prepare.json", "metrics/data.json",
          "metrics/classifier.json", "metrics/cams.json", "metrics/ir_labels.json", "metrics/irnet.json",
          "metrics/pseudo_masks.json")


def main() -> None:
    params = load_params(REPO / "params.yaml")
    distributed.init(params.compute)  # compute.precision and compute.device, as the stages run
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
          f"{s.epochs} epochs, augmentation {s.augmentation}; TTA scales {params.evaluate.tta_scales}; "
          f"CRF on the final predictions: {params.evaluate.crf}; {os.cpu_count()} cores")
    final = evaluate["final_mode"]
    val, test, upper = evaluate["val"], evaluate["test"], oracle["test"][final]
    modes = [mode for mode in ("plain", "tta", "tta_crf") if mode in val]
    ordered = val[final]["miou"] > pseudo["val"]["miou"] > cams["cam_crf"]["miou"]
    seg_miou = " / ".join(f"{val[m]['miou']:.3f}" for m in modes)
    seg_without = " / ".join(f"{val[m]['miou_without_person']:.3f}" for m in modes)
    print("| measure | value | target |")
    print("|---|---:|---|")
    print(f"| val mIoU: CAM + CRF / pseudo masks / segmentation: {' / '.join(modes)} | {cams['cam_crf']['miou']:.3f} / "
          f"{pseudo['val']['miou']:.3f} / {seg_miou} | "
          f"final ({final}) > pseudo > CAM + CRF: {'met' if ordered else 'not met'} |")
    print(f"| the same without the person class | {cams['cam_crf']['miou_without_person']:.3f} / "
          f"{pseudo['val']['miou_without_person']:.3f} / {seg_without} | |")
    for mode in reversed(modes):
        print(f"| test, {mode}: mIoU / mean accuracy / pixel accuracy | {test[mode]['miou']:.3f} / {test[mode]['mean_accuracy']:.3f} / "
              f"{test[mode]['pixel_accuracy']:.3f} | |")
    print(f"| upper bound, test, {final}: mIoU / without person | {upper['miou']:.3f} / {upper['miou_without_person']:.3f} | |")
    ratio = test[final]["miou"] / upper["miou"]
    print(f"| weak / upper bound, test mIoU ({final}) | {ratio:.3f} | >= 0.85: {'met' if ratio >= 0.85 else 'not met'} |")
    print(f"| the same without the person class | {test[final]['miou_without_person'] / upper['miou_without_person']:.3f} | |")
    if final != "tta":
        print(f"| weak / upper bound, test mIoU (tta) | {test['tta']['miou'] / oracle['test']['tta']['miou']:.3f} | |")
    print(f"| segmenter best epoch, TTA gain on val | {segmenter['best_epoch']} of {s.epochs}, {val['tta_gain_miou']:+.3f} | |")
    for stage, seconds in timings.items():
        print(f"| {stage} seconds | {seconds:.0f} | |")


if __name__ == "__main__":
    main()
