"""Step 3 against its targets: Table 2 ordering on val, weak vs upper bound on test, timings.

Runs ``train_segmenter``, ``oracle``, ``evaluate`` and ``report`` on ``params.yaml`` in a scratch
folder (reusing this checkout's data, step-1 network, CAMs, pseudo masks and step-1/2 metrics: run
``dvc repro pseudo_masks`` first) with a scratch MLflow store and no checkpoint to resume from,
and prints a table. Targets (issue 5): segmentation + TTA > pseudo masks > CAM + CRF on val;
final test mIoU (TTA) >= 85 % of the upper bound's. "final" is TTA + CRF under ``evaluate.crf``
(the CPU default), TTA otherwise; both models are scored the same way. The whole ``dvc repro`` time is measured by
``benchmarks/pipeline.py``.

``--seeds``: the three stages once per seed (``seed`` of params.yaml replaced; steps 1-2 stay this
checkout's), then one row per seed and the mean and standard deviation of the share of the upper bound:
how far the share moves with step 3's randomness alone. About 4.5 minutes per seed on 2 cores.

    python benchmarks/step3.py
    python benchmarks/step3.py --seeds 2020 2021 2022
"""

from __future__ import annotations

import argparse
import os
import statistics

from _scratch import REPO, run_stages
from wsss import distributed
from wsss.config import load_params
from wsss.evaluation import final_mode
from wsss.io import read_json

REUSED = ("data/prepared", "data/splits", "models/classifier", "cams", "pseudo_masks", "metrics/prepare.json", "metrics/data.json",
          "metrics/classifier.json", "metrics/cams.json", "metrics/ir_labels.json", "metrics/irnet.json",
          "metrics/pseudo_masks.json")


def run_step3(params) -> tuple[dict, dict[str, float]]:
    """The step-3 stages on ``params`` in a scratch project: every metrics file they read or write, and their seconds."""
    return run_stages(params, REUSED, ("train-segmenter", "oracle", "evaluate", "report"),
                      lambda root: {name: read_json(root / f"metrics/{name}.json") for name in ("cams", "pseudo_masks", "evaluate", "oracle", "segmenter")})


def seed_rows(params, seeds: list[int]) -> None:
    """Step 3 once per seed, a row as each finishes (weak, upper bound and share, TTA and the final
    mode), then the shares' mean and standard deviation."""
    final = final_mode(params.evaluate.crf)
    modes = ["tta"] + ([final] if final != "tta" else [])
    print("| seed | " + " | ".join(f"weak {m} | upper bound {m} | share {m}" for m in modes) + " | val seg + TTA | seconds |")
    print("|---:|" + "---:|" * (3 * len(modes) + 2), flush=True)
    shares: dict[str, list[float]] = {m: [] for m in modes}
    for seed in seeds:
        metrics, timings = run_step3(params.model_copy(update={"seed": seed}))
        cells = []
        for mode in modes:
            weak, upper = metrics["evaluate"]["test"][mode]["miou"], metrics["oracle"]["test"][mode]["miou"]
            shares[mode].append(weak / upper)
            cells.append(f"{weak:.4f} | {upper:.4f} | {weak / upper:.3f}")
        print(f"| {seed} | " + " | ".join(cells) + f" | {metrics['evaluate']['val']['tta']['miou']:.4f} | {sum(timings.values()):.0f} |", flush=True)
    for mode, values in shares.items():
        spread = f" +/- {statistics.stdev(values):.3f} (standard deviation)" if len(values) > 1 else ""
        print(f"share of the upper bound, {mode}: mean {statistics.mean(values):.3f}{spread} over {len(values)} seed(s); "
              f"{sum(v >= 0.85 for v in values)} of {len(values)} at 0.85 or more")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="step 3 once per seed, then the share's spread")
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    distributed.init(params.compute)  # compute.precision and compute.device, as the stages run
    if args.seeds:
        seed_rows(params, args.seeds)
        return
    metrics, timings = run_step3(params)
    cams, pseudo, segmenter = metrics["cams"], metrics["pseudo_masks"], metrics["segmenter"]
    evaluate, oracle = metrics["evaluate"], metrics["oracle"]
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
