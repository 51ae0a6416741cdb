"""Faults and shared services: a training stage killed with SIGKILL, a stage killed while writing its
outputs, a DVC remote, and MLflow + Optuna on a real PostgreSQL server (issue 8)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from conftest import REPO, make_document
from dvc_project import dvc_project, run_ok, subprocess_env
from optuna.trial import TrialState
from postgres import postgres_database, postgres_server  # noqa: F401  (fixtures)
from test_step1 import STEP1, STEP2
from test_sweep import SWEEP, cams_template, sweep_project  # noqa: F401  (fixtures)

from wsss.cli import main
from wsss.config import load_params
from wsss.stages.sweep import open_storage, study_name

CLASSIFIER = {**STEP1, "classifier.epochs": 4, "classifier.threads": 1}


def _kill_when(process: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    """SIGKILL ``process`` and every process it started (its session: the process was started
    with ``start_new_session=True``) as soon as ``ready()`` holds (polled every 10 ms)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"finished before the kill: {process.communicate()}"
        assert time.monotonic() < deadline, "the kill point was never reached"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture
def split_copies(project: Path, mlflow_store, tmp_path: Path) -> tuple[Path, Path]:
    """Two identical tiny projects after ``prepare`` and ``split``."""
    (project / "params.yaml").write_text(yaml.safe_dump(make_document(CLASSIFIER)))
    for stage in ("prepare", "split"):
        assert main([stage, "--root", str(project)]) == 0
    other = tmp_path / "other"
    shutil.copytree(project, other)
    return project, other


def test_a_training_stage_killed_mid_epoch_continues_and_ends_as_an_uninterrupted_run(split_copies, mlflow_store):
    killed, uninterrupted = split_copies
    env = subprocess_env(mlflow_store)
    command = [sys.executable, "-m", "wsss.cli", "train-classifier", "--root"]
    last = killed / "checkpoints/classifier/last.pt"
    process = subprocess.Popen([*command, str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    _kill_when(process, last.is_file)  # epoch 1 is on disk: the kill lands in epoch 2
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "metrics/classifier.json").exists() and not (killed / "models/classifier/model.pt").exists()

    run_ok([*command, str(killed)], REPO, env)
    run_ok([*command, str(uninterrupted)], REPO, env)
    resumed = json.loads((killed / "metrics/classifier.json").read_text())
    assert resumed == json.loads((uninterrupted / "metrics/classifier.json").read_text())
    assert resumed["epochs"] == 4
    runs = mlflow.search_runs(experiment_names=["wsss"], filter_string="tags.`wsss.stage` = 'train_classifier'")
    # two runs: the killed one, continued (not restarted) from epoch 2 (later on a starved machine), and the other
    resumed_from, uninterrupted_from = sorted(runs["tags.wsss.resumed_from_epoch"])
    assert uninterrupted_from == "None" and 2 <= int(resumed_from) <= 4
    assert (killed / "models/classifier/model.pt").read_bytes() == (uninterrupted / "models/classifier/model.pt").read_bytes()


def _kill_resume_and_compare(killed: Path, uninterrupted: Path, stage: str, output: str, metrics: str, shards_in: str) -> None:
    """SIGKILL ``wsss <stage>`` in ``killed`` once two shards are complete: they stay in the staging
    folder ``.<output>.partial``, nothing appears where DVC looks; the re-run keeps those shards (same
    files, not rewritten), computes the rest and ends with the bytes and metrics of an uninterrupted run."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "wsss.cli", stage, "--root"]
    partial = killed / f".{output}.partial" / shards_in
    process = subprocess.Popen([*command, str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    _kill_when(process, lambda: len(list(partial.glob("shard-*.npz"))) >= 2)
    assert process.returncode == -signal.SIGKILL
    assert not (killed / output).exists() and not (killed / metrics).exists()
    kept = {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in partial.glob("shard-*.npz")}

    run_ok([*command, str(killed)], REPO, env)
    run_ok([*command, str(uninterrupted)], REPO, env)
    assert not (killed / f".{output}.partial").exists()
    for name, identity in kept.items():  # resumed: the shards of the killed run were not computed again
        stat = (killed / output / shards_in / name).stat()
        assert (stat.st_ino, stat.st_mtime_ns) == identity
    files = sorted(p.relative_to(uninterrupted / output) for p in (uninterrupted / output).rglob("*") if p.is_file())
    assert len(files) > len(kept) + 2
    assert files == sorted(p.relative_to(killed / output) for p in (killed / output).rglob("*") if p.is_file())
    for name in files:
        assert (killed / output / name).read_bytes() == (uninterrupted / output / name).read_bytes(), name
    assert json.loads((killed / metrics).read_text()) == json.loads((uninterrupted / metrics).read_text())


def test_the_cams_stage_killed_mid_split_resumes_from_its_complete_shards(split_copies, mlflow_store):
    killed, uninterrupted = split_copies
    # fp32: with a classifier trained under bf16 autocast, a resumed run, whose batches of 32 images are
    # cut elsewhere, gave one image's stored score 1 ulp (6e-8) off in 3 of 4 runs, its maps equal (open)
    for root in (killed, uninterrupted):
        document = make_document({**CLASSIFIER, "classifier.epochs": 1, "compute.shard_size": 4, "cams.scales": [1.0, 2.0],
                                  "compute.precision": "fp32"})
        (root / "params.yaml").write_text(yaml.safe_dump(document))
    assert main(["train-classifier", "--root", str(killed)]) == 0
    shutil.copytree(killed / "models", uninterrupted / "models")
    _kill_resume_and_compare(killed, uninterrupted, "cams", "cams", "metrics/cams.json", "train")


def test_ir_labels_and_pseudo_masks_killed_mid_stage_resume_from_their_complete_shards(split_copies, mlflow_store):
    killed, uninterrupted = split_copies
    for root in (killed, uninterrupted):
        document = make_document({**STEP2, "classifier.epochs": 1, "cams.scales": [1.0], "compute.shard_size": 4,
                                  "compute.chunk_size": 2})
        (root / "params.yaml").write_text(yaml.safe_dump(document))
    for stage in ("train-classifier", "cams"):
        assert main([stage, "--root", str(killed)]) == 0
    for output in ("models", "cams", "metrics"):
        shutil.copytree(killed / output, uninterrupted / output, dirs_exist_ok=True)
    _kill_resume_and_compare(killed, uninterrupted, "ir-labels", "ir_labels", "metrics/ir_labels.json", ".")
    assert main(["train-irnet", "--root", str(killed)]) == 0
    shutil.copytree(killed / "models", uninterrupted / "models", dirs_exist_ok=True)
    _kill_resume_and_compare(killed, uninterrupted, "pseudo-masks", "pseudo_masks", "metrics/pseudo_masks.json", "train")


def test_a_stage_killed_while_writing_leaves_nothing_complete_and_a_rerun_writes_everything(tmp_path, mlflow_store):
    root, env = dvc_project(tmp_path, mlflow_store, {"data.embedded.num_train": 400})
    images = root / "data/prepared/images"

    def writing() -> bool:  # the staging folder of data/prepared holds some images, not all
        staging = list((root / "data").glob(".prepared.tmp-*/images/*.png")) if (root / "data").is_dir() else []
        return len(staging) > 20

    process = subprocess.Popen(["dvc", "repro", "prepare"], cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    _kill_when(process, writing)  # dvc and the stage's python, as a machine or a terminal kill would
    assert not images.exists()  # nothing half written where DVC looks
    assert not (root / "dvc.lock").exists() or "prepare" not in (root / "dvc.lock").read_text()
    status = run_ok(["dvc", "status", "prepare"], root, env)
    assert "prepare" in status and "up to date" not in status

    rerun = run_ok(["dvc", "repro", "prepare"], root, env)
    assert "Running stage 'prepare'" in rerun
    manifest = json.loads((root / "data/prepared/manifest.json").read_text())
    assert len(list(images.glob("*.png"))) == len(manifest["images"]) and len(manifest["images"]) > 400
    assert "up to date" in run_ok(["dvc", "status", "prepare"], root, env)


def test_outputs_go_to_a_dvc_remote_and_come_back_in_a_clone(tmp_path, mlflow_store):
    root, env = dvc_project(tmp_path, mlflow_store, {})
    run_ok(["dvc", "repro", "split"], root, env)
    remote = tmp_path / "remote"
    run_ok(["dvc", "remote", "add", "-d", "storage", str(remote)], root, env)
    pushed = run_ok(["dvc", "push"], root, env)
    assert "pushed" in pushed and any(remote.rglob("*"))
    run_ok(["git", "add", "-A"], root, env)
    run_ok(["git", "commit", "-qm", "outputs"], root, env)

    clone = tmp_path / "second"
    run_ok(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
    assert not (clone / "data/splits").exists()
    run_ok(["dvc", "pull", "--with-deps", "split"], clone, env)  # the stages that have run; the others have no outputs yet
    for relative in ("data/splits/train.json", "data/prepared/manifest.json"):
        assert (clone / relative).read_bytes() == (root / relative).read_bytes()
    assert "up to date" in run_ok(["dvc", "status", "split"], clone, env)  # the pulled outputs match the lock


def test_a_stage_logs_its_run_to_mlflow_on_postgresql(project, postgres_database, monkeypatch, tmp_path):  # noqa: F811
    monkeypatch.setenv("MLFLOW_TRACKING_URI", postgres_database)
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) of a database store
    mlflow.set_tracking_uri(postgres_database)
    assert main(["prepare", "--root", str(project)]) == 0
    runs = mlflow.search_runs(experiment_names=["wsss"])
    assert list(runs["tags.wsss.stage"]) == ["prepare"] and runs["status"].item() == "FINISHED"
    assert runs["params.data.source"].item() == "embedded"


def test_two_sweep_workers_share_one_study_on_postgresql(sweep_project, postgres_database):  # noqa: F811
    root = sweep_project
    document = make_document({**SWEEP, "sweep.storage": postgres_database, "sweep.trials": 4})
    (root / "params.yaml").write_text(yaml.safe_dump(document))
    assert main(["sweep", "--root", str(root), "--workers", "2"]) == 0
    params = load_params(root / "params.yaml")
    study = optuna.load_study(study_name=study_name(params, root), storage=open_storage(postgres_database))
    assert len(study.trials) == 4 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    assert not (root / "sweeps/optuna.db").exists()
