"""`wsss sweep` on tiny data: trials, caching, resume after a kill, two workers, best values, bad ranges."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import torch
import yaml
from conftest import make_document, make_params
from optuna.trial import TrialState
from test_step1 import STEP2, write_made_up_person_cams

from wsss import distributed, preflight
from wsss.cli import main
from wsss.config import load_params, with_values
from wsss.data.manifest import load_manifest
from wsss.errors import ConfigError
from wsss.io import read_mask
from wsss.shards import MaskStore
from wsss.stages.sweep import TrialEvaluator, open_storage, run_sweep, storage_url, study_name

SWEEP = {**STEP2, "irnet.train_scales": [1.0], "irnet.background": "plane", "irnet.post_crf": False, "irnet.ignore_uncertain": False,
         "irnet.confidence_cutoff": 0.05, "irnet.threshold": 0.5,
         "sweep.space": {"irnet.confidence_cutoff": {"low": 0.05, "high": 0.25, "step": 0.1},
                         "irnet.threshold": {"low": 0.05, "high": 0.95}},
         "sweep.trials": 4, "sweep.pruning": False}


@pytest.fixture(scope="module")
def cams_template(tmp_path_factory, _migrated_store) -> Path:
    """A tiny project with a classifier and CAMs (built once for the module)."""
    from conftest import FASHION_SUBSET

    root = tmp_path_factory.mktemp("sweep") / "project"
    (root / "data/sources/fashion-mnist").mkdir(parents=True)
    shutil.copy(FASHION_SUBSET, root / "data/sources/fashion-mnist")
    (root / "params.yaml").write_text(yaml.safe_dump(make_document(SWEEP)))
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "mlruns").mkdir()
    shutil.copy(_migrated_store, root / "mlruns/mlflow.db")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlruns/mlflow.db'}")
    try:
        for stage in ("prepare", "split", "train-classifier", "cams"):
            assert main([stage, "--root", str(root)]) == 0, stage
    finally:
        mp.undo()
    return root


@pytest.fixture
def sweep_project(cams_template: Path, tmp_path: Path, mlflow_store) -> Path:
    root = tmp_path / "project"
    shutil.copytree(cams_template, root, ignore=shutil.ignore_patterns("mlruns"))
    return root


def _study(root: Path):
    params = load_params(root / "params.yaml")
    return optuna.load_study(study_name=study_name(params, root), storage=open_storage(storage_url(params.sweep.storage, root)))


def _child_runs() -> list:
    runs = mlflow.search_runs(experiment_names=["wsss-sweep"], output_format="list")
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def test_sweep_runs_the_trials_logs_them_and_writes_the_best_values(sweep_project, capsys):
    root = sweep_project
    assert main(["sweep", "--root", str(root)]) == 0
    study = _study(root)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4 and len(study.trials) == 4
    best = json.loads((root / "sweeps/best.json").read_text())
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    top = max(complete, key=lambda t: t.value)
    assert best["objective"] == pytest.approx(top.value) and best["values"] == top.params
    assert set(best["values"]) == {"irnet.confidence_cutoff", "irnet.threshold"}
    # the first trial is params.yaml as it is: the baseline
    assert study.trials[0].params == {"irnet.confidence_cutoff": 0.05, "irnet.threshold": 0.5}
    assert study.trials[0].user_attrs["baseline"] is True
    assert best["apply"].startswith("dvc exp run -S irnet.confidence_cutoff=")
    assert (root / "sweeps/optimization_history.png").stat().st_size > 0 and (root / "sweeps/contour.png").stat().st_size > 0
    # the dvc plot of the history: every trial, its objective (empty when pruned) and the running best
    with (root / "sweeps/history.csv").open(newline="") as handle:
        history = list(csv.DictReader(handle))
    assert [int(r["trial"]) for r in history] == [t.number for t in study.trials]
    for row, trial in zip(history, study.trials, strict=True):
        assert row["state"] == trial.state.name
        assert (row["objective"] == "") == (trial.state != TrialState.COMPLETE)
        done = [t.value for t in study.trials[: trial.number + 1] if t.state == TrialState.COMPLETE]
        assert row["best_so_far"] == ("" if not done else f"{max(done):.6f}")
        assert float(row["irnet.threshold"]) == pytest.approx(trial.params["irnet.threshold"], rel=1e-5)
    children = _child_runs()
    assert sorted(int(r.data.tags["wsss.trial"]) for r in children) == [t.number for t in study.trials]
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent_id}
    parent = mlflow.get_run(parent_id)
    assert parent.data.metrics["best_objective"] == pytest.approx(top.value)
    assert "to use them: dvc exp run" in capsys.readouterr().out


def test_a_threshold_only_change_reuses_irnet_and_the_walk(sweep_project, monkeypatch):
    import wsss.stages.sweep as sweep_module

    root = sweep_project
    params = load_params(root / "params.yaml")
    evaluator = TrialEvaluator(params, root)
    walks = []
    original_walk = sweep_module.walk_chunk
    monkeypatch.setattr(sweep_module, "walk_chunk", lambda *a, **k: walks.append(1) or original_walk(*a, **k))
    low = evaluator.pseudo_mask_miou(with_values(params, {"irnet.confidence_cutoff": 0.05, "irnet.threshold": 0.05}))
    walks_first = len(walks)
    high = evaluator.pseudo_mask_miou(with_values(params, {"irnet.confidence_cutoff": 0.05, "irnet.threshold": 0.95}))
    assert evaluator.irnet_trainings == 1 and len(walks) == walks_first  # neither IRNet nor the walk ran again
    assert low != high  # the threshold did change the masks
    # a new evaluator (another process) finds the IRNet in the cache
    again = TrialEvaluator(params, root)
    assert again.pseudo_mask_miou(with_values(params, {"irnet.confidence_cutoff": 0.05, "irnet.threshold": 0.05})) == pytest.approx(low)
    assert again.irnet_trainings == 0
    # another kept-image set trains another IRNet
    confidences = sorted(entry["confidence"] for entry in json.loads((root / "cams/index.json").read_text())["images"]["train"])
    fewer = confidences[len(confidences) // 2]  # keeps the upper half
    evaluator.pseudo_mask_miou(with_values(params, {"irnet.confidence_cutoff": fewer, "irnet.threshold": 0.05}))
    assert evaluator.irnet_trainings == 2


def test_the_objective_scores_the_masks_the_pseudo_masks_stage_makes_with_the_person_merge(sweep_project):
    """With the person merged in and flooring the walk (the CPU default), a trial's value is the val mIoU
    of the masks that the pseudo_masks stage makes with the same IRNet, and the final objective trains on
    the training masks that stage stores: the sweep tunes the pipeline as it runs."""
    root = sweep_project
    merged = {**SWEEP, "irnet.background": "walk", "irnet.bg_weight": 1.2, "irnet.post_crf": True, "irnet.ignore_uncertain": True,
              "person.merge": True, "person.background_seed": 0.5, "person.cam_threshold": 0.3,
              "sweep.space": {"irnet.bg_weight": {"low": 0.8, "high": 1.6}}, "segmenter.epochs": 1, "segmenter.batch_size": 8,
              "segmenter.image_size": 32, "segmenter.decoder_channels": 16}
    (root / "params.yaml").write_text(yaml.safe_dump(make_document(merged)))
    write_made_up_person_cams(root)
    params = load_params(root / "params.yaml")
    evaluator = TrialEvaluator(params, root)
    value = evaluator.pseudo_mask_miou(params)
    key, _ = evaluator.irnet(params)
    (root / "models/irnet").mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "sweeps/cache/irnet" / key / "model.pt", root / "models/irnet/model.pt")
    assert main(["pseudo-masks", "--root", str(root)]) == 0
    stage = json.loads((root / "metrics/pseudo_masks.json").read_text())
    assert stage["person_merge"] and value == pytest.approx(stage["val"]["miou"], abs=1e-12)
    # the final objective trains on the training masks the stage stores (person merged, uncertain pixels 255)
    evaluator.final_miou(params, root / "sweeps/trial")
    stored = MaskStore(root / "pseudo_masks/train")
    ids = list(stored.reader.index)
    assert ids and all(np.array_equal(read_mask(root / "sweeps/trial/pseudo_masks" / f"{i}.png"), stored.load(i)) for i in ids)
    assert any((stored.load(i) == 255).any() for i in ids)
    # the merge and the floor count: another person setting is another study with another value
    for change in ({"merge": False}, {"background_seed": 0.0}):
        other = params.model_copy(update={"person": params.person.model_copy(update=change)})
        assert study_name(other, root) != study_name(params, root)
        assert TrialEvaluator(other, root).pseudo_mask_miou(other) != pytest.approx(value, abs=1e-6), change
    # a study never mixes trials trained in two precisions
    fp32, bf16 = (params.model_copy(update={"compute": params.compute.model_copy(update={"precision": precision})})
                  for precision in ("fp32", "bf16"))
    assert study_name(fp32, root) != study_name(bf16, root)
    # auto is named as the precision it resolves to on this machine
    auto = params.model_copy(update={"compute": params.compute.model_copy(update={"precision": "auto"})})
    for native, same in ((True, bf16), (False, fp32)):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(distributed, "cpu_has_native_bf16", lambda native=native: native)
            patch.setattr(torch.cuda, "is_available", lambda: False)
            assert study_name(auto, root) == study_name(same, root)


def test_resume_reruns_a_trial_killed_mid_way_once_and_completes_the_study(sweep_project):
    root = sweep_project
    params = load_params(root / "params.yaml")
    assert main(["sweep", "--root", str(root)]) == 0  # a first, complete study of 4 trials
    (root / "params.yaml").write_text(yaml.safe_dump(make_document({**SWEEP, "sweep.trials": 6})))
    # a killed run: one trial asked, its MLflow run open, never told (as after SIGKILL)
    params = load_params(root / "params.yaml")
    study = optuna.create_study(study_name=study_name(params, root), storage=open_storage(storage_url("sqlite", root)),
                                direction="maximize", load_if_exists=True)
    killed = study.ask({"irnet.confidence_cutoff": optuna.distributions.FloatDistribution(0.05, 0.25, step=0.1),
                        "irnet.threshold": optuna.distributions.FloatDistribution(0.05, 0.95)})
    client = mlflow.tracking.MlflowClient()
    experiment = mlflow.get_experiment_by_name("wsss-sweep")
    orphan = client.create_run(experiment.experiment_id, tags={"mlflow.parentRunId": "x", "wsss.trial": str(killed.number)})
    killed.set_user_attr("mlflow_run_id", orphan.info.run_id)

    assert main(["sweep", "--root", str(root), "--resume"]) == 0
    study = _study(root)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.FAIL) == 1 and study.trials[killed.number].state == TrialState.FAIL
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 6  # nothing lost, nothing extra
    retries = [t for t in study.trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retries) == 1 and retries[0].params == killed.params and retries[0].state != TrialState.FAIL
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"


def test_two_workers_on_one_journal_study_run_each_trial_once(sweep_project):
    root = sweep_project
    (root / "params.yaml").write_text(yaml.safe_dump(make_document({**SWEEP, "sweep.storage": "journal", "sweep.trials": 5})))
    assert main(["sweep", "--root", str(root), "--workers", "2"]) == 0
    study = _study(root)
    assert len(study.trials) == 5 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    children = _child_runs()
    assert sorted(int(r.data.tags["wsss.trial"]) for r in children) == list(range(5))
    assert {r.data.tags["wsss.worker"] for r in children} <= {"0", "1"}
    assert (root / "sweeps/optuna.journal").is_file()


@pytest.mark.parametrize(("space", "field"), [
    ({"irnet.confidence_cutoff": {"low": 0.9, "high": 0.5}}, "sweep.space.irnet.confidence_cutoff.low"),
    ({"irnet.confidence_cutoff": {"low": 0.5, "high": 1.2}}, "sweep.space.irnet.confidence_cutoff"),
    ({"irnet.crop_size": {"low": 1, "high": 2}}, "sweep.space"),
])
def test_a_bad_range_is_rejected_naming_the_field(space, field):
    with pytest.raises(ConfigError) as caught:
        make_params({**SWEEP, "sweep.space": space})
    assert field in str(caught.value)


def test_a_key_without_effect_under_the_background_stops_the_sweep_not_the_pipeline(sweep_project, capsys):
    document = make_document({**SWEEP, "sweep.space": {"irnet.bg_weight": {"low": 1.0, "high": 2.0}}})  # background: plane
    (sweep_project / "params.yaml").write_text(yaml.safe_dump(document))
    # check-params checks every pipeline's settings; the main pipeline's stages still run (prepare only warns)
    assert main(["check-params", "--root", str(sweep_project)]) == 2
    assert "sweep.space.irnet.bg_weight: irnet.background is 'plane'" in capsys.readouterr().err
    assert preflight.problems(load_params(sweep_project / "params.yaml"), sweep_project, (preflight.MAIN,)) == []
    assert main(["sweep", "--root", str(sweep_project)]) == 2
    assert "sweep.space.irnet.bg_weight: irnet.background is 'plane'" in capsys.readouterr().err
    assert not (sweep_project / "sweeps").exists()


def test_a_bad_storage_or_worker_count_is_a_clear_error(sweep_project):
    params = make_params({**SWEEP, "sweep.storage": "mongodb"})
    with pytest.raises(ConfigError, match="sweep.storage"):
        run_sweep(params, sweep_project)
    with pytest.raises(ConfigError, match="--workers"):
        run_sweep(make_params(SWEEP), sweep_project, workers=0)


def test_a_sweep_without_the_pipeline_outputs_names_what_is_missing(project, mlflow_store, capsys):
    (project / "params.yaml").write_text(yaml.safe_dump(make_document(SWEEP)))
    assert main(["sweep", "--root", str(project)]) == 2
    error = capsys.readouterr().err
    assert "train.json" in error and "dvc repro" in error
    assert not (project / "sweeps").exists()


def test_the_final_objective_trains_a_segmenter_per_trial_and_reports_each_epoch(sweep_project):
    root = sweep_project
    final = {**SWEEP, "sweep.objective": "final", "sweep.trials": 2, "segmenter.epochs": 2, "segmenter.batch_size": 8,
             "segmenter.image_size": 32, "segmenter.decoder_channels": 16, "segmenter.threads": 1}
    (root / "params.yaml").write_text(yaml.safe_dump(make_document(final)))
    assert main(["sweep", "--root", str(root)]) == 0
    study = _study(root)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    for trial in study.trials:
        assert sorted(trial.intermediate_values) == [1, 2]  # val mIoU after each epoch
        assert trial.value == pytest.approx(max(trial.intermediate_values.values()))
        masks = list((root / "sweeps/cache/trials").glob(f"*-{trial.number}/pseudo_masks/*.png"))
        assert len(masks) == len(load_manifest(root / "data/splits/train.json").records)


def test_an_interrupted_trial_runs_again_on_resume(sweep_project, monkeypatch):
    root = sweep_project
    original = TrialEvaluator.pseudo_mask_miou
    calls = []

    def interrupt_the_second(self, params, report=None):
        calls.append(params.irnet.threshold)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, params, report)

    monkeypatch.setattr(TrialEvaluator, "pseudo_mask_miou", interrupt_the_second)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(load_params(root / "params.yaml"), root)
    assert main(["sweep", "--root", str(root), "--resume"]) == 0
    study = _study(root)
    interrupted = study.trials[1]
    assert interrupted.state == TrialState.FAIL
    retries = [t for t in study.trials if t.user_attrs.get("retry_of") == 1]
    assert len(retries) == 1 and retries[0].params == interrupted.params
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials) == 4


def test_a_study_resumed_with_another_mlflow_store_gets_a_new_parent_run(sweep_project, tmp_path, monkeypatch, _migrated_store):
    root = sweep_project
    (root / "params.yaml").write_text(yaml.safe_dump(make_document({**SWEEP, "sweep.trials": 2})))
    assert main(["sweep", "--root", str(root)]) == 0
    other = tmp_path / "other-store"
    other.mkdir()
    shutil.copy(_migrated_store, other / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other / 'mlflow.db'}")  # e.g. mlruns/ was removed
    mlflow.set_tracking_uri(f"sqlite:///{other / 'mlflow.db'}")
    (root / "params.yaml").write_text(yaml.safe_dump(make_document({**SWEEP, "sweep.trials": 3})))
    assert main(["sweep", "--root", str(root), "--resume"]) == 0
    assert len(_study(root).trials) == 3  # the two trials of the first call were kept
    parents = [r for r in mlflow.search_runs(experiment_names=["wsss-sweep"], output_format="list") if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and _study(root).user_attrs["mlflow_parent_run_id"] == parents[0].info.run_id
