"""`cp profiles/paper.yaml params.yaml && dvc repro` on a tiny VOC-layout tree: the paper's networks
(VGG16-BN-D1 + 4 extra convs, IRNet on ResNet-50, DeepLabv3+ ResNet-50 at output stride 8, plane
background, no post-CRF, TTA 0.5 1 2, sync BatchNorm setting) end to end through DVC, shrunk only in
sizes, epochs, batch sizes and counts (tests/paper_project.py says what else and why)."""

from __future__ import annotations

import json

from paper_project import paper_project, repro_and_check, write_weights


def test_paper_profile_runs_end_to_end_on_a_voc_tree(tmp_path, mlflow_store):
    weights = write_weights(tmp_path / "weights")
    root, env = paper_project(tmp_path / "project", "voc", weights, mlflow_store)
    params = (root / "params.yaml").read_text()
    assert "arch: vgg16_bn_d1" in params and "backbone: resnet50" in params and "encoder: resnet50" in params
    assert "batchnorm: sync" in params and "background: plane" in params

    metrics = repro_and_check(root, env)
    assert metrics["metrics/prepare.json"]["num_classes"] == 20
    assert "person" in json.loads((root / "metrics/classifier.json").read_text())["classes_excluded"]
    evaluate = json.loads((root / "metrics/evaluate.json").read_text())
    assert evaluate["tta_scales"] == [0.5, 1.0, 2.0] and evaluate["final_mode"] == "tta" and "tta_crf" not in evaluate["test"]
    oracle = json.loads((root / "metrics/oracle.json").read_text())
    assert oracle["available"] is True and "tta" in oracle["test"]
    report = (root / "reports/summary.md").read_text()
    assert "Table 2" in report and "upper bound (true masks)" in report
