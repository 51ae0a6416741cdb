"""The ablation (the paper's Table 3): person merge, report rendering, and the grid through DVC on tiny data."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import yaml
from conftest import make_params
from dvc_project import dvc_project, run_ok, stages_run
from test_step3 import STEP3

from wsss.data.manifest import ImageRecord, Manifest
from wsss.errors import ConfigError, DataError
from wsss.shards import MaskStore
from wsss.person import PersonMerge, best_f1_threshold, merge_person, person_view, shows_person
from wsss.stages.ablation import with_threshold
from wsss.stages.ablation_cell import cell_segmenter
from wsss.stages.common import background_knob
from wsss.stages.ablation_report import ablation_markdown, factor_effects
from wsss.stages.person import binary_scores

PERSON = 4


def test_merge_person_fills_only_background_above_the_threshold():
    mask = np.array([[0, 0, 2], [0, 3, 0]], dtype=np.uint8)
    person_map = np.array([[0.9, 0.2, 0.9], [0.5, 0.9, 0.45]], dtype=np.float32) * 0.5  # peak 0.45: normalised to 1
    merged = merge_person(mask, person_map, PERSON, cam_threshold=0.5)
    # normalised map: [[1, .22, 1], [.56, 1, .5]] -> background pixels at >= 0.5 become person
    assert merged.tolist() == [[PERSON, 0, 2], [PERSON, 3, PERSON]]
    assert mask.tolist() == [[0, 0, 2], [0, 3, 0]]  # the input is not modified
    assert merge_person(mask, np.zeros_like(person_map), PERSON, 0.5).tolist() == mask.tolist()
    # "mean": the normalised map's own mean, (1 + .22 + 1 + .56 + 1 + .5) / 6 = 0.71, is the threshold
    assert merge_person(mask, person_map, PERSON, "mean").tolist() == [[PERSON, 0, 2], [0, 3, 0]]
    assert merge_person(mask, person_map * 3, PERSON, "mean").tolist() == [[PERSON, 0, 2], [0, 3, 0]]  # scale-free
    assert merge_person(mask, np.zeros_like(person_map), PERSON, "mean").tolist() == mask.tolist()
    with pytest.raises(ValueError, match="differ in size"):
        merge_person(mask, person_map[:, :2], PERSON, 0.5)


def _record(id_: str, labels, source_labels) -> ImageRecord:
    return ImageRecord(id_, "train", f"images/{id_}.png", None, tuple(labels), tuple(source_labels))


def test_person_view_reads_noisy_or_complete_labels_and_needs_a_person_class(tmp_path):
    manifest = Manifest("embedded", ("background", "a", "b", "c", "coat"), PERSON,
                        (_record("x", [1], [1, PERSON]), _record("y", [2, PERSON], [2])), tmp_path)
    noisy = person_view(manifest, noisy=True)
    assert noisy.class_names == ("background", "coat") and noisy.person_class is None
    assert [r.labels for r in noisy.records] == [(1,), ()]
    assert [r.labels for r in person_view(manifest, noisy=False).records] == [(), (1,)]
    with pytest.raises(DataError, match="no person class"):
        person_view(Manifest("voc", ("background", "a"), None, (), tmp_path), noisy=True)
    assert shows_person(0.1, (PERSON,), PERSON, 0.5) and shows_person(0.6, (), PERSON, 0.5)
    assert not shows_person(0.4, (1,), PERSON, 0.5)


def test_the_presence_threshold_of_the_best_val_f1():
    # F1 1.0 from any threshold in (0.3, 0.35]: the midpoint, not a value that a rerun's rounding could flip
    assert best_f1_threshold(np.array([0.9, 0.8, 0.35, 0.3, 0.1]), np.array([1, 1, 1, 0, 0], bool)) == pytest.approx(0.325)
    # a threshold takes every image of its value: 0.5 (F1 0.8) beats 0.9 and 0.1 (0.67 each)
    assert best_f1_threshold(np.array([0.9, 0.5, 0.5, 0.1]), np.array([1, 1, 0, 0], bool)) == pytest.approx(0.3)
    # ties: the lowest threshold (more recall); every image positive: below the lowest probability
    assert best_f1_threshold(np.array([0.8, 0.6, 0.4, 0.2]), np.array([1, 0, 1, 0], bool)) == pytest.approx(0.3)
    assert best_f1_threshold(np.array([0.7, 0.2]), np.array([1, 1], bool)) == pytest.approx(0.1)
    assert best_f1_threshold(np.array([0.7, 0.2]), np.array([0, 0], bool)) == 0.5  # nothing to fit


def test_an_auto_presence_threshold_is_read_from_the_person_classifier_s_index(tmp_path):
    from wsss.config import CrfParams, PersonParams

    (tmp_path / "index.json").write_text(json.dumps({"class_id": 4, "probability": {"val": {"a": 0.2}}, "presence_threshold": 0.15}))
    merge = PersonMerge.of_folder(tmp_path, 4, PersonParams(presence_threshold="auto"), CrfParams())
    assert merge.presence_threshold == 0.15
    record = ImageRecord("a", "val", "a.png", None, (), ())
    assert merge.shows_person("val", record, "predicted")  # 0.2 >= 0.15
    assert PersonMerge.of_folder(tmp_path, 4, PersonParams(presence_threshold=0.5), CrfParams()).presence_threshold == 0.5
    (tmp_path / "index.json").write_text(json.dumps({"class_id": 4, "probability": {"val": {"a": 0.2}}}))  # written before auto existed
    with pytest.raises(DataError, match="re-run the person_classifier stage"):
        PersonMerge.of_folder(tmp_path, 4, PersonParams(presence_threshold="auto"), CrfParams())
    with pytest.raises(ValueError, match="presence_threshold"):
        PersonParams(presence_threshold=1.5)
    with pytest.raises(ValueError, match="cam_threshold"):
        PersonParams(cam_threshold=0.0)


def test_binary_scores_and_empty_counts():
    scores = binary_scores(np.array([True, True, False, False]), np.array([True, False, True, False]))
    assert scores["precision"] == 0.5 and scores["recall"] == 0.5 and scores["f1"] == 0.5
    nothing = binary_scores(np.array([False, False]), np.array([False, False]))
    assert nothing["f1"] == 0.0 and nothing["positives"] == 0


def test_threshold_sets_the_knob_of_the_background_mode():
    walk = make_params({"irnet.background": "walk"})
    assert background_knob(walk.irnet) == "bg_weight" and with_threshold(walk, 1.3).irnet.bg_weight == 1.3
    plane = make_params({"irnet.background": "plane"})
    assert with_threshold(plane, 0.3).irnet.threshold == 0.3 and with_threshold(plane, 0.3).irnet.bg_weight == plane.irnet.bg_weight
    with pytest.raises(ConfigError, match="ablation.thresholds"):
        with_threshold(plane, 1.3)


def test_ablation_params_are_checked():
    with pytest.raises(ConfigError, match="ablation.thresholds"):
        make_params({"ablation.thresholds": [0.3, 0.3]})
    with pytest.raises(ConfigError, match="ablation.encoders"):
        make_params({"ablation.encoders": []})


def test_cell_output_stride_of_smp_encoders_and_of_the_classifier_encoder():
    params = make_params({"segmenter.encoder": "classifier", "segmenter.output_stride": 8, "ablation.smp_output_stride": 16})
    assert cell_segmenter(params, "resnet18").output_stride == 16 and cell_segmenter(params, "resnet18").encoder == "resnet18"
    assert cell_segmenter(params, "classifier").output_stride == 8  # the classifier network's own stride
    assert cell_segmenter(params, "classifier") == params.segmenter  # so its checkpoints stay valid
    unset = make_params({"segmenter.encoder": "resnet18", "segmenter.output_stride": 8, "ablation.smp_output_stride": None})
    assert cell_segmenter(unset, "resnet50").output_stride == 8  # the segmenter group's
    with pytest.raises(ConfigError, match="ablation.smp_output_stride"):
        make_params({"ablation.smp_output_stride": 32})


def _row(encoder, threshold, tta, person, miou):
    return {"encoder": encoder, "threshold": threshold, "tta": tta, "person": person, "val_miou": miou,
            "val_miou_without_person": miou + 0.01, "run_id": "r"}


def test_report_renders_the_grid_with_the_papers_numbers_and_the_factor_effects():
    rows = [_row(e, t, tta, p, 0.30 + 0.01 * i) for i, (e, t, tta, p) in enumerate(
        (e, t, tta, p) for e in ("resnet50", "resnet101") for t in (0.3, 0.5) for tta in (False, True) for p in (False, True))]
    effects = factor_effects(rows)
    assert set(effects) == {"encoder", "threshold", "tta", "person"}
    assert effects["tta"]["yes"] - effects["tta"]["no"] == pytest.approx(0.02)  # tta is the third loop: +2 rows of 0.01
    assert effects["encoder"]["resnet101"] - effects["encoder"]["resnet50"] == pytest.approx(0.08)
    text = ablation_markdown(rows, "irnet.threshold", [0.5, 1.0, 2.0])
    table = [line for line in text.splitlines() if line.startswith("| resnet")]
    assert len(table) == 16 + 7  # the grid, then the paper's Table 3
    assert "| resnet50 | 0.3 | yes | no | 32.00 | 33.00 | 39.64 |" in table  # the paper's number beside the same cell
    assert "| resnet101 | 0.3 | no | no | 38.00 | 39.00 |  |" in table  # a cell the paper did not run
    assert "Best cell: resnet101, irnet thr. 0.5, TTA yes, person yes: **45.00**" in text
    assert "Output stride" not in text  # rows of cells that did not record it
    strided = ablation_markdown([{**row, "output_stride": 16 if row["encoder"] == "resnet50" else 8} for row in rows],
                                "irnet.threshold", [1.0])
    assert "Output stride: resnet50 16, resnet101 8." in strided
    walk = ablation_markdown(rows[:2], "irnet.bg_weight", [1.0])
    assert "IRNet bg weight" in walk and "39.64 |" not in walk.split("## The paper")[0]


# --- the grid through DVC --------------------------------------------------------------------

ABLATION = {**STEP3, "person.epochs": 2, "person.presence_threshold": 0.3, "person.cam_threshold": 0.4, "person.post_crf": False,
            "ablation.encoders": ["classifier"], "ablation.thresholds": [1.6], "ablation.person": [False]}  # the CPU default encoder: the cheapest cell


UPSTREAM = ("prepare", "split", "train_classifier", "cams", "ir_labels", "train_irnet")  # the main stages the grid needs


def test_dvc_repro_ablation_grid_logs_cells_renders_the_table_and_runs_only_new_cells(tmp_path, mlflow_store):
    import networkx as nx
    from dvc.repo import Repo

    from wsss.cli import main

    root, env = dvc_project(tmp_path, mlflow_store, ABLATION)
    with Repo(str(root)) as repo:  # the grid runs the main pipeline's stages it needs first, and step 3 is not among them
        cell = next(stage for stage in repo.index.stages if stage.name == "cell@classifier-1.6-False")
        needed = {stage.name for stage in nx.descendants(repo.index.graph, cell)}  # the graph's edges point to the dependencies
    assert {"masks@1.6", *UPSTREAM} <= needed and "train_segmenter" not in needed
    # Those upstream stages run in this process (no interpreter start per stage: the suite's time), recorded in dvc.lock.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
        for stage in UPSTREAM:
            assert main([stage.replace("_", "-"), "--root", str(root)]) == 0, stage
    run_ok(["dvc", "commit", "-f", *UPSTREAM], root, env)

    first = stages_run(run_ok(["dvc", "repro", "pipelines/ablation/dvc.yaml"], root, env))
    assert first == {"person_classifier"} | {"pipelines/ablation/dvc.yaml:" + s for s in ("masks@1.6", "person_masks@1.6",
                                                                                          "cell@classifier-1.6-False", "report")}
    person = json.loads((root / "metrics/person_classifier.json").read_text())
    assert 0 <= person["val"]["f1"] <= 1 and person["val"]["images"] > 0
    plain = json.loads((root / "metrics/ablation/masks-thr-1.6-person-false.json").read_text())
    assert plain["threshold_key"] == "irnet.bg_weight" and plain["bg_weight"] == 1.6 and "threshold" not in plain
    assert plain["val"]["iou"]["coat"] in (None, 0.0)  # no person in the plain pseudo masks
    assert len(mlflow.search_runs(experiment_names=["ablation"])) == 2  # 1 cell x TTA off/on
    assert not stages_run(run_ok(["dvc", "repro", "pipelines/ablation/dvc.yaml"], root, env))  # nothing changed, nothing runs

    document = yaml.safe_load((root / "params.yaml").read_text())
    document["ablation"]["person"] = [False, True]
    (root / "params.yaml").write_text(yaml.safe_dump(document))
    added = stages_run(run_ok(["dvc", "repro", "pipelines/ablation/dvc.yaml"], root, env))
    assert added == {"pipelines/ablation/dvc.yaml:" + s for s in ("cell@classifier-1.6-True", "report")}  # the masks are there

    merged = json.loads((root / "metrics/ablation/masks-thr-1.6-person-true.json").read_text())
    assert merged["images_given_person"]["val"] > 0
    for split in ("train", "val"):  # the merge only turns background into person (no CRF here)
        plain, merged_masks = (MaskStore(root / "ablation/masks" / f"thr-1.6-person-{p}" / split) for p in ("false", "true"))
        assert plain.reader.index and plain.reader.index.keys() == merged_masks.reader.index.keys()
        for image_id in plain.reader.index:
            before, after = plain.load(image_id), merged_masks.load(image_id)
            changed = before != after
            assert (before[changed] == 0).all() and (after[changed] == PERSON).all()

    runs = mlflow.search_runs(experiment_names=["ablation"])
    assert len(runs) == 4  # 2 cells x TTA off/on
    assert set(zip(runs["params.encoder"], runs["params.threshold"], runs["params.tta"], runs["params.person"], strict=True)) == {
        ("classifier", "1.6", tta, person) for tta in ("False", "True") for person in ("False", "True")}
    cell = json.loads((root / "metrics/ablation/cell-classifier-thr-1.6-person-true.json").read_text())
    logged = runs[(runs["params.person"] == "True") & (runs["params.tta"] == "True")]["metrics.val_miou"].item()
    assert logged == pytest.approx(cell["val"]["tta"]["miou"])
    assert cell["output_stride"] == 8 and set(runs["params.output_stride"]) == {"8"}
    report = (root / "reports/ablation.md").read_text()
    assert f"| classifier | 1.6 | yes | yes | {100 * logged:.2f} |" in report and "| classifier | 1.6 | no | no |" in report
    assert (root / "reports/ablation_effects.png").stat().st_size > 1000
    assert (root / "models/ablation/classifier-thr-1.6-person-true/model.pt").is_file()


def test_report_is_built_from_the_cells_tracked_metrics_without_their_mlflow_runs(project, mlflow_store):
    from wsss.stages.ablation_report import run_ablation_report

    params = make_params({"ablation.encoders": ["resnet18"], "ablation.thresholds": [1.6], "ablation.person": [False]})
    with pytest.raises(DataError, match="cells not run: resnet18-thr-1.6-person-no"):
        run_ablation_report(params, project)
    cell_file = project / "metrics/ablation/cell-resnet18-thr-1.6-person-false.json"
    cell = {"encoder": "resnet18", "threshold": 1.6, "person": False, "output_stride": 16,
            "mlflow_run_ids": {"plain": "a" * 32, "tta": "b" * 32}}  # runs this store never saw: a pulled or run-cache cell
    cell_file.parent.mkdir(parents=True)
    cell_file.write_text(json.dumps(cell))
    with pytest.raises(DataError, match=r"cell-resnet18-thr-1.6-person-false.json: no val mIoU for 'plain'"):
        run_ablation_report(params, project)
    assert not (project / "reports/ablation.md").exists()
    cell["val"] = {"plain": {"miou": 0.4123, "miou_without_person": 0.45}, "tta": {"miou": 0.4321, "miou_without_person": 0.47}}
    cell_file.write_text(json.dumps(cell))
    assert run_ablation_report(params, project)["cells"] == 2
    report = (project / "reports/ablation.md").read_text()
    assert "| resnet18 | 1.6 | no | no | 41.23 | 45.00 |" in report and "| resnet18 | 1.6 | yes | no | 43.21 | 47.00 |" in report
    assert "Output stride: resnet18 16." in report


@pytest.mark.parametrize("out", [".", "", "ablation", "../elsewhere/masks", "/tmp/masks", ".git/objects"])
def test_an_output_path_that_could_replace_the_project_is_refused(project, out, capsys):
    from wsss.cli import main

    assert main(["ablation-masks", "--root", str(project), "--threshold", "1.6", "--out", out, "--metrics", "metrics/ablation/m.json"]) == 2
    assert "--out" in capsys.readouterr().err
    assert (project / "params.yaml").is_file() and (project / "data").is_dir()


def test_person_merge_decides_by_noisy_labels_image_labels_or_the_person_classifier(tmp_path):
    from wsss.cam import ImageCams, cams_arrays
    from wsss.config import CrfParams, PersonParams
    from wsss.person import PersonMerge
    from wsss.shards import write_index, write_shard

    person = 2
    records = [ImageRecord("a", "train", "a.png", None, (1,), (1, person)),  # labelled person (noisy source labels)
               ImageRecord("b", "train", "b.png", None, (1,), (1,)),  # unlabelled, P(person) high
               ImageRecord("c", "train", "c.png", None, (1,), (1,))]  # unlabelled, P(person) low
    person_map = np.zeros((1, 4, 4))
    person_map[0, :, :2] = 1.0
    write_shard(tmp_path / "train/shard-00000.npz", [(r.id, cams_arrays(ImageCams(np.array([person]), person_map[:, ::4, ::4],
                                                                                   person_map, np.array([0.5]), np.array([person]), 0.5)))
                                                     for r in records])
    write_index(tmp_path / "train")
    merge = PersonMerge(tmp_path, {"train": {"a": 0.1, "b": 0.8, "c": 0.1}}, person,
                        PersonParams(presence_threshold=0.5, cam_threshold=0.5, post_crf=False), CrfParams(), 0.5)
    masks = [np.zeros((4, 4), np.uint8) for _ in records]
    for mask in masks:
        mask[0, 0] = 1  # an object in front of the person keeps its class

    def given(presence: str) -> list[bool]:
        merged, count = merge.apply("train", records, lambda p: None, masks, presence)
        assert count == sum((m == person).any() for m in merged)
        for m in merged:
            assert m[0, 0] == 1 and not (m[:, 2:] == person).any()
        return [bool((m == person).any()) for m in merged]

    assert given("noisy") == [True, True, False]  # its labels, or the classifier
    assert given("predicted") == [False, True, False]  # the classifier alone
    records[2] = ImageRecord("c", "train", "c.png", None, (1, person), (1,))
    assert given("labels") == [False, False, True]  # the image labels alone (val's complete ones)
    with pytest.raises(DataError, match="no person probability for train image x"):
        merge.apply("train", [ImageRecord("x", "train", "x.png", None, (1,), (1,))], lambda p: None, masks[:1], "predicted")
