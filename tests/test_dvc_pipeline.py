"""`dvc repro split` on a copy of this project with tiny params: the wiring of dvc.yaml."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import yaml
from conftest import REPO, make_document


def _run(args: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _project(root: Path, mlflow_store: str | None) -> dict:
    """A git + DVC copy of this project with tiny params at ``root``; the environment to run DVC in
    (MLflow store: ``mlflow_store``, or None for the project's own)."""
    root.mkdir()
    for name in ("dvc.yaml", "pipelines", "src", "data/sources/fashion-mnist", ".gitignore"):
        source = REPO / name
        (shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
         if source.is_dir() else shutil.copy(source, root / name))
    (root / "params.yaml").write_text(yaml.safe_dump(make_document({"data.embedded.num_train": 120})))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("WSSS_PROJECT_ROOT", None)
    if mlflow_store is not None:
        env["MLFLOW_TRACKING_URI"] = mlflow_store
    _run(["git", "init", "-q"], root, env)
    _run(["dvc", "init", "-q"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "init"], root, env)
    return env


def test_dvc_repro_split_builds_data_and_reruns_only_what_changed(tmp_path, mlflow_store):
    root = tmp_path / "clone"
    env = _project(root, mlflow_store)

    first = _run(["dvc", "repro", "split"], root, env)
    assert "Running stage 'prepare'" in first and "Running stage 'split'" in first
    metrics = json.loads((root / "metrics/data.json").read_text())
    assert metrics["sizes"]["val"] + metrics["sizes"]["test"] == 24
    assert metrics["max_class_count_after"] <= metrics["balance_cap"]
    assert (root / "data/splits/train.json").is_file()
    assert "class,before_balancing,after_balancing" in (root / "plots/data/class_histogram.csv").read_text()

    assert "Running stage" not in _run(["dvc", "repro", "split"], root, env)

    document = yaml.safe_load((root / "params.yaml").read_text())
    document["data"]["balance"]["factor"] = 1.0
    (root / "params.yaml").write_text(yaml.safe_dump(document))
    third = _run(["dvc", "repro", "split"], root, env)
    assert "Running stage 'split'" in third and "Running stage 'prepare'" not in third
    tighter = json.loads((root / "metrics/data.json").read_text())
    assert tighter["balance_cap"] < metrics["balance_cap"]

    shown = _run(["dvc", "metrics", "show", "--json"], root, env)
    assert "person_label_drop_rate_observed" in shown

    # MLflow: the runs of one `dvc repro` form one group (a shared tag), each repro its own; the
    # experiment is marked as one of model training (the MLflow 3 UI opens it on its runs)
    runs = mlflow.search_runs(experiment_names=["wsss"], order_by=["attributes.start_time ASC"])
    assert list(runs["tags.wsss.stage"]) == ["prepare", "split", "split"]
    groups = list(runs["tags.wsss.pipeline_run"])
    assert groups[0] == groups[1] and groups[2] != groups[0] and all(groups)
    assert mlflow.get_experiment_by_name("wsss").tags["mlflow.experimentKind"] == "custom_model_development"


def test_dvc_exp_run_temp_and_queue_log_into_the_projects_mlflow_store(tmp_path, _migrated_store):
    root = tmp_path / "clone"
    env = _project(root, None)
    (root / "mlruns").mkdir()
    shutil.copy(_migrated_store, root / "mlruns/mlflow.db")  # the project's own store, its schema already made
    _run(["dvc", "exp", "run", "--temp", "-n", "temp-exp", "-S", "data.balance.factor=1.0", "split"], root, env)
    _run(["dvc", "exp", "run", "--queue", "-n", "queued-exp", "-S", "data.balance.factor=2.0", "split"], root, env)
    _run(["dvc", "queue", "start"], root, env)
    deadline = time.monotonic() + 240
    while "Queued" in (status := _run(["dvc", "queue", "status"], root, env)) or "Running" in status:
        assert time.monotonic() < deadline, status
        time.sleep(2)
    _run(["dvc", "queue", "stop", "--kill"], root, env)
    assert "Success" in status and "Failed" not in status, status

    # both experiments ran in copies under .dvc/tmp/exps, now gone; their runs are in the project's store
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlruns/mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["wsss"], order_by=["attributes.start_time ASC"])
    assert list(runs["tags.wsss.stage"]) == ["prepare", "split", "split"]  # the queued one restored prepare from the run cache
    assert list(runs["params.data.balance.factor"].iloc[1:]) == ["1.0", "2.0"]
    assert len(set(runs["tags.wsss.pipeline_run"])) == 2  # one group per experiment
    assert not list((root / ".dvc/tmp/exps").glob("*/mlruns/mlflow.db"))
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], root, env))
    names = {exp.get("name") for entry in shown for exp in entry.get("experiments") or [] for exp in exp.get("revs", [])}
    assert {"temp-exp", "queued-exp"} <= names
