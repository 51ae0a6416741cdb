"""Tiny VOC and LID trees written by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from wsss.io import write_mask_png


def write_jpeg(path: Path, height: int = 16, width: int = 20, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def mask_with(classes: list[int], height: int = 16, width: int = 20, border: bool = True) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    for position, class_id in enumerate(classes):
        mask[2:8, 2 + 5 * position : 6 + 5 * position] = class_id
    if border:
        mask[0, :] = 255  # VOC's void boundary
    return mask


def write_voc(root: Path, train: dict[str, list[int]], val: dict[str, list[int]]) -> Path:
    """A VOC2012-like tree; ``{id: classes in its mask}`` per list."""
    for index, (image_id, classes) in enumerate({**train, **val}.items()):
        write_jpeg(root / "JPEGImages" / f"{image_id}.jpg", seed=index)
        (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        write_mask_png(root / "SegmentationClass" / f"{image_id}.png", mask_with(classes))
    lists = root / "ImageSets/Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (lists / "val.txt").write_text("".join(f"{i}\n" for i in val))
    return root


LID_NAMES = {"1": "dog", "2": "person", "3": "bird"}


def write_lid(root: Path, train: list, val: dict[str, list[int]], idx_to_name: dict | None = None) -> Path:
    """A LID-like tree: train list ``[[relative_path, labels]]``, val list with empty labels and masks."""
    train_dir = root / "ILSVRC/Data/DET/train"
    train_dir.mkdir(parents=True, exist_ok=True)
    for index, (relative, _labels) in enumerate(train):
        if ".." not in relative:
            write_jpeg(train_dir / f"{relative}.JPEG", seed=index)
    (train_dir / "train.json").write_text(json.dumps(train))
    (train_dir / "idx_to_name.json").write_text(json.dumps(idx_to_name or LID_NAMES))
    val_dir = root / "LID_track1/val"
    (val_dir / "masks").mkdir(parents=True, exist_ok=True)
    for index, (name, classes) in enumerate(val.items()):
        write_jpeg(val_dir / f"{name}.JPEG", seed=100 + index)
        write_mask_png(val_dir / "masks" / f"{name}.png", mask_with(classes, border=False))
    (val_dir / "val.json").write_text(json.dumps([[name, []] for name in val]))
    return root
