"""Step 1 against its targets: classifier macro-F1 and CAM / CAM+CRF mIoU on val, with timings.

Runs the ``train_classifier`` and ``cams`` stages on ``params.yaml`` in a scratch folder (reusing
this checkout's ``data/prepared`` and ``data/splits``; run ``dvc repro split`` first) with a
scratch MLflow store, and prints a table. Targets (issue 3): macro-F1 >= 0.75 (person excluded),
CAM+CRF mIoU at least 5 points above CAM mIoU.

    python benchmarks/step1.py
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from wsss import distributed
from wsss.config import load_params
from wsss.stages import STAGES

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    params = load_params(REPO / "params.yaml")
    distributed.init(params.compute)  # compute.precision and compute.device, as the stages run
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "data").mkdir()
        for name in ("prepared", "splits"):
            os.symlink(REPO / "data" / name, root / "data" / name)
        shutil.copy(REPO / "params.yaml", root / "params.yaml")
        (root / "dvc.yaml").write_text("stages: {}\n")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        timings = {}
        for stage in ("train-classifier", "cams"):
            start = time.perf_counter()
            outcome = STAGES[stage](params, root)
            timings[stage] = time.perf_counter() - start
            if stage == "train-classifier":
                training = outcome
            else:
                cams = outcome
    gain = cams["cam_crf"]["miou"] - cams["cam"]["miou"]
    print(f"{params.classifier.arch}, {params.classifier.epochs} epochs, scales {params.cams.scales}, "
          f"eval threshold {params.cams.eval_threshold}, {os.cpu_count()} cores")
    print("| measure | value | target |")
    print("|---|---:|---|")
    print(f"| classifier val macro-F1 (person excluded), best epoch {training.best_epoch} | {training.best.macro_f1:.3f} | >= 0.75 |")
    print(f"| classifier val micro-F1 | {training.best.micro_f1:.3f} | |")
    print(f"| CAM mIoU, val | {cams['cam']['miou']:.3f} | |")
    print(f"| CAM + CRF mIoU, val | {cams['cam_crf']['miou']:.3f} | >= CAM + 0.05 (gain {gain:+.3f}) |")
    print(f"| CAM + CRF mIoU without the person class | {cams['cam_crf']['miou_without_person']:.3f} | |")
    print(f"| train_classifier seconds | {timings['train-classifier']:.0f} | |")
    print(f"| cams seconds (train + val CAMs, CRF evaluation) | {timings['cams']:.0f} | |")


if __name__ == "__main__":
    main()
