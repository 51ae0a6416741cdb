"""The sweep against its targets: 20 trials of the cheap objective in <= 20 minutes on 2 cores,
the median trial <= 10 % of a full ``dvc repro``.

Runs ``wsss sweep`` on ``params.yaml`` in a scratch folder that reuses this checkout's data,
classifier and CAMs (run ``dvc repro cams`` first), with a scratch MLflow store and an empty
trial cache, and prints a table: wall time, IRNets trained, trial durations, best values.

    python benchmarks/sweep.py [--trials N] [--repro-seconds S]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import mlflow
import optuna

from _scratch import REPO, scratch_project
from wsss.config import load_params
from wsss.stages.sweep import open_storage, run_sweep, storage_url, study_name

REUSED = ("data/prepared", "data/splits", "cams", "models/classifier")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=None, help="override sweep.trials")
    parser.add_argument("--repro-seconds", type=float, default=None,
                        help="a measured full `dvc repro` time (benchmarks/pipeline.py) for the 10 %% target")
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    if args.trials is not None:
        params = params.model_copy(update={"sweep": params.sweep.model_copy(update={"trials": args.trials})})
    with scratch_project(REUSED) as root:
        start = time.perf_counter()
        best = run_sweep(params, root)
        wall = time.perf_counter() - start
        study = optuna.load_study(study_name=study_name(params, root), storage=open_storage(storage_url(params.sweep.storage, root)))
        trained = len(list((root / "sweeps/cache/irnet").glob("*/model.pt")))
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        runs = mlflow.search_runs(experiment_names=[params.sweep.experiment], output_format="list")
        durations = sorted(r.data.metrics["duration_s"] for r in runs if "duration_s" in r.data.metrics)
    states = [t.state.name for t in study.trials]
    median = statistics.median(durations)
    print(f"sweep: objective {params.sweep.objective}, {params.sweep.trials} trials, space {sorted(params.sweep.space)}, "
          f"{os.cpu_count()} cores")
    print("| measure | value | target |")
    print("|---|---:|---|")
    print(f"| wall time, seconds | {wall:.0f} ({wall / 60:.1f} min) | <= 20 min for 20 trials |")
    print(f"| trials complete / pruned / failed | {states.count('COMPLETE')} / {states.count('PRUNED')} / {states.count('FAIL')} | |")
    print(f"| IRNets trained (distinct kept-image sets) | {trained} | |")
    print(f"| trial seconds: median / min / max | {median:.1f} / {durations[0]:.1f} / {durations[-1]:.1f} | |")
    if args.repro_seconds:
        share = median / args.repro_seconds
        print(f"| median trial / full `dvc repro` ({args.repro_seconds:.0f} s) | {share:.1%} | <= 10 % |")
    print(f"| best values, val mIoU | {best['values']}, {best['objective']:.4f} | |")


if __name__ == "__main__":
    main()
