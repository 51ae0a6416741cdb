"""Each parallel stage as 1 process and under torchrun with N processes, on the same inputs; print a table.

    python benchmarks/distributed.py [--processes 2] [--epochs 2]

Runs in two scratch copies of this project's pipeline outputs (run ``dvc repro`` first) with
params.yaml, the training stages shortened to ``--epochs``. Every stage reads this project's own
outputs of the stages before it, in both copies, so the table compares like with like: wall time
(interpreter start included) and the stage's headline number.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = [  # (command, outputs the next stages read, metrics file, headline key path)
    ("train-classifier", ["models/classifier"], "classifier", ("val_macro_f1",)),
    ("cams", ["cams"], "cams", ("cam_crf", "miou")),
    ("ir-labels", ["ir_labels"], "ir_labels", ("fg_precision",)),
    ("train-irnet", ["models/irnet"], "irnet", ("final_losses", "total")),
    ("pseudo-masks", ["pseudo_masks"], "pseudo_masks", ("val", "miou")),
    ("train-segmenter", ["models/segmenter"], "segmenter", ("best_val_miou",)),
]


def run(stage: str, root: Path, processes: int, env: dict) -> float:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m"]
                if processes > 1 else [sys.executable, "-m"])
    start = time.perf_counter()
    done = subprocess.run([*launcher, "wsss.cli", stage, "--root", str(root)], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{stage} with {processes} process(es) failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def headline(root: Path, name: str, keys: tuple[str, ...]) -> float:
    value = json.loads((root / f"metrics/{name}.json").read_text())
    for key in keys:
        value = value[key]
    return float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each training stage")
    args = parser.parse_args()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for group in ("classifier", "irnet", "segmenter"):
        params[group]["epochs"] = args.epochs
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{scratch / 'mlflow.db'}"}
        roots = {1: scratch / "one", args.processes: scratch / "many"}
        inputs = ["data/prepared", "data/splits", *(output for _, outputs, _, _ in STAGES for output in outputs)]
        for root in roots.values():
            for folder in inputs:
                shutil.copytree(REPO / folder, root / folder)
            (root / "params.yaml").write_text(yaml.safe_dump(params))
            (root / "dvc.yaml").write_text("stages: {}\n")
        print(f"{os.cpu_count()} cores; training stages shortened to {args.epochs} epochs; "
              f"{args.processes} processes = torchrun --standalone, {'NCCL' if torch.cuda.is_available() else 'gloo'}")
        print(f"| stage | 1 process, s | {args.processes} processes, s | speed-up | metric, 1 process | "
              f"metric, {args.processes} processes |")
        print("|---|---:|---:|---:|---:|---:|")
        for stage, outputs, metrics, keys in STAGES:
            seconds = {n: run(stage, root, n, env) for n, root in roots.items()}
            values = {n: headline(root, metrics, keys) for n, root in roots.items()}
            print(f"| {stage} | {seconds[1]:.1f} | {seconds[args.processes]:.1f} | {seconds[1] / seconds[args.processes]:.2f} | "
                  f"{'.'.join(keys)} {values[1]:.4f} | {values[args.processes]:.4f} |", flush=True)
            for root in roots.values():  # the next stages read this project's outputs, not the shortened ones
                for output in outputs:
                    shutil.rmtree(root / output)
                    shutil.copytree(REPO / output, root / output)


if __name__ == "__main__":
    main()
