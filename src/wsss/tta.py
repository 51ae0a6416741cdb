"""Test-time augmentation: the mean of the logits over {image, mirror} x scales (the paper's).

Each scale resizes the batch (bilinear), runs :func:`~wsss.models.segmenter.padded_forward` on
the image and its mirror in one batch, mirrors the second half back and resizes the logits to
the input's size; the prediction is the argmax of the mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsss import augment
from wsss.models.segmenter import padded_forward


def _resize(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(tensor.shape[-2:]) == size:
        return tensor
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)


def tta_logits(model: nn.Module, images: torch.Tensor, scales: Sequence[float], flip: bool = True) -> torch.Tensor:
    """Mean logits ``[N, C, H, W]`` over ``scales`` x {identity, horizontal mirror if ``flip``}."""
    if not scales:
        raise ValueError("tta_logits needs at least one scale")
    count = images.shape[0]
    height, width = images.shape[-2:]
    total: torch.Tensor | None = None
    for scale in scales:
        scaled = _resize(images, (max(1, round(height * scale)), max(1, round(width * scale))))
        logits = padded_forward(model, torch.cat([scaled, scaled.flip(-1)]) if flip else scaled)
        if flip:
            logits = logits[:count] + logits[count:].flip(-1)
        logits = _resize(logits, (height, width))
        total = logits if total is None else total + logits
    return total / (len(scales) * (2 if flip else 1))


@torch.no_grad()
def predict_labels(model: nn.Module, image: np.ndarray, scales: Sequence[float] | None = None) -> np.ndarray:
    """Class-id map (uint8 ``H x W``) of one RGB uint8 image; ``scales`` None = no TTA."""
    model.eval()
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    batch = augment.to_tensor(image)[None].to(device)
    logits = padded_forward(model, batch) if scales is None else tta_logits(model, batch, scales)
    return logits.argmax(1)[0].cpu().numpy().astype(np.uint8)
