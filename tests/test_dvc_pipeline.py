"""`dvc repro split` on a copy of this project with tiny params: the wiring of dvc.yaml."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import yaml
from conftest import REPO, make_document


def _run(args: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_dvc_repro_split_builds_data_and_reruns_only_what_changed(tmp_path, mlflow_store):
    root = tmp_path / "clone"
    root.mkdir()
    for name in ("dvc.yaml", "pipelines", "src", "data/sources/fashion-mnist"):
        source = REPO / name
        (shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
         if source.is_dir() else shutil.copy(source, root / name))
    (root / "params.yaml").write_text(yaml.safe_dump(make_document({"data.embedded.num_train": 120})))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": mlflow_store, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    _run(["git", "init", "-q"], root, env)
    _run(["dvc", "init", "-q"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "init"], root, env)

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
