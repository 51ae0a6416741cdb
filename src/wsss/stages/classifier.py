"""The ``train_classifier`` stage.

Outputs: ``models/classifier/model.pt`` (best epoch by val macro-F1), ``metrics/classifier.json``,
``plots/classifier/training.csv`` (dvc plots); ``checkpoints/classifier/`` (not a DVC output,
kept across runs) holds ``last.pt`` for resuming. MLflow gets, per epoch, the loss, micro-F1,
macro-F1 and per-class F1 on val, and the training curves as a picture. Under torchrun every
process trains; rank 0 alone logs and writes.
"""

from __future__ import annotations

import math

from pathlib import Path

from wsss import checkpoint, distributed, provenance, tracking, visualize
from wsss.classifier import BEST, LAST, TrainResult, train_classifier, trained_class_ids
from wsss.config import Params, flatten
from wsss.data.manifest import load_manifest
from wsss.io import write_csv, write_json
from wsss.models.classifier import classifier_state
from wsss.stages.common import unfinished_run
from wsss.stages.paths import CLASSIFIER_PATH, PREPARED_DIR, SPLITS_DIR

CHECKPOINT_DIR = Path("checkpoints/classifier")
METRICS = Path("metrics/classifier.json")
CURVE = Path("plots/classifier/training.csv")
_NOT_IN_FINGERPRINT = {"workers", "threads"}  # how fast, not what is computed


def stage_params(params: Params) -> dict:
    """Logged params: what the run computes (a resumed run may change workers and threads)."""
    return {"seed": params.seed, "data.drop_person_labels": params.data.drop_person_labels,
            **flatten(params.classifier.model_dump(exclude=_NOT_IN_FINGERPRINT), "classifier.")}


def training_curve_figure(result: TrainResult):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r.epoch for r in result.history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(epochs, [r.loss for r in result.history], marker="o")
    left.set(xlabel="epoch", ylabel="training BCE loss")
    right.plot(epochs, [r.micro_f1 for r in result.history], marker="o", label="val micro-F1")
    right.plot(epochs, [r.macro_f1 for r in result.history], marker="o", label="val macro-F1")
    right.axvline(result.best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best epoch {result.best_epoch}")
    right.set(xlabel="epoch", ylim=(0, 1))
    right.legend(loc="lower right")
    figure.tight_layout()
    return figure


def _finite(value: float) -> float | None:
    """A score for JSON: None where there is none (NaN is not JSON)."""
    return value if math.isfinite(value) else None


def _curve_rows(result: TrainResult) -> list[dict]:
    return [{"epoch": r.epoch, "loss": f"{r.loss:.6f}", "val_micro_f1": f"{r.micro_f1:.6f}", "val_macro_f1": f"{r.macro_f1:.6f}"}
            for r in result.history]


def run_train_classifier(params: Params, root: Path) -> TrainResult:
    import mlflow

    train = load_manifest(root / SPLITS_DIR / "train.json")
    val = load_manifest(root / SPLITS_DIR / "val.json")
    hashes = tracking.input_hashes({"splits": root / SPLITS_DIR, "prepared": root / PREPARED_DIR})
    config = params.classifier.model_dump(exclude=_NOT_IN_FINGERPRINT)
    run_fingerprint = checkpoint.fingerprint(config, params.seed, params.data.drop_person_labels, hashes,
                                             *distributed.precision_fingerprint(), provenance.code_digest(__name__))
    if not distributed.current().is_main:
        return train_classifier(params, train, val, root / CHECKPOINT_DIR, run_fingerprint)
    previous = checkpoint.load_if_compatible(root / CHECKPOINT_DIR / LAST, run_fingerprint)

    with tracking.stage_run("train_classifier", params.tracking.experiment, stage_params(params), root=root,
                            hashes=hashes, resume_run_id=unfinished_run(previous, params.classifier.epochs)) as run:
        names = train.class_names
        class_ids = trained_class_ids(train, params)

        def log_epoch(result) -> None:
            per_class = {f"val_f1_{names[c]}": f for c, f in zip(class_ids, result.per_class_f1, strict=True) if math.isfinite(f)}
            mlflow.log_metrics({"loss": result.loss, "val_micro_f1": result.micro_f1, "val_macro_f1": result.macro_f1,
                                "lr_head": result.lr, **per_class}, step=result.epoch)

        result = train_classifier(params, train, val, root / CHECKPOINT_DIR, run_fingerprint, log_epoch,
                                  extra_state={"mlflow_run_id": run.info.run_id})

        best = checkpoint.load(root / CHECKPOINT_DIR / BEST)
        state = classifier_state(best["model"], params.classifier.arch, params.classifier.extra_convs, result.class_ids,
                                 train.class_names, params.classifier.image_size)
        checkpoint.save(root / CLASSIFIER_PATH, state)

        metrics = {
            "best_epoch": result.best_epoch,
            "val_macro_f1": _finite(result.best.macro_f1),
            "val_micro_f1": _finite(result.best.micro_f1),
            # None: the class is in no val image and was never predicted (no F1, left out of the macro mean)
            "val_f1": {names[c]: (f if math.isfinite(f) else None) for c, f in zip(result.class_ids, result.best.per_class_f1, strict=True)},
            "epochs": len(result.history),
            "classes_excluded": [n for c, n in enumerate(names) if c and c not in result.class_ids],
        }
        write_csv(root / CURVE, _curve_rows(result))
        write_json(root / METRICS, metrics)
        mlflow.log_metrics({"best_epoch": result.best_epoch, "best_val_macro_f1": result.best.macro_f1,
                            "best_val_micro_f1": result.best.micro_f1})
        mlflow.set_tags({"wsss.output.model": str(CLASSIFIER_PATH), "wsss.resumed_from_epoch": str(result.resumed_from)})
        figure = training_curve_figure(result)
        mlflow.log_figure(figure, "training_curves.png")
        visualize.close(figure)
        mlflow.log_artifact(str(root / METRICS))
    return result
