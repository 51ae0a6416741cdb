"""The weak segmenter with and without ``segmenter.skip_disagreement``, over a few values and seeds.

Runs the ``train_segmenter`` and ``evaluate`` stages on ``params.yaml`` in a scratch folder (reusing this
checkout's data, step-1 network, CAMs and pseudo masks: run ``dvc repro pseudo_masks`` first), once per
value of ``segmenter.skip_disagreement`` (``none``: off) and seed, and prints one row each as it finishes:
val and test mIoU (flip TTA, and TTA + CRF), the share of the labelled pixels left out in the epochs after
the warm-up, and the share of the upper bound in ``metrics/oracle.json`` (the ``oracle`` stage ignores the
setting; its model is this checkout's, trained with ``params.yaml``'s seed: the share column compares like
with like on that seed only). Choose on val; the test columns are printed beside, not to choose by.
About 2.5 minutes per row on 2 cores.

    python benchmarks/skip_disagreement.py
    python benchmarks/skip_disagreement.py --values none 0.7 0.8 0.9 --seeds 2020 2021 --after 3
"""

from __future__ import annotations

import argparse
import csv

from _scratch import REPO, run_stages
from wsss import distributed
from wsss.config import load_params
from wsss.evaluation import final_mode
from wsss.io import read_json

REUSED = ("data/prepared", "data/splits", "models/classifier", "cams", "pseudo_masks", "metrics/pseudo_masks.json")


def run_weak(params) -> tuple[dict, list[dict], float]:
    """``train_segmenter`` and ``evaluate`` on ``params`` in a scratch project: the evaluation metrics, the
    training curve's rows and the seconds."""
    def read(root):
        with (root / "plots/segmenter/training.csv").open(newline="") as handle:
            return read_json(root / "metrics/evaluate.json"), list(csv.DictReader(handle))

    (metrics, curve), timings = run_stages(params, REUSED, ("train-segmenter", "evaluate"), read)
    return metrics, curve, sum(timings.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", nargs="+", default=["none", "0.7", "0.8", "0.9"], help="skip_disagreement values (none: off)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: params.yaml's seed")
    parser.add_argument("--after", type=int, default=None, help="skip_after_epochs (default: params.yaml's)")
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    distributed.init(params.compute)  # compute.precision and compute.device, as the stages run
    oracle = read_json(REPO / "metrics/oracle.json")
    final = final_mode(params.evaluate.crf)
    after = params.segmenter.skip_after_epochs if args.after is None else args.after
    print(f"skip_after_epochs {after}; share: test {final} against the upper bound of metrics/oracle.json (seed {params.seed})")
    print(f"| skip_disagreement | seed | val TTA | val TTA + CRF | test TTA | test TTA + CRF | skipped after the warm-up | share ({final}) | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for value in args.values:
        skip = None if value == "none" else float(value)
        for seed in args.seeds or [params.seed]:
            config = params.segmenter.model_copy(update={"skip_disagreement": skip, "skip_after_epochs": after})
            metrics, curve, seconds = run_weak(params.model_copy(update={"seed": seed, "segmenter": config}))
            val, test = metrics["val"], metrics["test"]
            skipped = [float(row["skipped"]) for row in curve if int(row["epoch"]) > after]
            share = test[final]["miou"] / oracle["test"][final]["miou"] if oracle.get("available") else float("nan")
            print(f"| {value} | {seed} | {val['tta']['miou']:.4f} | {val.get('tta_crf', val['tta'])['miou']:.4f} | "
                  f"{test['tta']['miou']:.4f} | {test.get('tta_crf', test['tta'])['miou']:.4f} | "
                  f"{(sum(skipped) / len(skipped) if skip is not None and skipped else 0):.3f} | {share:.3f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
