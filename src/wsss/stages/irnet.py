"""The ``train_irnet`` stage (step 2): ``models/irnet/model.pt``, ``metrics/irnet.json``, the mean losses of
each epoch in ``plots/irnet/training.csv`` (a ``dvc plots`` curve); losses per step to MLflow; resumable
from ``checkpoints/irnet/last.pt``. The random walk that turns IRNet's
boundaries into pseudo masks is :mod:`wsss.stages.pseudo_masks`.
"""

from __future__ import annotations

from pathlib import Path

from wsss import checkpoint, distributed, provenance, tracking
from wsss.config import Params
from wsss.data.manifest import load_manifest
from wsss.io import read_json, write_csv, write_json
from wsss.irnet import LAST, IrDataset, build_irnet, train_irnet
from wsss.shards import MaskStore
from wsss.stages.common import unfinished_run
from wsss.stages.paths import CLASSIFIER_PATH, INDEX_FILE, IR_LABELS_DIR, IRNET_PATH, PREPARED_DIR, SPLITS_DIR

CHECKPOINT_DIR = Path("checkpoints/irnet")
IRNET_METRICS = Path("metrics/irnet.json")
IRNET_CURVE = Path("plots/irnet/training.csv")
# plots/irnet/training.csv: epoch, last step, then each loss's mean over the epoch (wsss.affinity's names)
CURVE_COLUMNS = ("epoch", "step", "total", "affinity", "displacement", "pos_fg", "pos_bg", "neg", "dp_fg", "dp_bg")
TRAIN_KEYS = ("backbone", "backbone_weights", "train_radius", "train_scales", "crop_size", "batch_size", "epochs",
              "lr_displacement", "lr_boundary", "momentum", "weight_decay", "augmentation")


def _cell(value) -> str:
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else f"{value:.6f}"


def run_train_irnet(params: Params, root: Path) -> dict:
    import mlflow

    train = load_manifest(root / SPLITS_DIR / "train.json")
    kept = set(read_json(root / IR_LABELS_DIR / INDEX_FILE)["ids"])
    records = [r for r in train.records if r.id in kept]
    hashes = tracking.input_hashes({"ir_labels": root / IR_LABELS_DIR, "classifier": root / CLASSIFIER_PATH, "prepared": root / PREPARED_DIR})
    config = {key: getattr(params.irnet, key) for key in TRAIN_KEYS}
    run_fingerprint = checkpoint.fingerprint(config, params.seed, hashes, *distributed.precision_fingerprint(),
                                             provenance.code_digest(__name__))

    def model_and_data():
        checkpoint.seed_everything(params.seed)
        model = build_irnet(params, root / CLASSIFIER_PATH)
        dataset = IrDataset(train, records, MaskStore(root / IR_LABELS_DIR), params.irnet.train_scales, params.irnet.crop_size,
                            params.irnet.augmentation, params.seed)
        return model, dataset

    if not distributed.current().is_main:  # a torchrun process but rank 0: trains, writes nothing
        return vars(train_irnet(params, *model_and_data(), root / CHECKPOINT_DIR, run_fingerprint))
    previous = checkpoint.load_if_compatible(root / CHECKPOINT_DIR / LAST, run_fingerprint)

    with tracking.stage_run("train_irnet", params.tracking.experiment, {"seed": params.seed, **{f"irnet.{k}": v for k, v in config.items()}},
                            root=root, hashes=hashes, resume_run_id=unfinished_run(previous, params.irnet.epochs)) as run:
        model, dataset = model_and_data()
        result = train_irnet(params, model, dataset, root / CHECKPOINT_DIR, run_fingerprint,
                             on_step=lambda step, losses: mlflow.log_metrics(losses, step=step),
                             extra_state={"mlflow_run_id": run.info.run_id})
        checkpoint.save(root / IRNET_PATH, {"model": model.state_dict(), "backbone": params.irnet.backbone,
                                            "backbone_weights": params.irnet.backbone_weights})
        metrics = {"images": len(records), "samples_per_epoch": len(dataset), "steps": result.steps, "final_losses": result.final_losses}
        write_csv(root / IRNET_CURVE, [{key: _cell(entry.get(key)) for key in CURVE_COLUMNS} for entry in result.history],
                  fieldnames=list(CURVE_COLUMNS))
        write_json(root / IRNET_METRICS, metrics)
        mlflow.set_tag("wsss.resumed_from_epoch", str(result.resumed_from))
        mlflow.log_artifact(str(root / IRNET_METRICS))
    return metrics
