"""The ablation grid (the paper's Table 3): wall time of `dvc repro pipelines/ablation/dvc.yaml`
and each grid stage's time, read from the MLflow store. Target (issue 6): <= 40 minutes on 2 CPU
cores for the embedded default.

Run it after the main pipeline (`dvc repro`), so that only the grid's stages are timed:

    python benchmarks/ablation.py                 # runs the grid in this checkout, then prints the table
    python benchmarks/ablation.py --since 1764081690   # only prints the table of runs started after that time
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GRID_STAGES = ("person_classifier", "ablation_masks", "person_masks", "ablation_cell", "ablation_report")



def _present(run, column: str) -> bool:
    """``column`` is in this search's results (no run of the window logged it: absent) and set for ``run`` (not NaN)."""
    value = run.get(column)
    return value is not None and value == value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--since", type=float, help="no run: tabulate the grid runs started after this UNIX time")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from wsss import tracking
    from wsss.config import load_params

    wall = None
    since = args.since
    if since is None:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        since = time.time()
        subprocess.run(["dvc", "repro", "pipelines/ablation/dvc.yaml"], cwd=REPO, env=env, check=True)
        wall = time.time() - since

    import mlflow

    params = load_params(REPO / "params.yaml")
    mlflow.set_tracking_uri(tracking.tracking_uri(REPO))
    runs = mlflow.search_runs(experiment_names=[params.tracking.experiment], order_by=["attributes.start_time ASC"],
                              filter_string=f"attributes.start_time >= {int(since * 1000)}")
    runs = runs[runs["tags.wsss.stage"].isin(GRID_STAGES)]
    print(f"`dvc repro pipelines/ablation/dvc.yaml`, {os.cpu_count()} cores, encoders {params.ablation.encoders}, "
          f"thresholds {params.ablation.thresholds}, person {params.ablation.person}")
    print("| stage | cell | seconds | val mIoU plain / TTA |")
    print("|---|---|---:|---|")
    total = 0.0
    for _, run in runs.iterrows():
        seconds = (run["end_time"] - run["start_time"]).total_seconds()
        total += seconds
        cell = ""
        if run["tags.wsss.stage"] == "ablation_cell":
            cell = f"{run['params.ablation.encoder']}, thr {run['params.ablation.threshold']}, person {run['params.ablation.person']}"
        elif run["tags.wsss.stage"] == "ablation_masks":
            cell = f"thr {run['params.ablation.threshold']}"
        scores = ""
        if _present(run, "metrics.val_plain_miou"):
            scores = f"{run['metrics.val_plain_miou']:.3f} / {run['metrics.val_tta_miou']:.3f}"
        elif _present(run, "metrics.pseudo_mask_miou"):
            scores = f"pseudo masks {run['metrics.pseudo_mask_miou']:.3f}"
        print(f"| {run['tags.wsss.stage']} | {cell} | {seconds:.0f} | {scores} |")
    print(f"| **sum of the grid's stages** | | **{total:.0f}** ({total / 60:.1f} min) | |")
    if wall is not None:
        print(f"| **wall, `dvc repro` included** | | **{wall:.0f}** ({wall / 60:.1f} min; target <= 40 min) | |")


if __name__ == "__main__":
    main()
