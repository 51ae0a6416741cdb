"""Step 2 training: IRNet on the IR labels of the confident images.

The training set is every kept image at every scale of ``irnet.train_scales`` (the paper enlarges
the set with scales 0.5, 1, 1.5, 2), randomly cropped (or padded: image 0, label 255) to
``irnet.crop_size``, augmented, its label reduced to the stride-4 grid (nearest). Loss:
``L_aff + L_dp`` over the pairs within ``irnet.train_radius`` (:mod:`wsss.affinity`). SGD with
momentum, two learning rates (displacement branch, boundary branch), weight decay, poly decay
(power 0.9) over all steps. ``last.pt`` after every epoch; a re-run with the same params resumes.
Every epoch reseeds from ``(seed, epoch)``, so a resumed run ends with the same weights.
Under torchrun every process trains on its slice of the same global batches (DDP averages the
gradients; the frozen backbone gets none); rank 0 writes the checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from wsss import augment, checkpoint, distributed
from wsss.affinity import affinity_loss, displacement_loss, half_plane_offsets, pair_affinities, pair_masks
from wsss.config import Params
from wsss.data.manifest import ImageRecord, Manifest
from wsss.io import IGNORE_INDEX, read_image, read_mask
from wsss.models.classifier import load_trained_classifier
from wsss.models.irnet import IRNet, classifier_stages, resnet50_stages
from wsss.shards import MaskStore

LAST = "last.pt"
POLY_POWER = 0.9


def build_irnet(params: Params, classifier_path: Path) -> IRNet:
    if params.irnet.backbone == "resnet50":
        return IRNet(resnet50_stages(params.irnet.backbone_weights))
    classifier, _ = load_trained_classifier(classifier_path)
    return IRNet(classifier_stages(classifier))


def random_crop(image: np.ndarray, label: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Crop (or pad: image 0, label 255) both to ``size x size`` at one random place."""
    height, width = label.shape
    out_image = np.zeros((size, size, 3), dtype=image.dtype)
    out_label = np.full((size, size), IGNORE_INDEX, dtype=label.dtype)
    top = int(rng.integers(0, max(height - size, 0) + 1))
    left = int(rng.integers(0, max(width - size, 0) + 1))
    place_top = int(rng.integers(0, max(size - height, 0) + 1))
    place_left = int(rng.integers(0, max(size - width, 0) + 1))
    h, w = min(size, height), min(size, width)
    out_image[place_top : place_top + h, place_left : place_left + w] = image[top : top + h, left : left + w]
    out_label[place_top : place_top + h, place_left : place_left + w] = label[top : top + h, left : left + w]
    return out_image, out_label


def grid_labels(label: torch.Tensor) -> torch.Tensor:
    """Reduce ``[N, H, W]`` labels to the stride-4 grid ``ceil(H/4) x ceil(W/4)`` (nearest)."""
    height, width = label.shape[-2:]
    size = ((height + 3) // 4, (width + 3) // 4)
    return F.interpolate(label[:, None].float(), size=size, mode="nearest")[:, 0].long()


class IrDataset(Dataset):
    """(image, IR label) of every kept image at every training scale; the labels come from the
    ``ir_labels`` stage's shards (a :class:`MaskStore`) or from a folder of ``<id>.png`` files."""

    def __init__(self, manifest: Manifest, records: list[ImageRecord], labels: MaskStore | Path, scales: list[float], crop: int,
                 kind: str, seed: int):
        self.manifest, self.labels, self.crop, self.seed = manifest, labels, crop, seed
        self.samples = [(record, scale) for record in records for scale in scales]
        self.transform = augment.build_transform(kind, None)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        record, scale = self.samples[index]
        image = read_image(self.manifest.image_path(record))
        if isinstance(self.labels, MaskStore):
            label = self.labels.load(record.id, expected_size=image.shape[:2])
        else:
            label = read_mask(self.labels / f"{record.id}.png")
        if scale != 1.0:
            size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
            image, label = augment.resize_image(image, size), augment.resize_mask(label, size)
        seed = checkpoint.derive_seed(self.seed, self.epoch, index)
        augmented = augment.apply(self.transform, image, seed, mask=label)
        image, label = random_crop(augmented["image"], augmented["mask"], self.crop, np.random.default_rng(seed))
        return augment.to_tensor(image), torch.from_numpy(label.astype(np.int64))


@dataclass
class IrnetResult:
    steps: int
    epochs: int
    final_losses: dict[str, float]  # the last batch's
    history: list[dict] = field(default_factory=list)  # per epoch: epoch, step and the mean of each loss
    resumed_from: int | None = None


def irnet_losses(model: IRNet, images: torch.Tensor, labels: torch.Tensor, offsets) -> dict[str, torch.Tensor]:
    boundary_logits, displacement = (output.float() for output in model(images))  # the losses in fp32 under autocast
    grid = grid_labels(labels)
    masks = pair_masks(grid, offsets)
    affinities = pair_affinities(torch.sigmoid(boundary_logits), offsets)
    losses = {**affinity_loss(affinities, masks), **displacement_loss(displacement, masks, offsets)}
    losses["total"] = losses["affinity"] + losses["displacement"]
    return losses


def train_irnet(
    params: Params,
    model: IRNet,
    dataset: IrDataset,
    checkpoint_dir: Path,
    run_fingerprint: str,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    on_epoch: Callable[[int], None] | None = None,
    extra_state: dict | None = None,
) -> IrnetResult:
    config = params.irnet
    context = distributed.current()
    torch.set_num_threads(context.cpu_threads(config.threads))
    device = context.device
    model.to(device)
    groups = model.parameter_groups()
    optimizer = torch.optim.SGD(
        [{"params": groups["displacement"], "lr": config.lr_displacement, "initial_lr": config.lr_displacement},
         {"params": groups["boundary"], "lr": config.lr_boundary, "initial_lr": config.lr_boundary}],
        momentum=config.momentum, weight_decay=config.weight_decay,
    )
    steps_per_epoch = max(1, len(dataset) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    offsets = half_plane_offsets(config.train_radius)
    start_epoch, step, history, resumed_from = 1, 0, [], None
    state = checkpoint.load_if_compatible(checkpoint_dir / LAST, run_fingerprint)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = resumed_from = state["epoch"] + 1
        step, history = state["step"], state["history"]
    scaler = context.grad_scaler()
    if state is not None and scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])

    distributed.check_resume_agrees(start_epoch, checkpoint_dir, context)
    trained = distributed.wrap_model(model, context)
    # the last batch's losses (metrics/irnet.json's final_losses), kept by the checkpoint for a run resumed after its last epoch
    losses: dict[str, float] = dict(state.get("last_losses", {})) if state is not None else {}
    for epoch in range(start_epoch, config.epochs + 1):
        epoch_seed = checkpoint.derive_seed(params.seed, epoch)
        checkpoint.seed_everything(epoch_seed)
        dataset.epoch = epoch
        loader = distributed.training_loader(dataset, config.batch_size, True, epoch_seed, config.workers, context,
                                             key="irnet.batch_size")
        trained.train()
        epoch_sums: dict[str, float] = {}
        for images, labels in tqdm(loader, desc=f"irnet epoch {epoch}/{config.epochs}", unit="batch", leave=False,
                                   disable=not context.is_main):
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * (1 - step / total_steps) ** POLY_POWER
            with context.autocast():
                batch_losses = irnet_losses(trained, images.to(device), labels.to(device), offsets)
            distributed.optimizer_step(batch_losses["total"], optimizer, scaler, "irnet", epoch)
            step += 1
            losses = {name: float(value.detach()) for name, value in batch_losses.items()}
            if context.distributed:  # the global batch's losses: the mean over processes
                losses = {name: distributed.all_reduce_mean(value, context) for name, value in losses.items()}
            if on_step is not None:
                on_step(step, losses)
            for name, value in losses.items():
                epoch_sums[name] = epoch_sums.get(name, 0.0) + value
        batches = max(1, len(loader))
        history.append({"epoch": epoch, "step": step, **{name: total / batches for name, total in epoch_sums.items()}})
        if context.is_main:
            checkpoint.save(checkpoint_dir / LAST, {"fingerprint": run_fingerprint, "epoch": epoch, "step": step,
                                                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                                    "history": history, "last_losses": losses,
                                                    **({"scaler": scaler.state_dict()} if scaler else {}),
                                                    **(extra_state or {})})
        distributed.barrier(context)
        if on_epoch is not None:
            on_epoch(epoch)
    return IrnetResult(step, config.epochs, losses, history, resumed_from)
