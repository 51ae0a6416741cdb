"""The paper profile through DVC on a tiny VOC- or LID-layout tree, stage by stage: seconds per stage and
what the run reports.

Builds the project exactly as ``tests/test_paper_repro_{voc,lid}.py`` do (``tests/paper_project.py``:
a copy of this working tree, ``cp profiles/paper.yaml params.yaml``, sizes, epochs, batch sizes and
counts shrunk, random-init local ImageNet stand-ins, ``irnet.confidence_cutoff: 0``), then runs
``dvc repro -s <stage>`` for each main stage in order and prints a table of wall seconds, then the
run's ``reports/summary.md``. ``--device cuda`` runs the same on a GPU; ``--image-size`` scales the
classifier, IRNet crop and segmenter sizes together (32 by default, the tests' size).

    python benchmarks/paper_profile.py --source voc [--train 16 --val 8] [--image-size 32] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from paper_project import MAIN_STAGES, paper_project, run, write_lid_tree, write_voc_tree, write_weights  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=("voc", "lid"), default="voc")
    parser.add_argument("--train", type=int, default=16, help="training images in the tree")
    parser.add_argument("--val", type=int, default=8, help="val images (split into val and test)")
    parser.add_argument("--image-size", type=int, default=32, help="classifier image, IRNet crop and segmenter image side")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    parser.add_argument("--keep", action="store_true", help="keep the project and print its path")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="wsss-paper-"))
    weights = write_weights(scratch / "weights")
    overrides = {"compute.device": args.device, "classifier.image_size": args.image_size, "irnet.crop_size": args.image_size,
                 "segmenter.image_size": args.image_size}
    store = f"sqlite:///{scratch / 'mlruns' / 'mlflow.db'}"
    (scratch / "mlruns").mkdir()
    root, env = paper_project(scratch / "project", args.source, weights, store, overrides)
    tree = root / "data" / args.source
    shutil.rmtree(tree)
    (write_voc_tree if args.source == "voc" else write_lid_tree)(tree, train=args.train, val=args.val)

    rows = []
    for stage in MAIN_STAGES:
        start = time.perf_counter()
        run(["dvc", "repro", "--single-item", stage], root, env)
        rows.append((stage, time.perf_counter() - start))
    print(f"\npaper profile, {args.source} tree: {args.train} train + {args.val} held-out images, side {args.image_size}, "
          f"device {args.device}\n")
    print("| stage | seconds |\n|---|---:|")
    for stage, seconds in rows:
        print(f"| {stage} | {seconds:.1f} |")
    print(f"| total | {sum(s for _, s in rows):.1f} |\n")
    print((root / "reports/summary.md").read_text())
    if args.keep:
        print(f"kept: {root}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
