"""Class activation maps: multi-scale x flip inference, normalisation, storage, label maps.

For an image and the classes it is labelled with: the classifier's ReLU'd CAMs at each scale of
``cams.scales`` and for the image and its mirror (un-mirrored back) are upsampled to the stride-4
grid (``ceil(H/4) x ceil(W/4)``) and to full resolution, and summed; each class map is then divided
by its own maximum (``per_class``) or all by the image's maximum (``global``), plus 1e-5.

Scores and confidence: ``scores`` are the classifier's sigmoid outputs for the image at scale 1;
the image's *confidence* is the lowest score among its labelled classes, i.e. how sure the
classifier is of the least certain class the image is labelled with (0 when it has none). The
IRNet step keeps the images whose confidence exceeds ``irnet.confidence_cutoff`` (paper: 0.8).

Storage: float16 maps in shards of many images (:class:`CamStore`, :mod:`wsss.shards`), written with
fixed zip timestamps so the same maps give the same bytes (DVC sees no change); read with
``allow_pickle=False``. :func:`save_cams` / :func:`load_cams` keep one image in one ``.npz``.
"""

from __future__ import annotations

import io
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsss.errors import DataError
from wsss.io import atomic_write_bytes
from wsss.models.classifier import CamClassifier

EPSILON = 1e-5


@dataclass(frozen=True)
class ImageCams:
    class_ids: np.ndarray  # (C,) int: dataset class id of each map
    stride4: np.ndarray  # (C, ceil(H/4), ceil(W/4)) float, in [0, 1]
    full: np.ndarray  # (C, H, W) float, in [0, 1]
    scores: np.ndarray  # (K,) sigmoid score per trained class (see score_class_ids)
    score_class_ids: np.ndarray  # (K,)
    confidence: float


def stride4_size(height: int, width: int) -> tuple[int, int]:
    return math.ceil(height / 4), math.ceil(width / 4)


def _cams_per_scale(model: CamClassifier, images: torch.Tensor, scales: list[float]):
    """``(logits or None, CAMs [N, K, h, w])`` at each scale, the mirror's CAMs flipped back and added;
    the logits of the unflipped images at the first scale 1 (None at the other scales)."""
    count = images.shape[0]
    seen_scale_1 = False
    for scale in scales:
        scaled = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False, recompute_scale_factor=False)
        logits, cams = model.logits_and_cams(torch.cat([scaled, scaled.flip(-1)]))
        first = scale == 1.0 and not seen_scale_1
        seen_scale_1 = seen_scale_1 or first
        yield (logits[:count] if first else None), cams[:count] + cams[count:].flip(-1)


@torch.no_grad()
def multiscale_cams(model: CamClassifier, images: torch.Tensor, scales: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed CAMs of every output over scales x {image, mirror}.

    Returns ``(logits at scale 1 [N, K], stride-4 maps [N, K, h4, w4], full maps [N, K, H, W])``.
    """
    height, width = images.shape[-2:]
    small = stride4_size(height, width)
    logits_at_1 = stride4 = full = None
    for logits, cams in _cams_per_scale(model, images, scales):
        logits_at_1 = logits if logits is not None else logits_at_1
        up_small = F.interpolate(cams, size=small, mode="bilinear", align_corners=False)
        up_full = F.interpolate(cams, size=(height, width), mode="bilinear", align_corners=False)
        stride4 = up_small if stride4 is None else stride4 + up_small
        full = up_full if full is None else full + up_full
    if logits_at_1 is None:
        logits_at_1 = model(images)
    return logits_at_1, stride4, full


@torch.no_grad()
def labelled_cams(model: CamClassifier, images: torch.Tensor, scales: list[float], wanted: list[torch.Tensor]
                  ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """:func:`multiscale_cams` of only the outputs ``wanted[i]`` (indices) of image ``i``: the same maps,
    but only those classes are upsampled (to the stride-4 grid and to full size), not all K.

    Returns ``(logits at scale 1 [N, K], stride-4 maps [C_i, h4, w4] per image, full maps [C_i, H, W])``."""
    height, width = images.shape[-2:]
    small = stride4_size(height, width)
    logits_at_1 = None
    stride4: list[torch.Tensor | None] = [None] * len(wanted)
    full: list[torch.Tensor | None] = [None] * len(wanted)
    for logits, cams in _cams_per_scale(model, images, scales):
        logits_at_1 = logits if logits is not None else logits_at_1
        for row, indices in enumerate(wanted):
            chosen = cams[row : row + 1, indices.to(cams.device)]
            if chosen.shape[1] == 0:  # no labelled class the classifier knows (interpolate refuses 0 channels)
                stride4[row], full[row] = cams.new_zeros(0, *small), cams.new_zeros(0, height, width)
                continue
            up_small = F.interpolate(chosen, size=small, mode="bilinear", align_corners=False)[0]
            up_full = F.interpolate(chosen, size=(height, width), mode="bilinear", align_corners=False)[0]
            stride4[row] = up_small if stride4[row] is None else stride4[row] + up_small
            full[row] = up_full if full[row] is None else full[row] + up_full
    if logits_at_1 is None:
        logits_at_1 = model(images)
    return logits_at_1, stride4, full


def normalise(maps: np.ndarray, mode: str) -> np.ndarray:
    """Scale ``C x H x W`` maps into [0, 1]: per class (own max) or globally (image max)."""
    if maps.size == 0:
        return maps
    if mode == "per_class":
        peak = maps.reshape(maps.shape[0], -1).max(axis=1)[:, None, None]
    elif mode == "global":
        peak = maps.max()
    else:
        raise ValueError(f"unknown normalisation {mode!r}")
    return maps / (peak + EPSILON)


def confidence_score(scores: np.ndarray, score_class_ids: np.ndarray, labels: np.ndarray) -> float:
    """Lowest sigmoid score among the labelled classes (0 if the image has none)."""
    wanted = np.isin(score_class_ids, labels)
    return float(scores[wanted].min()) if wanted.any() else 0.0


def predicted_labels(scores: np.ndarray, score_class_ids: np.ndarray, threshold: float) -> tuple[int, ...]:
    """The classes an image is predicted to show: those scored ``>= threshold``, or the top-scored one
    when none is (every image of these datasets shows an object); empty only without scores."""
    if len(scores) == 0:
        return ()
    chosen = np.flatnonzero(scores >= threshold)
    if len(chosen) == 0:
        chosen = np.array([int(np.argmax(scores))])
    return tuple(sorted(int(score_class_ids[i]) for i in chosen))


def label_map(maps: np.ndarray, class_ids: np.ndarray, background_threshold: float) -> np.ndarray:
    """Argmax over ``[background plane at threshold, maps...]`` -> dataset class ids (uint8)."""
    height, width = maps.shape[-2:]
    stacked = np.concatenate([np.full((1, height, width), background_threshold, dtype=np.float32), maps.astype(np.float32)])
    lookup = np.concatenate([[0], class_ids]).astype(np.uint8)
    return lookup[stacked.argmax(axis=0)]


def cams_arrays(cams: ImageCams) -> dict[str, np.ndarray]:
    """The arrays one image's CAMs are stored as (float16 maps)."""
    return {
        "class_ids": cams.class_ids.astype(np.int16),
        "stride4": cams.stride4.astype(np.float16),
        "full": cams.full.astype(np.float16),
        "scores": cams.scores.astype(np.float32),
        "score_class_ids": cams.score_class_ids.astype(np.int16),
        "confidence": np.float32(cams.confidence),
    }


def cams_from_arrays(arrays, where: str | Path, expected_size: tuple[int, int] | None = None) -> ImageCams:
    """:class:`ImageCams` from stored arrays; missing arrays or inconsistent shapes raise
    :class:`DataError` naming ``where``."""
    try:
        cams = ImageCams(
            class_ids=np.asarray(arrays["class_ids"]).astype(np.int64),
            stride4=np.asarray(arrays["stride4"]).astype(np.float32),
            full=np.asarray(arrays["full"]).astype(np.float32),
            scores=np.asarray(arrays["scores"]),
            score_class_ids=np.asarray(arrays["score_class_ids"]).astype(np.int64),
            confidence=float(arrays["confidence"]),
        )
    except (KeyError, ValueError, TypeError) as error:
        raise DataError(where, f"not a valid CAM record ({error})") from None
    count = len(cams.class_ids)
    if cams.full.ndim != 3 or cams.full.shape[0] != count or cams.stride4.ndim != 3 or cams.stride4.shape[0] != count:
        raise DataError(where, f"CAM shapes {cams.full.shape} / {cams.stride4.shape} do not match {count} classes")
    if expected_size is not None:
        if cams.full.shape[1:] != tuple(expected_size) or cams.stride4.shape[1:] != stride4_size(*expected_size):
            raise DataError(where, f"CAM size {cams.full.shape[1:]} does not match its image {tuple(expected_size)}")
    return cams


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            payload = io.BytesIO()
            np.lib.format.write_array(payload, np.asarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, payload.getvalue())
    return buffer.getvalue()


def save_cams(path: Path, cams: ImageCams) -> None:
    """One image's CAMs as a single ``.npz`` (the stages store them in shards: :class:`CamStore`)."""
    atomic_write_bytes(path, _npz_bytes(cams_arrays(cams)))


def load_cams(path: Path, expected_size: tuple[int, int] | None = None) -> ImageCams:
    """Read one image's CAM file; a missing file or inconsistent shapes raise :class:`DataError`."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise DataError(path, "CAM file missing for a listed image (re-run the cams stage)") from None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        raise DataError(path, f"not a valid CAM file ({error})") from None
    return cams_from_arrays(arrays, path, expected_size)


class CamStore:
    """The CAMs of one split as the ``cams`` stage stores them: shards of many images (:mod:`wsss.shards`)."""

    def __init__(self, folder: Path):
        from wsss.shards import ShardReader

        self.folder = Path(folder)
        self.reader = ShardReader(self.folder)

    def load(self, image_id: str, expected_size: tuple[int, int] | None = None) -> ImageCams:
        """One image's CAMs; a missing image or inconsistent shapes raise :class:`DataError` naming the shard."""
        where = f"{self.reader.where(image_id)} ({image_id})"
        return cams_from_arrays(self.reader.arrays(image_id), where, expected_size)
