"""Is the embedded dataset learnable on a CPU in minutes? Prints a table per epoch.

Trains a plain 8-layer CNN (output stride 8, GAP, linear; BCE per class) from scratch on the
``split`` stage's train manifest and reports image-level F1 on val, person class excluded (it has
no training labels). A calibration of the dataset's difficulty, not the product's classifier.

    python benchmarks/embedded_learnability.py --epochs 8 --threads 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wsss.data.manifest import load_manifest
from wsss.io import read_image


def load_split(path: Path, num_classes: int, person: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    manifest = load_manifest(path)
    images = np.stack([read_image(manifest.image_path(r)) for r in manifest.records])
    targets = np.zeros((len(manifest.records), num_classes - 1), dtype=np.float32)
    for row, record in enumerate(manifest.records):
        for label in record.labels:
            if label != person:
                targets[row, label - 1] = 1
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.25, torch.from_numpy(targets)


def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def small_cnn(num_outputs: int) -> nn.Module:
    return nn.Sequential(
        block(3, 32), block(32, 32, 2), block(32, 64), block(64, 64, 2), block(64, 128), block(128, 128, 2),
        block(128, 128), block(128, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_outputs),
    )


def f1_scores(logits: torch.Tensor, targets: torch.Tensor, keep: list[int]) -> tuple[float, float, list[float]]:
    predicted = (logits.sigmoid() > 0.5).float()[:, keep]
    targets = targets[:, keep]
    tp = (predicted * targets).sum(0)
    fp = (predicted * (1 - targets)).sum(0)
    fn = ((1 - predicted) * targets).sum(0)
    per_class = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
    micro = 2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp(min=1)
    return float(micro), float(per_class.mean()), per_class.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", default="data/splits")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    splits = Path(args.splits)
    probe = load_manifest(splits / "train.json")
    person = probe.person_class
    x_train, y_train = load_split(splits / "train.json", probe.num_classes, person)
    x_val, y_val = load_split(splits / "val.json", probe.num_classes, person)
    keep = [c - 1 for c in range(1, probe.num_classes) if c != person]
    model = small_cnn(probe.num_classes - 1)
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-5)
    loss_fn = nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(args.seed)
    print(f"train {len(x_train)} images, val {len(x_val)}, {x_train.shape[-1]} px, {args.threads} threads")
    print("| epoch | loss | val micro-F1 | val macro-F1 | seconds |")
    print("|---:|---:|---:|---:|---:|")
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        total = 0.0
        for begin in range(0, len(order), args.batch):
            index = order[begin : begin + args.batch]
            batch = x_train[index]
            flip = torch.rand(len(index), generator=generator) < 0.5
            batch[flip] = batch[flip].flip(-1)
            loss = loss_fn(model(batch)[:, keep], y_train[index][:, keep])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(index)
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(x_val[i : i + 256]) for i in range(0, len(x_val), 256)])
        micro, macro, per_class = f1_scores(logits, y_val, keep)
        print(f"| {epoch} | {total / len(x_train):.3f} | {micro:.3f} | {macro:.3f} | {time.perf_counter() - start:.0f} |")
    names = [probe.class_names[c + 1] for c in keep]
    print("\nval F1 per class, last epoch: " + ", ".join(f"{n} {f:.2f}" for n, f in zip(names, per_class, strict=True)))


if __name__ == "__main__":
    main()
