"""The whole default pipeline from a fresh clone: ``dvc repro`` wall time and each stage's time.

Clones this repository (its committed ``HEAD``) into a scratch folder and runs ``dvc repro``
there with this checkout's virtual environment (set-up excluded, as the target says; the clone's
``src`` comes first on ``PYTHONPATH``), then reads each stage's duration from the clone's MLflow
store and compares the clone's ``dvc.lock`` outputs with this checkout's (same seed, same
machine kind: same bytes). Target (issue 5): <= 15 minutes on 2 CPU cores.

    python benchmarks/pipeline.py [--keep]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def output_hashes(lock: Path) -> dict[str, str]:
    stages = yaml.safe_load(lock.read_text())["stages"]
    return {out["path"]: out["md5"] for stage in stages.values() for out in stage.get("outs", [])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the scratch clone and print its path")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="wsss-pipeline-"))
    clone = scratch / "wsss"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(clone / "src"), "MLFLOW_TRACKING_URI": f"sqlite:///{clone / 'mlruns' / 'mlflow.db'}"}
    env.pop("CI", None)
    start = time.perf_counter()
    subprocess.run(["dvc", "repro"], cwd=clone, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start

    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["wsss"], order_by=["attributes.start_time ASC"])
    print(f"`dvc repro` on a fresh clone of {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True, text=True).stdout.strip()}, "
          f"{os.cpu_count()} cores")
    print("| stage | seconds |")
    print("|---|---:|")
    for _, run in runs.iterrows():
        print(f"| {run['tags.wsss.stage']} | {(run['end_time'] - run['start_time']).total_seconds():.0f} |")
    print(f"| **whole `dvc repro`** (wall, stage start-up included) | **{wall:.0f}** ({wall / 60:.1f} min; target <= 15 min) |")
    mine, theirs = output_hashes(REPO / "dvc.lock"), output_hashes(clone / "dvc.lock")
    differing = sorted(path for path in theirs if mine.get(path) != theirs[path])
    print(f"outputs identical to this checkout's dvc.lock: {len(theirs) - len(differing)} of {len(theirs)}"
          + (f"; differing: {', '.join(differing)}" if differing else ""))
    if args.keep:
        print(f"clone kept at {clone}")
    else:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
