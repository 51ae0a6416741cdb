"""Step 1 training: the multi-label classifier whose CAMs localise the classes.

BCE with logits per class; Adam with two learning rates (backbone, extra layers + classifier)
and weight decay; a cosine or step scheduler; augmentation per :mod:`wsss.augment`. The best
epoch by macro-F1 on val is kept. ``last.pt`` is written after every epoch: a re-run with the
same params continues from it and ends with the weights an uninterrupted run would have (on a
CPU with the same seed), because every epoch reseeds shuffling, augmentation and torch from
``(seed, epoch)``.

Classes: the network has one output per *trained* class, i.e. every class but the person class
when ``data.drop_person_labels`` (it has no labels to learn from). ``class_ids`` maps output j
to dataset class id ``class_ids[j]``.

Under torchrun (:mod:`wsss.distributed`) every process trains on its slice of the same global
batches (DDP averages the gradients) and scores its share of val; the F1 is computed on the
gathered probabilities, so every process takes the same best-epoch decision. Checkpoints are
written by rank 0.
"""

from __future__ import annotations

import math

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from wsss import augment, checkpoint, distributed
from wsss.config import ClassifierParams, Params
from wsss.data.manifest import ImageRecord, Manifest
from wsss.io import read_image
from wsss.metrics import multilabel_f1
from wsss.models.classifier import CamClassifier, build_classifier

LAST = "last.pt"
BEST = "best.pt"


def trained_class_ids(manifest: Manifest, params: Params) -> list[int]:
    """Dataset class ids the classifier learns (all but person when its labels are dropped)."""
    dropped = {manifest.person_class} if params.data.drop_person_labels and manifest.person_class else set()
    return [c for c in range(1, manifest.num_classes) if c not in dropped]


def label_targets(records: list[ImageRecord], class_ids: list[int]) -> np.ndarray:
    """Multi-hot targets ``N x len(class_ids)``; labels outside ``class_ids`` are ignored."""
    column = {c: j for j, c in enumerate(class_ids)}
    targets = np.zeros((len(records), len(class_ids)), dtype=np.float32)
    for row, record in enumerate(records):
        for label in record.labels:
            if label in column:
                targets[row, column[label]] = 1.0
    return targets


class ClassificationDataset(Dataset):
    """Images of a manifest with multi-hot targets; augmentation seeded per (epoch, index)."""

    def __init__(self, manifest: Manifest, class_ids: list[int], transform, seed: int):
        self.manifest = manifest
        self.records = list(manifest.records)
        self.targets = torch.from_numpy(label_targets(self.records, class_ids))
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = read_image(self.manifest.image_path(self.records[index]))
        augmented = augment.apply(self.transform, image, checkpoint.derive_seed(self.seed, self.epoch, index))
        return augment.to_tensor(augmented["image"]), self.targets[index]


@dataclass
class EpochResult:
    epoch: int
    loss: float
    micro_f1: float
    macro_f1: float
    per_class_f1: list[float]
    lr: float


@dataclass
class TrainResult:
    class_ids: list[int]
    best_epoch: int
    best: EpochResult
    history: list[EpochResult] = field(default_factory=list)
    resumed_from: int | None = None


def make_optimizer(model: CamClassifier, config: ClassifierParams) -> torch.optim.Optimizer:
    groups = model.parameter_groups()
    return torch.optim.Adam(
        [{"params": groups["backbone"], "lr": config.lr_backbone}, {"params": groups["head"], "lr": config.lr_head}],
        weight_decay=config.weight_decay,
    )


def make_scheduler(optimizer: torch.optim.Optimizer, config: ClassifierParams):
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


@torch.no_grad()
def predict_probabilities(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    probabilities, targets = [], []
    for images, batch_targets in loader:
        probabilities.append(torch.sigmoid(model(images.to(device))).cpu().numpy())
        targets.append(batch_targets.numpy())
    return np.concatenate(probabilities), np.concatenate(targets)


def train_classifier(
    params: Params,
    train: Manifest,
    val: Manifest,
    checkpoint_dir: Path,
    run_fingerprint: str,
    on_epoch: Callable[[EpochResult], None] | None = None,
    extra_state: dict | None = None,
) -> TrainResult:
    """Train (or resume) and return the history; ``best.pt`` and ``last.pt`` in ``checkpoint_dir``.

    ``on_epoch(result)`` runs after each epoch's checkpoint is on disk; ``extra_state`` (e.g. the
    MLflow run id) is stored in ``last.pt`` so that a resumed run can pick it up."""
    config = params.classifier
    context = distributed.current()
    torch.set_num_threads(context.cpu_threads(config.threads))
    device = context.device
    class_ids = trained_class_ids(train, params)
    checkpoint.seed_everything(params.seed)
    model = build_classifier(config.arch, len(class_ids), config.extra_convs, config.weights).to(device)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config)
    scaler = context.grad_scaler()

    history: list[EpochResult] = []
    best_macro, best_epoch = -1.0, 0
    start_epoch, resumed_from = 1, None
    state = checkpoint.load_if_compatible(checkpoint_dir / LAST, run_fingerprint)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = [EpochResult(**entry) for entry in state["history"]]
        best_macro, best_epoch = state["best_macro_f1"], state["best_epoch"]
        start_epoch = resumed_from = state["epoch"] + 1
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])

    train_set = ClassificationDataset(train, class_ids, augment.build_transform(config.augmentation, config.image_size), params.seed)
    val_set = ClassificationDataset(val, class_ids, augment.build_transform("none", config.image_size), params.seed)
    val_span = distributed.shard_range(len(val_set), context)
    val_loader = DataLoader(Subset(val_set, val_span) if context.distributed else val_set, batch_size=config.batch_size,
                            num_workers=config.workers)
    loss_fn = nn.BCEWithLogitsLoss()
    distributed.check_resume_agrees(start_epoch, checkpoint_dir, context)
    trained = distributed.wrap_model(model, context)

    for epoch in range(start_epoch, config.epochs + 1):
        epoch_seed = checkpoint.derive_seed(params.seed, epoch)
        checkpoint.seed_everything(epoch_seed)
        train_set.epoch = epoch
        loader = distributed.training_loader(train_set, config.batch_size, len(train_set) > config.batch_size, epoch_seed,
                                             config.workers, context, key="classifier.batch_size")
        trained.train()
        total, seen = 0.0, 0
        for images, targets in tqdm(loader, desc=f"classifier epoch {epoch}/{config.epochs}", unit="batch", leave=False,
                                    disable=not context.is_main):
            images, targets = images.to(device), targets.to(device)
            with context.autocast():
                loss = loss_fn(trained(images).float(), targets)
            distributed.optimizer_step(loss, optimizer, scaler, "classifier", epoch)
            total += float(loss.detach()) * len(images)
            seen += len(images)
        lr = optimizer.param_groups[1]["lr"]
        scheduler.step()

        distributed.sync_buffers(model, context)  # val scores the weights that rank 0 saves
        if len(val_span):
            probabilities, targets = predict_probabilities(model, val_loader, device)
        else:  # fewer val images than processes
            probabilities = targets = np.zeros((0, len(class_ids)), dtype=np.float32)
        probabilities, targets = distributed.gather_rows(probabilities, context), distributed.gather_rows(targets, context)
        scores = multilabel_f1(probabilities, targets)
        total, seen = distributed.all_reduce_sum(np.array([total, seen], dtype=np.float64), context)
        result = EpochResult(epoch, float(total / max(seen, 1)), scores.micro, scores.macro, scores.per_class.tolist(), lr)
        history.append(result)
        score = result.macro_f1 if math.isfinite(result.macro_f1) else -math.inf  # NaN: no class to score
        if score > best_macro or not best_epoch:
            best_macro, best_epoch = score, epoch
            if context.is_main:
                checkpoint.save(checkpoint_dir / BEST, {"model": model.state_dict(), "epoch": epoch, "fingerprint": run_fingerprint})
        last = {
            "fingerprint": run_fingerprint,
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "history": [vars(entry) for entry in history],
            "best_macro_f1": best_macro,
            "best_epoch": best_epoch,
            **({"scaler": scaler.state_dict()} if scaler is not None else {}),
            **(extra_state or {}),
        }
        if context.is_main:
            checkpoint.save(checkpoint_dir / LAST, last)
        distributed.barrier(context)
        if on_epoch is not None:
            on_epoch(result)

    return TrainResult(class_ids, best_epoch, history[best_epoch - 1], history, resumed_from)
