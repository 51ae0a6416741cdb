"""The ``ablation_report`` stage: ``reports/ablation.md`` and ``reports/ablation_effects.png`` from the
cells' DVC-tracked metrics (``metrics/ablation/cell-*.json``): the grid as the paper's Table 3 with the
paper's numbers beside, and the mean effect of each factor. Built from files DVC versions, the report
is the same after ``dvc pull`` or a run-cache restore; the cells' MLflow runs (ids in each file) remain
the place to compare them."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from wsss import tracking, visualize
from wsss.config import Params, flatten
from wsss.errors import ConfigError, DataError
from wsss.io import atomic_write_bytes, read_json
from wsss.stages.common import background_knob, cell_name

REPORT = Path("reports/ablation.md")
METRICS_DIR = Path("metrics/ablation")
EFFECTS_PLOT = Path("reports/ablation_effects.png")
FACTORS = ("encoder", "threshold", "tta", "person")
# The paper's Table 3 (LID val mIoU): (encoder, IRNet threshold, TTA, person) -> mIoU.
PAPER_TABLE3 = {
    ("resnet50", 0.3, False, False): 0.3665,
    ("resnet50", 0.3, True, False): 0.3964,
    ("resnet50", 0.3, True, True): 0.3980,
    ("resnet50", 0.5, False, False): 0.3711,
    ("resnet50", 0.5, True, False): 0.3958,
    ("resnet101", 0.5, False, False): 0.3614,
    ("resnet101", 0.5, True, False): 0.3715,
}


def _cell_metrics(root: Path) -> dict[tuple, tuple[Path, dict]]:
    """Every cell's ``metrics/ablation/cell-*.json`` (what DVC tracks) with its path, by (encoder, threshold, person)."""
    cells = {}
    for path in sorted((root / METRICS_DIR).glob("cell-*.json")):
        payload = read_json(path)
        try:
            cells[(payload["encoder"], float(payload["threshold"]), bool(payload["person"]))] = (path, payload)
        except (KeyError, TypeError, ValueError):
            raise DataError(path, "not a cell's metrics file (encoder, threshold, person missing)") from None
    return cells


def grid_rows(params: Params, root: Path) -> list[dict]:
    """One row per cell of the current grid (``ablation`` group) and TTA setting, from the cells'
    DVC-tracked metrics (``metrics/ablation/cell-*.json``), so the table survives ``dvc pull`` and run-cache
    restores; each row keeps the ids of the cell's MLflow runs, where they can be compared. A cell
    that has not run, or whose file lacks its val scores, raises :class:`DataError` naming it."""
    if params.ablation is None:
        raise ConfigError("params.yaml", [("ablation", "required key is missing (the grid's encoders and thresholds)")])
    grid = params.ablation
    cells = _cell_metrics(root)
    rows, not_run = [], []
    for encoder in grid.encoders:
        for threshold in grid.thresholds:
            for person in grid.person:
                found = next((c for (e, t, p), c in cells.items() if e == encoder and math.isclose(t, threshold) and p == person), None)
                if found is None:
                    not_run.append(cell_name(encoder, threshold, person))
                    continue
                path, cell = found
                val = cell.get("val") if isinstance(cell.get("val"), dict) else {}
                for mode in ("plain", "tta"):
                    scores = val.get(mode)
                    if not isinstance(scores, dict) or not isinstance(scores.get("miou"), (int, float)):
                        raise DataError(path, f"no val mIoU for {mode!r} (val.{mode}.miou): re-run the cell with "
                                              f"`dvc repro -f -s pipelines/ablation/dvc.yaml:cell@{encoder}-{threshold:g}-{person}`")
                    rows.append({"encoder": encoder, "output_stride": cell.get("output_stride"), "threshold": threshold,
                                 "tta": mode == "tta", "person": person, "val_miou": float(scores["miou"]),
                                 "val_miou_without_person": scores.get("miou_without_person"),
                                 "run_id": (cell.get("mlflow_run_ids") or {}).get(mode)})
    if not_run:
        raise DataError(root / METRICS_DIR, f"cells not run: {', '.join(not_run)}: run `dvc repro pipelines/ablation/dvc.yaml`")
    return rows


def factor_effects(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean val mIoU at each level of each factor (over all the other factors' levels)."""
    effects: dict[str, dict[str, float]] = {}
    for factor in FACTORS:
        levels: dict[str, list[float]] = {}
        for row in rows:
            levels.setdefault(_level(factor, row[factor]), []).append(row["val_miou"])
        effects[factor] = {level: float(np.mean(values)) for level, values in levels.items()}
    return effects


def _level(factor: str, value) -> str:
    if factor in ("tta", "person"):
        return "yes" if value else "no"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _pct(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _strides_sentence(rows: list[dict]) -> str:
    strides = {row["encoder"]: row.get("output_stride") for row in rows}
    if not any(strides.values()):
        return ""
    return " Output stride: " + ", ".join(f"{encoder} {stride or '?'}" for encoder, stride in strides.items()) + "."


def ablation_markdown(rows: list[dict], threshold_key: str, tta_scales: list[float]) -> str:
    """``reports/ablation.md`` (pure: a test can feed it made-up rows)."""
    threshold_title = "IRNet thr." if threshold_key == "irnet.threshold" else "IRNet bg weight"
    lines = ["# wsss: the ablation grid (the paper's Table 3)", "",
             f"Val mIoU (%) of DeepLabv3+ per cell; the threshold column sets `{threshold_key}`; TTA = mean of logits over "
             f"image and mirror at scales {tta_scales}. Built from the cells' DVC-tracked metrics (`metrics/ablation/`)."
             + _strides_sentence(rows), "",
             f"| encoder | {threshold_title} | TTA | person | val mIoU | without the person class | paper (LID val) |",
             "|---|---:|---|---|---:|---:|---:|"]
    for row in sorted(rows, key=lambda r: (r["encoder"], r["threshold"], r["person"], r["tta"])):
        paper = PAPER_TABLE3.get((row["encoder"], row["threshold"], row["tta"], row["person"])) if threshold_key == "irnet.threshold" else None
        lines.append(f"| {row['encoder']} | {row['threshold']:g} | {_level('tta', row['tta'])} | {_level('person', row['person'])} | "
                     f"{_pct(row['val_miou'])} | {_pct(row['val_miou_without_person'])} | {_pct(paper)} |")
    best = max(rows, key=lambda r: r["val_miou"])
    lines += ["", f"Best cell: {best['encoder']}, {threshold_title.lower()} {best['threshold']:g}, TTA {_level('tta', best['tta'])}, "
              f"person {_level('person', best['person'])}: **{_pct(best['val_miou'])}**.", "",
              "## Effect of each factor", "", "Mean val mIoU (%) at each level, over every level of the other factors "
              "(`reports/ablation_effects.png`).", "", "| factor | level: mean val mIoU | spread |", "|---|---|---:|"]
    for factor, levels in factor_effects(rows).items():
        spread = max(levels.values()) - min(levels.values())
        described = ", ".join(f"{level}: {_pct(value)}" for level, value in levels.items())
        lines.append(f"| {factor} | {described} | {_pct(spread)} |")
    lines += ["", "## The paper's Table 3 (LID val mIoU %, ResNet encoders, IRNet background plane), for orientation", "",
              "| encoder | IRNet thr. | TTA | person | mIoU |", "|---|---:|---|---|---:|"]
    for (encoder, threshold, tta, person), value in PAPER_TABLE3.items():
        lines.append(f"| {encoder} | {threshold:g} | {_level('tta', tta)} | {_level('person', person)} | {_pct(value)} |")
    return "\n".join(lines) + "\n"


def effects_figure(rows: list[dict]):
    import matplotlib.pyplot as plt

    effects = factor_effects(rows)
    figure, axes = plt.subplots(1, len(effects), figsize=(3.0 * len(effects), 3.0), sharey=True)
    for axis, (factor, levels) in zip(axes, effects.items(), strict=True):
        names = list(levels)
        axis.bar(names, [100 * levels[n] for n in names], color="tab:blue")
        for position, name in enumerate(names):
            axis.text(position, 100 * levels[name], f"{100 * levels[name]:.1f}", ha="center", va="bottom", fontsize=8)
        axis.set_title(factor)
        axis.tick_params(axis="x", labelrotation=20)
    axes[0].set_ylabel("mean val mIoU (%)")
    figure.suptitle("Effect of each factor (mean over the other factors)")
    figure.tight_layout()
    return figure


def run_ablation_report(params: Params, root: Path) -> dict:
    import mlflow

    rows = grid_rows(params, root)
    threshold_key = f"irnet.{background_knob(params.irnet)}"
    text = ablation_markdown(rows, threshold_key, params.evaluate.tta_scales)
    atomic_write_bytes(root / REPORT, text.encode())
    figure = effects_figure(rows)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(root / EFFECTS_PLOT, buffer.getvalue())
    logged = flatten(params.ablation.model_dump(), "ablation.")
    with tracking.stage_run("ablation_report", params.tracking.experiment, logged, root=root):
        mlflow.log_figure(figure, "ablation_effects.png")
        mlflow.log_artifact(str(root / REPORT))
        mlflow.log_metrics({"best_val_miou": max(r["val_miou"] for r in rows), "cells": len(rows)})
    visualize.close(figure)
    return {"report": str(REPORT), "cells": len(rows)}
