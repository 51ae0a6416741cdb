"""What each DVC stage does: read params, compute with the library, write outputs, log MLflow."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def _lazy(module: str, function: str) -> Callable[[Any, Path], Any]:
    def run(params, root: Path):
        import importlib

        return getattr(importlib.import_module(f"wsss.stages.{module}"), function)(params, root)

    run.module = f"wsss.stages.{module}"  # what the stage runs (its dvc.yaml code deps are checked against it)
    return run


STAGES: dict[str, Callable[[Any, Path], Any]] = {
    "prepare": _lazy("data", "run_prepare"),
    "split": _lazy("data", "run_split"),
    "train-classifier": _lazy("classifier", "run_train_classifier"),
    "cams": _lazy("cams", "run_cams"),
    "person-classifier": _lazy("person", "run_person_classifier"),
    "ir-labels": _lazy("ir_labels", "run_ir_labels"),
    "train-irnet": _lazy("irnet", "run_train_irnet"),
    "pseudo-masks": _lazy("pseudo_masks", "run_pseudo_masks"),
    "train-segmenter": _lazy("segmenter", "run_train_segmenter"),
    "oracle": _lazy("segmenter", "run_oracle"),
    "evaluate": _lazy("evaluate", "run_evaluate"),
    "report": _lazy("report", "run_report"),
}


def check_output_path(root: Path, path: Path, option: str) -> None:
    """A folder or file a stage replaces must be relative, inside the project and at least two
    levels deep (``ablation/masks/...``), so that a typo cannot make it replace the project, a
    top-level folder or anything outside."""
    from wsss.errors import ConfigError

    root = Path(root).resolve()
    resolved = (root / path).resolve()
    if path.is_absolute() or not resolved.is_relative_to(root) or len(resolved.relative_to(root).parts) < 2 \
            or resolved.relative_to(root).parts[0] in {".git", ".dvc"}:
        raise ConfigError("command line", [(option, f"{str(path)!r} must be a path inside the project, two levels deep or more "
                                                    "(e.g. ablation/masks/thr-1.6-person-false)")])


def _ablation(function: str, *names: str) -> Callable[[Any, Path, Any], Any]:
    """An ablation stage called with the command line's extra arguments (``--threshold`` ...)."""
    module, _, name = function.rpartition(".")

    def run(params, root: Path, args):
        import importlib

        for option in names:
            if isinstance(getattr(args, option), Path):
                check_output_path(root, getattr(args, option), f"--{option}")
        return getattr(importlib.import_module(f"wsss.stages.{module}"), name)(params, root, *(getattr(args, n) for n in names))

    run.module = f"wsss.stages.{module}"
    return run


ABLATION_STAGES: dict[str, Callable[[Any, Path, Any], Any]] = {
    "ablation-masks": _ablation("ablation.run_ablation_masks", "threshold", "out", "metrics"),
    "person-masks": _ablation("person.run_person_masks", "masks", "out", "metrics"),
    "ablation-cell": _ablation("ablation_cell.run_ablation_cell", "encoder", "threshold", "person", "masks", "model", "metrics"),
    "ablation-report": _ablation("ablation_report.run_ablation_report"),
}
