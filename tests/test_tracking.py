from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import pytest

from wsss import tracking
from wsss.cli import main
from wsss.io import dvc_md5


def _git_commit(root: Path) -> str:
    run = lambda *args: subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout  # noqa: E731
    run("init", "-q")
    run("add", "params.yaml")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return run("rev-parse", "HEAD").strip()


def test_each_data_stage_logs_one_run_with_params_metrics_and_lineage(project, mlflow_store):
    commit = _git_commit(project)
    assert main(["prepare", "--root", str(project)]) == 0
    prepared_hash = dvc_md5(project / "data/prepared")
    assert main(["split", "--root", str(project)]) == 0

    runs = mlflow.search_runs(experiment_names=["wsss"], order_by=["attributes.start_time ASC"])
    assert list(runs["tags.wsss.stage"]) == ["prepare", "split"]
    assert set(runs["status"]) == {"FINISHED"}
    prepare, split = runs.iloc[0], runs.iloc[1]

    assert prepare["params.data.source"] == "embedded"
    assert prepare["params.data.embedded.image_size"] == "32"
    assert prepare["metrics.images_train"] == 80
    assert prepare["tags.wsss.input.source"] == dvc_md5(project / "data/sources/fashion-mnist")
    assert prepare["tags.wsss.git_commit"] == commit and prepare["tags.wsss.git_dirty"] == "false"

    metrics = json.loads((project / "metrics/data.json").read_text())
    assert split["params.data.balance.rule"] == "median"
    assert split["metrics.size_train"] == metrics["sizes"]["train"]
    assert split["metrics.person_label_drop_rate_observed"] == pytest.approx(metrics["person_label_drop_rate_observed"])
    assert split["tags.wsss.input.prepared"] == prepared_hash
    # the prepared manifest is the split's input dataset (the UI's Datasets column), DVC's MD5 as digest
    datasets = [item.dataset for item in mlflow.get_run(split["run_id"]).inputs.dataset_inputs]
    assert [(d.name, d.digest) for d in datasets] == [("prepared", prepared_hash)]
    assert json.loads(datasets[0].source)["uri"] == (project / "data/prepared").resolve().as_uri()
    assert not mlflow.get_run(prepare["run_id"]).inputs.dataset_inputs  # the raw source is not one
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
    # a copy that `dvc exp run --temp` or a queue worker runs in logs to the project's store, not its own
    (tmp_path / ".dvc").mkdir()
    copy = tmp_path / ".dvc/tmp/exps/tmpk2x9/pipelines"
    copy.mkdir(parents=True)
    assert tracking.store_root(copy.parent) == tracking.store_root(copy) == tmp_path.resolve()
    assert tracking.tracking_uri(copy.parent) == uri
    assert tracking.store_root(tmp_path / ".dvc/tmp") == (tmp_path / ".dvc/tmp").resolve()  # not inside an experiment copy
    elsewhere = tmp_path / "other/tmp/exps/x"  # the same names without a DVC folder above: an ordinary project
    elsewhere.mkdir(parents=True)
    assert tracking.store_root(elsewhere) == elsewhere.resolve()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://u@127.0.0.1/mlflow")
    assert tracking.tracking_uri(tmp_path) == "postgresql://u@127.0.0.1/mlflow"


def test_lineage_hashes_are_dvc_hashes_and_come_from_the_lock_while_it_describes_the_files(tmp_path, monkeypatch):
    """wsss.input.* tags hold the MD5 that dvc.lock records (equal to `dvc add`'s for the same folder);
    a folder the lock still describes is not read again, a changed one is hashed anew."""
    import sys

    import yaml

    outputs = tmp_path / "cams"
    (outputs / "val").mkdir(parents=True)
    (outputs / "a.npz").write_bytes(b"first file")
    (outputs / "val" / "b.npz").write_bytes(b"\x00\x01 second, binary")
    dvc = Path(sys.executable).parent / "dvc"
    subprocess.run([str(dvc), "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(dvc), "add", "-q", "cams"], cwd=tmp_path, check=True)
    added = yaml.safe_load((tmp_path / "cams.dvc").read_text())["outs"][0]
    assert dvc_md5(outputs) == added["md5"] and added["md5"].endswith(".dir")

    lock = {"schema": "2.0", "stages": {"cams": {"cmd": "x", "outs": [{"path": "cams", "hash": "md5", "md5": "0123abcd.dir",
                                                                      "size": added["size"], "nfiles": added["nfiles"]}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    monkeypatch.setattr(tracking, "dvc_md5", lambda path: pytest.fail(f"{path} was hashed again"))
    assert tracking.input_hashes({"cams": outputs}) == {"cams": "0123abcd.dir"}  # the lock's, not recomputed

    monkeypatch.undo()
    (outputs / "a.npz").write_bytes(b"first file, changed")  # another size, a later mtime
    assert tracking.input_hashes({"cams": outputs}) == {"cams": dvc_md5(outputs)} != {"cams": "0123abcd.dir"}


def test_the_pipeline_run_id_comes_from_the_environment_or_from_the_dvc_command_above(monkeypatch):
    """The group tag of a stage run: a ``dvc repro`` / ``dvc exp run`` ancestor is recognised in the
    forms DVC is started in; other DVC commands and other programs are not a pipeline run."""
    assert tracking._dvc_command(["/p/.venv/bin/python", "/p/.venv/bin/dvc", "repro", "-f"]) == ("repro",)
    assert tracking._dvc_command(["python", "-m", "dvc", "exp", "run", "--temp", "-S", "seed=1"]) == ("exp", "run")
    assert tracking._dvc_command(["dvc", "status"]) is None
    assert tracking._dvc_command(["python", "-m", "pytest", "-q"]) is None
    monkeypatch.delenv(tracking.PIPELINE_RUN_ENV, raising=False)
    assert tracking.pipeline_run_id() is None  # pytest is not started by DVC
    monkeypatch.setenv(tracking.PIPELINE_RUN_ENV, "sweep-7")
    assert tracking.pipeline_run_id() == "sweep-7"


def test_the_pipeline_run_links_the_stage_runs_of_its_own_repro(mlflow_store, tmp_path, monkeypatch):
    monkeypatch.setenv(tracking.PIPELINE_RUN_ENV, "repro-1")
    ran = {}
    for stage in ("cams", "evaluate"):
        with tracking.stage_run(stage, "wsss", {}, root=tmp_path) as run:
            ran[stage] = run.info.run_id
    monkeypatch.setenv(tracking.PIPELINE_RUN_ENV, "repro-2")
    with tracking.stage_run("cams", "wsss", {}, root=tmp_path) as other:
        pass
    monkeypatch.setenv(tracking.PIPELINE_RUN_ENV, "repro-1")
    with tracking.stage_run("pipeline", "wsss", {}, root=tmp_path) as pipeline:
        linked = tracking.link_pipeline_runs(pipeline.info.run_id)
    assert linked == {"wsss.stage_run.cams": ran["cams"], "wsss.stage_run.evaluate": ran["evaluate"]}
    assert other.info.run_id not in linked.values()
    assert linked.items() <= mlflow.get_run(pipeline.info.run_id).data.tags.items()
    # what the UI's "Group by wsss.pipeline_run" shows: one group per repro
    runs = mlflow.search_runs(experiment_names=["wsss"])
    assert runs.groupby("tags.wsss.pipeline_run").size().to_dict() == {"repro-1": 3, "repro-2": 1}
    monkeypatch.delenv(tracking.PIPELINE_RUN_ENV)
    with tracking.stage_run("pipeline", "wsss", {}, root=tmp_path) as alone:
        assert tracking.link_pipeline_runs(alone.info.run_id) == {}
