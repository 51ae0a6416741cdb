"""benchmarks/seeds.py: one seed's numbers from its metrics files, the mean and spread, the targets."""

from __future__ import annotations

import argparse
import math
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


@pytest.mark.parametrize("text", ["seed=3", "compute.precision"])
def test_the_seed_itself_and_a_key_without_a_value_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        seeds._parse_override(text)
    assert seeds._parse_override("compute.precision=fp32") == ("compute.precision", "fp32")
    assert seeds._parse_override("data.embedded.classes=[bag, shirt]") == ("data.embedded.classes", ["bag", "shirt"])
