"""The prepared GPU check runs here with --smoke (tiny sizes, CPU), so it is known to work before a GPU is lent.

Its repro part runs on a tiny LID-layout tree: that run is also the paper profile's end-to-end test on LID
(image labels only for training, masks for val, no upper bound), stage by stage in one process;
tests/test_paper_repro_voc.py runs the profile through `dvc repro` and the DVC checks that do not depend on
the data source (one paper-profile run each, not three)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, Path]:
    scratch = tmp_path_factory.mktemp("gpu-check")
    out, project = scratch / "out", scratch / "project"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--smoke", "--source", "lid", "--project", str(project),
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, project


def test_the_gpu_check_runs_every_part_and_writes_its_tables(smoke):
    out, _ = smoke
    summary = (out / "summary.md").read_text()
    for part in ("tests", "throughput", "repro"):
        assert f"| {part} | yes |" in summary, summary
    assert "skipped" in (out / "tests.txt").read_text()  # no CUDA here: the cuda tests skip cleanly
    throughput = json.loads((out / "throughput.json").read_text())
    from wsss.distributed import resolve_precision

    native_bf16 = resolve_precision("auto", __import__("torch").device("cpu")) == "bf16"
    assert set(throughput) == ({"fp32", "bf16"} if native_bf16 else {"fp32"})
    for result in throughput.values():
        assert all(entry["seconds"] > 0 for entry in result["measured"].values())
        assert set(result["hours"]) == {"VOC 2012 (train_aug)", "LID 2020 (balanced, paper)"}
    repro = json.loads((out / "repro.json").read_text())
    assert [row["stage"] for row in repro["stages"]][-1] == "report" and all(row["exit"] == 0 for row in repro["stages"])
    assert repro["evaluate"], "the evaluate stage wrote no metrics"


def test_paper_profile_runs_end_to_end_on_a_lid_tree(smoke):
    _, root = smoke
    params = (root / "params.yaml").read_text()
    assert "source: lid" in params and "arch: vgg16_bn_d1" in params and "backbone: resnet50" in params
    assert json.loads((root / "metrics/prepare.json").read_text())["train_with_masks"] == 0
    oracle = json.loads((root / "metrics/oracle.json").read_text())
    assert oracle["available"] is False and "no ground-truth mask" in oracle["reason"]
    assert (root / "plots/oracle/training.csv").read_text().strip() == "epoch,loss,val_miou,lr,skipped"
    report = (root / "reports/summary.md").read_text()
    assert "Table 2" in report and "No upper bound" in report and "upper bound (true masks)" not in report
    evaluate = json.loads((root / "metrics/evaluate.json").read_text())
    assert evaluate["final_mode"] == "tta" and evaluate["tta_scales"] == [0.5, 1.0, 2.0]
