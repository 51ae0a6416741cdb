"""benchmarks/seeds.py: one seed's numbers from its metrics files, the mean and spread, the targets."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import seeds  # noqa: E402


def _metrics(weak_tta: float, upper_tta: float, merged: float, before: float, ordering: bool = True) -> dict[str, dict]:
    return {
        "summary": {"val_cam_crf_miou": 0.40, "val_pseudo_masks_miou": 0.50, "val_segmentation_tta_miou": 0.55,
                    "table2_ordering_holds": ordering},
        "evaluate": {"test": {"tta": {"miou": weak_tta}, "tta_crf": {"miou": weak_tta + 0.02}}},
        "oracle": {"test": {"tta": {"miou": upper_tta}, "tta_crf": {"miou": upper_tta + 0.01}}},
        "pseudo_masks": {"val": {"miou": merged, "before_person_merge_miou": before},
                         "val_predicted": {"miou": merged - 0.05, "before_person_merge_miou": before - 0.07}},
        "classifier": {"val_macro_f1": 0.8}, "person_classifier": {"best_epoch": 3, "val": {"f1": 0.9}},
        "irnet": {"images": 100}, "segmenter": {"best_epoch": 7},
    }


def test_seed_row_takes_each_number_from_its_stage():
    row = seeds.seed_row(_metrics(0.60, 0.80, 0.62, 0.55))
    assert row["share_tta"] == pytest.approx(0.60 / 0.80)
    assert row["share_tta_crf"] == pytest.approx(0.62 / 0.81)
    assert row["merge_gain_image_labels"] == pytest.approx(0.07)
    assert row["merge_gain_predicted"] == pytest.approx(0.09)
    assert row["person_best_epoch"] == 3 and row["ordering"] is True


def test_mean_spread_and_targets_over_seeds():
    rows = [seeds.seed_row(_metrics(w, 0.80, 0.6, 0.5, ordering)) for w, ordering in ((0.70, True), (0.66, True), (0.62, False))]
    stats = seeds.aggregate(rows)["share_tta"]
    assert stats["mean"] == pytest.approx(0.825) and stats["min"] == pytest.approx(0.775)
    assert stats["std"] == pytest.approx(0.05)  # sample standard deviation of 0.875, 0.825, 0.775
    # the targets read the TTA + CRF share: 0.72 / 0.81, 0.68 / 0.81, 0.64 / 0.81
    assert seeds.targets(rows) == {"ordering in every seed": False, "mean share >= 85%": False, "no seed below 80%": False}
    assert all(seeds.targets(rows[:2]).values())
    table = seeds.markdown([1, 2, 3], rows)
    assert "| share (TTA) | 87.5 | 82.5 | 77.5 | 82.5 +/- 5.0 | 77.5 |" in table
    assert math.isclose(seeds.aggregate(rows[:1])["share_tta"]["std"], 0.0)
    results = [{"seed": s, "commit": "abc1234", "precision": "fp32", "row": {**row, "minutes": 30.0}} for s, row in zip((1, 2, 3), rows)]
    text = seeds.report(results, {"data.seed": 5})
    assert text.startswith("3 seeds, commit abc1234, precision fp32, ") and "overrides {'data.seed': 5}" in text.splitlines()[0]
    assert table in text and "| IRNet images |" in text and text.endswith("- no seed below 80%: NOT met\n")


@pytest.mark.parametrize("text", ["seed=3", "compute.precision"])
def test_the_seed_itself_and_a_key_without_a_value_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        seeds._parse_override(text)
    assert seeds._parse_override("compute.precision=fp32") == ("compute.precision", "fp32")
    assert seeds._parse_override("data.embedded.classes=[bag, shirt]") == ("data.embedded.classes", ["bag", "shirt"])


def _git(*args: str, cwd: Path) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PATH": os.environ["PATH"], "HOME": str(cwd)}
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout


def test_a_clone_moves_to_the_new_head_keeping_its_run(tmp_path, monkeypatch):
    origin = tmp_path / "origin"
    origin.mkdir()
    for name, text in {"params.yaml": "seed: 2020\n", "dvc.lock": "lock of the repo\n", "metrics/summary.json": "{}\n",
                       "src.py": "v1\n"}.items():
        (origin / name).parent.mkdir(parents=True, exist_ok=True)
        (origin / name).write_text(text)
    _git("init", "-q", cwd=origin)
    _git("add", "-A", cwd=origin)
    _git("commit", "-qm", "one", cwd=origin)
    clone = tmp_path / "seed-7"
    _git("clone", "-q", str(origin), str(clone), cwd=tmp_path)
    # the seed's run: its params, lock, uncached metrics and result
    (clone / "params.yaml").write_text("seed: 7\n")
    (clone / "dvc.lock").write_text("lock of seed 7\n")
    (clone / "metrics/summary.json").write_text('{"miou": 0.5}\n')
    (clone / seeds.RESULT).write_text(json.dumps({"commit": _git("rev-parse", "--short", "HEAD", cwd=clone).strip()}))
    # the repository moves on, re-recording the same tracked files
    (origin / "src.py").write_text("v2\n")
    (origin / "metrics/summary.json").write_text('{"miou": 0.9}\n')
    (origin / "params.yaml").write_text("seed: 2020\nnew: 1\n")
    _git("commit", "-qam", "two", cwd=origin)
    monkeypatch.setattr(seeds, "REPO", origin)

    seeds.update_clone(clone)
    assert _git("rev-parse", "HEAD", cwd=clone) == _git("rev-parse", "HEAD", cwd=origin)
    assert (clone / "src.py").read_text() == "v2\n" and (clone / "params.yaml").read_text() == "seed: 2020\nnew: 1\n"
    assert (clone / "dvc.lock").read_text() == "lock of seed 7\n"  # DVC re-runs only what the new commit changed
    assert (clone / "metrics/summary.json").read_text() == '{"miou": 0.5}\n'
    assert not (clone / seeds.RESULT).exists() and len(list(clone.glob("seed-result-*.json"))) == 1


def test_the_seed_report_that_the_run_report_links_is_in_the_repository():
    from wsss.stages.report import SEEDS_REPORT

    text = (seeds.REPO / SEEDS_REPORT).read_text()
    assert text.startswith("# Whole-pipeline seeds") and "| share (TTA + CRF) |" in text and "precision fp32" in text
