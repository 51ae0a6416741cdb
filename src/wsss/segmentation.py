"""Step 3 training: DeepLabv3+ on (image, mask) pairs, the pseudo masks or (oracle) true masks.

Images and masks are resized to ``segmenter.image_size`` (mask: nearest) and augmented together;
geometric transforms fill the mask with 255 (ignored), never with background. Cross-entropy with
ignore index 255, the background class weighted by ``background_weight`` (:func:`segmentation_loss`);
SGD with momentum (or AdamW), weight decay and two learning rates (encoder ``lr``, decoder and head
``lr x lr_head_factor``), poly decay (power 0.9) over all steps. After every epoch the
mIoU on val (every image at its own size, :func:`wsss.models.segmenter.padded_forward`, no TTA)
picks the best epoch (``best.pt``), and ``last.pt`` records the whole state: a re-run with the
same fingerprint resumes and ends with the weights of an uninterrupted run (on a CPU, same seed),
because every epoch reseeds shuffling, augmentation, dropout and torch from ``(seed, epoch)``.
With ``ema_decay`` an exponential moving average of the weights (BatchNorm statistics included) follows
every step; the average, not the last step's weights, is scored on val and saved as the model. On noisy
pseudo masks it scores steadier and higher than the weights it averages (benchmarks/README.md).
With ``skip_disagreement``, after ``skip_after_epochs`` epochs every batch leaves out of the loss the
labelled pixels whose label the network contradicts with that confidence (:func:`skip_confident_disagreement`):
a pseudo mask's wrong labels stop pulling the network back once it has learned the class from the
images where that class is labelled right; the share of labelled pixels left out is in each epoch's record.
Under torchrun every process trains on its slice of the same global batches (DDP averages the
gradients) and scores its share of val; the confusion matrices are summed, so every process
takes the same best-epoch decision. Rank 0 writes the checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import Dataset
from tqdm import tqdm

from wsss import augment, checkpoint, distributed
from wsss.config import SegmenterParams
from wsss.errors import DataError
from wsss.io import IGNORE_INDEX, read_image
from wsss.shards import StoredMask, load_mask
from wsss.metrics import SegmentationScores, confusion_matrix, segmentation_scores
from wsss.models.segmenter import SegmenterSpec, build_segmenter, padded_forward
from wsss.tta import tta_logits

if TYPE_CHECKING:
    import albumentations as A

LAST = "last.pt"
BEST = "best.pt"
POLY_POWER = 0.9


def segmentation_transform(kind: str, image_size: int | None, scale_range: tuple[float, float] = (1.0, 1.0)) -> A.Compose:
    """Resize (mask nearest), zoom by a random factor in ``scale_range`` (DeepLab's random scaling:
    what lets test-time scales help), augment; image and mask move together, and the areas a
    transform uncovers get mask 255 (ignored), never background."""
    import albumentations as A  # here, not at the top: scoring a segmenter never needs it

    steps = augment.augmentations(kind)
    if tuple(scale_range) != (1.0, 1.0):
        steps = [A.Affine(scale=tuple(scale_range), keep_ratio=True, fill_mask=IGNORE_INDEX, p=1.0), *steps]
    resize = [A.Resize(image_size, image_size)] if image_size else []
    return A.Compose(resize + steps, seed=0)


def read_pair(image_path: Path, mask_path: Path | StoredMask, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An image and its mask (a PNG or a mask in shards); a mask of another size (or with values >=
    ``num_classes`` but 255) raises DataError."""
    image, mask = read_image(image_path), load_mask(mask_path)
    if mask.shape != image.shape[:2]:
        raise DataError(mask_path, f"mask is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is "
                                   f"{image.shape[1]}x{image.shape[0]}")
    if num_classes is not None:
        values = np.unique(mask)
        bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
        if bad.size:
            message = f"mask values {bad.tolist()} are neither class ids below {num_classes} nor {IGNORE_INDEX}"
            raise DataError(mask_path, message)
    return image, mask


class SegmentationDataset(Dataset):
    """(image, mask) pairs, resized and augmented together; augmentation seeded per (epoch, index)."""

    def __init__(self, image_paths: list[Path], mask_paths: list[Path | StoredMask], image_size: int | None, augmentation: str,
                 seed: int, num_classes: int | None = None, scale_range: tuple[float, float] = (1.0, 1.0)):
        if len(image_paths) != len(mask_paths):
            raise ValueError(f"{len(image_paths)} images but {len(mask_paths)} masks")
        self.image_paths, self.mask_paths = list(image_paths), list(mask_paths)
        self.transform = segmentation_transform(augmentation, image_size, scale_range)
        self.seed, self.num_classes = seed, num_classes
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = read_pair(self.image_paths[index], self.mask_paths[index], self.num_classes)
        sample_seed = checkpoint.derive_seed(self.seed, self.epoch, index)
        augmented = augment.apply(self.transform, image, sample_seed, mask=mask)
        return augment.to_tensor(augmented["image"]), torch.from_numpy(augmented["mask"].astype(np.int64))


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    val_miou: float
    lr: float
    skipped: float = 0.0  # share of the labelled pixels left out of the loss (skip_disagreement)


@dataclass
class SegmenterResult:
    best_epoch: int
    best_miou: float
    best_state: dict[str, torch.Tensor]
    history: list[EpochRecord] = field(default_factory=list)
    resumed_from: int | None = None
    steps: int = 0


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _same_size_batches(image_paths: list[Path], mask_paths: list[Path], num_classes: int, batch_size: int):
    """Consecutive pairs of one size, at most ``batch_size`` at a time: (images, masks) as arrays."""
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    for image_path, mask_path in zip(image_paths, mask_paths, strict=True):
        image, mask = read_pair(image_path, mask_path, num_classes)
        if images and (image.shape != images[0].shape or len(images) == batch_size):
            yield images, masks
            images, masks = [], []
        images.append(image)
        masks.append(mask)
    if images:
        yield images, masks


@torch.no_grad()
def predict_images(model: nn.Module, image_paths: list[Path], mask_paths: list[Path], num_classes: int,
                   batch_size: int = 8, tta_scales: Sequence[float] | None = None
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(image, mask, prediction)`` of every pair in order, each image at its own size
    (``tta_scales``: flip x scale TTA, None = plain); images of one size go through in batches."""
    if len(image_paths) != len(mask_paths):
        raise ValueError(f"{len(image_paths)} images but {len(mask_paths)} masks")
    model.eval()
    device = _model_device(model)
    for images, masks in _same_size_batches(image_paths, mask_paths, num_classes, batch_size):
        batch = torch.stack([augment.to_tensor(i) for i in images]).to(device)
        logits = padded_forward(model, batch) if tta_scales is None else tta_logits(model, batch, tta_scales)
        yield from zip(images, masks, logits.argmax(1).cpu().numpy().astype(np.uint8), strict=True)


def predict_pairs(model: nn.Module, image_paths: list[Path], mask_paths: list[Path], num_classes: int,
                  batch_size: int = 8, tta_scales: Sequence[float] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(mask, prediction)`` of every pair in order: :func:`predict_images` without the image."""
    for _, mask, prediction in predict_images(model, image_paths, mask_paths, num_classes, batch_size, tta_scales):
        yield mask, prediction


def validation_matrix(model: nn.Module, image_paths: list[Path], mask_paths: list[Path], num_classes: int,
                      batch_size: int = 8, tta_scales: Sequence[float] | None = None) -> np.ndarray:
    """The confusion matrix of ``model`` on every image at its own size (``tta_scales``: flip x
    scale TTA, None = plain)."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    for mask, prediction in predict_pairs(model, image_paths, mask_paths, num_classes, batch_size, tta_scales):
        matrix += confusion_matrix(mask, prediction, num_classes)
    return matrix


def evaluate_segmenter(model: nn.Module, image_paths: list[Path], mask_paths: list[Path], num_classes: int,
                       batch_size: int = 8, tta_scales: Sequence[float] | None = None) -> SegmentationScores:
    """Scores of ``model`` on every image at its own size (``tta_scales``: flip x scale TTA, None = plain)."""
    return segmentation_scores(validation_matrix(model, image_paths, mask_paths, num_classes, batch_size, tta_scales))


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """``encoder`` (pretrained in the paper: the base learning rate) and ``head`` (decoder, segmentation head)."""
    groups: dict[str, list[nn.Parameter]] = {"encoder": [], "head": []}
    for name, parameter in model.named_parameters():
        groups["encoder" if name.startswith("encoder.") else "head"].append(parameter)
    return groups


def make_optimizer(config: SegmenterParams, groups: list[dict]) -> torch.optim.Optimizer:
    """SGD with momentum (the paper, with ImageNet weights) or AdamW (from scratch: SGD at any
    learning rate learns the embedded data several times slower)."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, momentum=config.momentum, weight_decay=config.weight_decay)


def _score(miou: float) -> float:
    return miou if math.isfinite(miou) else -math.inf


def _resumable_state(checkpoint_dir: Path, run_fingerprint: str) -> dict | None:
    """``last.pt`` of this run, if ``best.pt`` is the one it records (else the best weights are lost: start over)."""
    state = checkpoint.load_if_compatible(checkpoint_dir / LAST, run_fingerprint)
    if state is None:
        return None
    best = checkpoint.load_if_compatible(checkpoint_dir / BEST, run_fingerprint)
    return state if best is not None and best.get("epoch") == state["best"]["epoch"] else None


def segmentation_loss(num_classes: int, background_weight: float = 1.0) -> nn.CrossEntropyLoss:
    """Pixel cross-entropy that skips 255, with class 0 (background) weighted by ``background_weight``
    (the mean is over the weighted pixels, torch's convention); 1.0 is the unweighted loss."""
    if background_weight == 1.0:
        return nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    weight = torch.ones(num_classes)
    weight[0] = background_weight
    return nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE_INDEX)


def skip_confident_disagreement(logits: torch.Tensor, masks: torch.Tensor, confidence: float) -> torch.Tensor:
    """``masks`` with :data:`IGNORE_INDEX` where a labelled pixel's most probable class (softmax of
    ``logits``, ``(N, C, H, W)``) is not its label and has probability ``confidence`` or more."""
    with torch.no_grad():
        probability, predicted = logits.detach().float().softmax(dim=1).max(dim=1)
        contradicted = (masks != IGNORE_INDEX) & (predicted != masks) & (probability >= confidence)
    return masks.masked_fill(contradicted, IGNORE_INDEX)


def weight_average(model: nn.Module, decay: float | None) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights and buffers (``decay`` per update), starting
    from a copy of them; None when ``decay`` is None."""
    if decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def train_segmenter(
    config: SegmenterParams,
    seed: int,
    spec: SegmenterSpec,
    train_set: Dataset,
    val_images: list[Path],
    val_masks: list[Path],
    checkpoint_dir: Path,
    run_fingerprint: str,
    encoder_weights: str = "none",
    on_epoch: Callable[[EpochRecord], None] | None = None,
    extra_state: dict | None = None,
    desc: str = "segmenter",
) -> SegmenterResult:
    """Train (or resume) DeepLabv3+ and return the history; ``best.pt`` and ``last.pt`` in ``checkpoint_dir``.

    ``on_epoch(record)`` runs after each epoch's checkpoint is on disk; ``extra_state`` (e.g. the MLflow
    run id) is stored in ``last.pt`` so that a resumed run can pick it up."""
    if len(train_set) < 2:
        raise ValueError(f"{desc}: at least two training images are needed, got {len(train_set)}")
    checkpoint_dir = Path(checkpoint_dir)
    context = distributed.current()
    torch.set_num_threads(context.cpu_threads(config.threads))
    device = context.device
    checkpoint.seed_everything(seed)
    model = build_segmenter(spec, encoder_weights)
    model.to(device)
    groups = parameter_groups(model)
    head_lr = config.lr * config.lr_head_factor
    optimizer = make_optimizer(config, [{"params": groups["encoder"], "lr": config.lr, "initial_lr": config.lr},
                                        {"params": groups["head"], "lr": head_lr, "initial_lr": head_lr}])
    drop_last = len(train_set) > config.batch_size
    steps_per_epoch = len(train_set) // config.batch_size if drop_last else 1
    total_steps = steps_per_epoch * config.epochs

    history: list[EpochRecord] = []
    best_epoch, best_miou = 0, math.nan
    start_epoch, step, resumed_from = 1, 0, None
    state = _resumable_state(checkpoint_dir, run_fingerprint)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history = [EpochRecord(**entry) for entry in state["history"]]
        best_epoch, best_miou = state["best"]["epoch"], state["best"]["miou"]
        step = state["step"]
        start_epoch = resumed_from = state["epoch"] + 1
    scaler = context.grad_scaler()
    if state is not None and scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    average = weight_average(model, config.ema_decay)
    if state is not None and average is not None:
        average.load_state_dict(state["average"])
    scored = average.module if average is not None else model  # what val scores and best.pt keeps

    loss_fn = segmentation_loss(spec.num_classes, config.background_weight).to(device)
    distributed.check_resume_agrees(start_epoch, checkpoint_dir, context)
    trained = distributed.wrap_model(model, context)
    val_share = distributed.shard_range(len(val_images), context)
    for epoch in range(start_epoch, config.epochs + 1):
        epoch_seed = checkpoint.derive_seed(seed, epoch)
        checkpoint.seed_everything(epoch_seed)
        train_set.epoch = epoch
        loader = distributed.training_loader(train_set, config.batch_size, drop_last, epoch_seed, config.workers, context,
                                             key="segmenter.batch_size")
        trained.train()
        total, seen, lr = 0.0, 0, optimizer.param_groups[0]["lr"]
        skipping = config.skip_disagreement is not None and epoch > config.skip_after_epochs
        labelled, skipped = 0, 0
        for images, masks in tqdm(loader, desc=f"{desc} epoch {epoch}/{config.epochs}", unit="batch", leave=False,
                                  disable=not context.is_main):
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * max(0.0, 1 - step / total_steps) ** POLY_POWER
            lr = optimizer.param_groups[0]["lr"]
            images, masks = images.to(device), masks.to(device)
            with context.autocast():
                logits = trained(images).float()
                if skipping:
                    kept = skip_confident_disagreement(logits, masks, config.skip_disagreement)
                    labelled += int((masks != IGNORE_INDEX).sum())
                    skipped += int((masks != IGNORE_INDEX).sum() - (kept != IGNORE_INDEX).sum())
                    masks = kept
                loss = loss_fn(logits, masks)
            distributed.optimizer_step(loss, optimizer, scaler, "segmenter", epoch)
            step += 1
            if average is not None:
                average.update_parameters(model)
            total += float(loss.detach()) * len(images)
            seen += len(images)

        distributed.sync_buffers(model, context)  # val scores the weights that rank 0 saves
        if average is not None:
            distributed.sync_buffers(scored, context)
        matrix = validation_matrix(scored, val_images[val_share.start : val_share.stop], val_masks[val_share.start : val_share.stop],
                                   spec.num_classes, config.batch_size)
        scores = segmentation_scores(distributed.all_reduce_sum(matrix, context))
        total, seen, labelled, skipped = distributed.all_reduce_sum(np.array([total, seen, labelled, skipped], dtype=np.float64), context)
        record = EpochRecord(epoch, float(total / max(seen, 1)), scores.miou, lr, float(skipped / labelled) if labelled else 0.0)
        history.append(record)
        if best_epoch == 0 or _score(record.val_miou) > _score(best_miou):
            best_epoch, best_miou = epoch, record.val_miou
            if context.is_main:
                checkpoint.save(checkpoint_dir / BEST, {"model": scored.state_dict(), "epoch": epoch, "miou": best_miou,
                                                        "fingerprint": run_fingerprint})
        if context.is_main:
            checkpoint.save(checkpoint_dir / LAST, {
                "fingerprint": run_fingerprint,
                "epoch": epoch,
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "history": [asdict(entry) for entry in history],
                "best": {"epoch": best_epoch, "miou": best_miou},
                **({"scaler": scaler.state_dict()} if scaler is not None else {}),
                **({"average": average.state_dict()} if average is not None else {}),
                **(extra_state or {}),
            })
        distributed.barrier(context)
        if on_epoch is not None:
            on_epoch(record)

    best_state = checkpoint.load(checkpoint_dir / BEST)["model"]
    return SegmenterResult(best_epoch, best_miou, best_state, history, resumed_from, step)
