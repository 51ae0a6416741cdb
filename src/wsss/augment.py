"""Image augmentation (albumentations) and the input normalisation every network shares.

``strong`` is the paper's "strong" augmentation: horizontal flip, shift-scale-rotate, Gauss noise,
one of {CLAHE, sharpen, brightness/contrast, gamma, median blur}, one of {RGB shift,
hue/saturation}. Geometric transforms fill the uncovered part of a mask (segmentation masks, IR
labels) with 255, the ignore value, never with background. (The authors' code also applies an elastic transform; it is left out: slow on a
CPU and of little use at 64 px.) Each sample gets its own seed, derived from
``(seed, epoch, index)``, so a run is repeatable whatever the number of loader workers, and a
resumed run sees exactly the augmentations an uninterrupted one would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from wsss.io import IGNORE_INDEX

if TYPE_CHECKING:
    import albumentations as A

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def augmentations(kind: str) -> list[A.BasicTransform]:
    # imported here: ~0.8 s, and the inference stages (which only normalise) never need it
    import albumentations as A

    if kind == "none":
        return []
    flip = [A.HorizontalFlip(p=0.5)]
    if kind == "flip":
        return flip
    if kind != "strong":
        raise ValueError(f"unknown augmentation {kind!r}")
    return flip + [
        # the area a shift or rotation uncovers is unknown: masks get 255 (ignored) there, never background
        A.Affine(scale=(0.8, 1.2), translate_percent=(-0.0625, 0.0625), rotate=(-30, 30), fill_mask=IGNORE_INDEX, p=0.4),
        A.GaussNoise(std_range=(0.02, 0.08), p=0.3),
        A.OneOf(
            [
                A.CLAHE(clip_limit=2.0),
                A.Sharpen(),
                A.RandomBrightnessContrast(),
                A.RandomGamma(),
                A.MedianBlur(blur_limit=3),
            ],
            p=0.5,
        ),
        A.OneOf([A.RGBShift(), A.HueSaturationValue()], p=0.5),
    ]


def build_transform(kind: str, image_size: int | None) -> A.Compose:
    """Resize (when ``image_size``), augment; normalisation is :func:`to_tensor`'s job."""
    import albumentations as A

    resize = [A.Resize(image_size, image_size)] if image_size else []
    return A.Compose(resize + augmentations(kind), seed=0)


def apply(transform: A.Compose, image: np.ndarray, seed: int, mask: np.ndarray | None = None) -> dict:
    """Run ``transform`` with its own seed (image and optional mask move together)."""
    transform.set_random_seed(seed)
    return transform(image=image) if mask is None else transform(image=image, mask=mask)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 ``H x W x 3`` -> float ``3 x H x W``, ImageNet mean/std normalised."""
    normalised = (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an RGB uint8 image to ``size = (width, height)``."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map to ``size = (width, height)``."""
    from PIL import Image

    return np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
