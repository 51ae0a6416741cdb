"""Helpers of the ablation stages (kept apart so that each stage's DVC dependencies stay its own)."""

from __future__ import annotations

from pathlib import Path

from wsss.config import IrnetParams
from wsss.data.manifest import Manifest, load_manifest
from wsss.stages.paths import SPLITS_DIR


def load_splits(root: Path, names=("train", "val")) -> dict[str, Manifest]:
    return {name: load_manifest(root / SPLITS_DIR / f"{name}.json") for name in names}


def unfinished_run(previous: dict | None, epochs: int) -> str | None:
    """The MLflow run to continue: that of a training killed before its last epoch. A finished
    training re-run (for a param that does not change the weights) gets a run of its own, as
    MLflow does not let a run's params change."""
    if previous is None or previous.get("epoch", 0) >= epochs:
        return None
    return previous.get("mlflow_run_id")


def background_knob(walk: IrnetParams) -> str:
    """The IRNet param a Table-3 threshold sets: ``threshold`` (plane) or ``bg_weight`` (walk)."""
    return "threshold" if walk.background == "plane" else "bg_weight"


def cell_name(encoder: str, threshold: float, person: bool) -> str:
    return f"{encoder}-thr-{threshold:g}-person-{'yes' if person else 'no'}"

