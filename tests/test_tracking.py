from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import pytest

from wsss import tracking
from wsss.cli import main
from wsss.io import content_hash


def _git_commit(root: Path) -> str:
    run = lambda *args: subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout  # noqa: E731
    run("init", "-q")
    run("add", "params.yaml")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return run("rev-parse", "HEAD").strip()


def test_each_data_stage_logs_one_run_with_params_metrics_and_lineage(project, mlflow_store):
    commit = _git_commit(project)
    assert main(["prepare", "--root", str(project)]) == 0
    prepared_hash = content_hash(project / "data/prepared")
    assert main(["split", "--root", str(project)]) == 0

    runs = mlflow.search_runs(experiment_names=["wsss"], order_by=["attributes.start_time ASC"])
    assert list(runs["tags.wsss.stage"]) == ["prepare", "split"]
    assert set(runs["status"]) == {"FINISHED"}
    prepare, split = runs.iloc[0], runs.iloc[1]

    assert prepare["params.data.source"] == "embedded"
    assert prepare["params.data.embedded.image_size"] == "32"
    assert prepare["metrics.images_train"] == 80
    assert prepare["tags.wsss.input.source"] == content_hash(project / "data/sources/fashion-mnist")
    assert prepare["tags.wsss.git_commit"] == commit and prepare["tags.wsss.git_dirty"] == "false"

    metrics = json.loads((project / "metrics/data.json").read_text())
    assert split["params.data.balance.rule"] == "median"
    assert split["metrics.size_train"] == metrics["sizes"]["train"]
    assert split["metrics.person_label_drop_rate_observed"] == pytest.approx(metrics["person_label_drop_rate_observed"])
    assert split["tags.wsss.input.prepared"] == prepared_hash
    client = mlflow.MlflowClient()
    assert {"train_samples.png", "manifest.json"} <= {item.path for item in client.list_artifacts(prepare["run_id"])}
    assert {"class_histogram.png", "data.json"} <= {item.path for item in client.list_artifacts(split["run_id"])}
    store_folder = Path(mlflow_store.removeprefix("sqlite:///")).parent
    assert (store_folder / "artifacts/wsss").is_dir()  # artifacts sit beside the SQLite store


def test_failed_stage_run_is_marked_failed(project, mlflow_store):
    (project / "data/sources/fashion-mnist/fashion_mnist_subset.npz").write_bytes(b"garbage")
    assert main(["prepare", "--root", str(project)]) == 2
    runs = mlflow.search_runs(experiment_names=["wsss"])
    assert list(runs["status"]) == ["FAILED"]
    assert not (project / "data/prepared").exists()


def test_default_store_is_sqlite_under_the_project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.ROOT_ENV, raising=False)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    nested = tmp_path / "pipelines/ablation"
    nested.mkdir(parents=True)
    assert tracking.project_root(nested) == tmp_path.resolve()
    uri = tracking.tracking_uri(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert tracking.artifact_location(uri, "wsss") == (tmp_path / "mlruns/artifacts/wsss").resolve().as_uri()
    assert tracking.artifact_location("http://127.0.0.1:5000", "wsss") is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://u@127.0.0.1/mlflow")
    assert tracking.tracking_uri(tmp_path) == "postgresql://u@127.0.0.1/mlflow"
