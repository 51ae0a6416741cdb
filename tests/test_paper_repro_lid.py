"""`cp profiles/paper.yaml params.yaml && dvc repro` on a tiny LID-layout tree (image labels only for
training, masks for val): the paper's networks end to end, no upper bound (tests/paper_project.py).
The checks that do not depend on the data source (a second `dvc repro`, `dvc exp show`, the model
registry) are test_paper_repro_voc.py's."""

from __future__ import annotations

import json

from paper_project import paper_project, repro_and_check, write_weights


def test_paper_profile_runs_end_to_end_on_a_lid_tree(tmp_path, mlflow_store):
    weights = write_weights(tmp_path / "weights")
    root, env = paper_project(tmp_path / "project", "lid", weights, mlflow_store)

    metrics = repro_and_check(root, env, dvc_checks=False)  # test_paper_repro_voc.py runs them
    assert metrics["metrics/prepare.json"]["train_with_masks"] == 0
    oracle = json.loads((root / "metrics/oracle.json").read_text())
    assert oracle["available"] is False and "no ground-truth mask" in oracle["reason"]
    assert (root / "plots/oracle/training.csv").read_text().strip() == "epoch,loss,val_miou,lr,skipped"
    report = (root / "reports/summary.md").read_text()
    assert "Table 2" in report and "No upper bound" in report and "upper bound (true masks)" not in report
    assert json.loads((root / "metrics/evaluate.json").read_text())["final_mode"] == "tta"
