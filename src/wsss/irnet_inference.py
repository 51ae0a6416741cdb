"""IRNet's inference (step 2): boundary maps, the random walk of the CAMs and the pseudo masks,
on the device the caller names (``compute.device`` in the stages: a GPU runs IRNet and the walk,
:func:`wsss.random_walk.propagate_many`); images are read and walked ``compute.chunk_size`` at a time, so
memory follows the batch, not the dataset. Used by the ``pseudo_masks`` stage, the ablation's
masks and the sweep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from wsss import augment, checkpoint
from wsss.cam import CamStore, ImageCams
from wsss.config import IrnetParams, Params
from wsss.crf import CrfTask, crf_many
from wsss.data.manifest import ImageRecord, Manifest
from wsss.io import read_image
from wsss.irnet import build_irnet
from wsss.random_walk import floor_background, propagate_many, pseudo_mask, walk_seeds

def _enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    return image if scale == 1 else augment.resize_image(image, (image.shape[1] * scale, image.shape[0] * scale))


def _walk_input(cams, grid: torch.Size, scale: int) -> torch.Tensor:
    """The CAMs on the walk's grid: the stored stride-4 maps, or (enlarged image) the
    full-resolution maps averaged down to the finer grid."""
    if scale == 1:
        return torch.from_numpy(cams.stride4)
    full = torch.from_numpy(cams.full)
    if full.shape[0] == 0:
        return torch.zeros(0, *grid)
    return torch.nn.functional.adaptive_avg_pool2d(full[None], tuple(grid))[0]


def model_device(model: torch.nn.Module) -> torch.device:
    """The device ``model``'s parameters are on."""
    return next(model.parameters()).device


def _on_grid(full_map: np.ndarray, grid: torch.Size) -> torch.Tensor:
    """A full-resolution map averaged down to the walk's grid."""
    return torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(np.ascontiguousarray(full_map, dtype=np.float32))[None, None],
                                                   tuple(grid))[0, 0]


def walk_chunk(model, chunk_images: list[np.ndarray], chunk_cams: list, walk: IrnetParams,
               chunk_floors: list[np.ndarray | None] | None = None) -> list[torch.Tensor]:
    """The random walk of one chunk of images together, on the model's device: walked maps on the
    walk's grid (a walked background first when ``walk.background == "walk"``). ``chunk_floors``: per
    image ``None`` or a full-resolution floor of the walked background's seed (:func:`floor_background`;
    no effect under ``background: plane``)."""
    device = model_device(model)
    boundaries = [model.boundary_map(augment.to_tensor(_enlarge(img, walk.infer_scale))[None].to(device))[0] for img in chunk_images]
    seeds = [walk_seeds(_walk_input(c, b.shape, walk.infer_scale).to(device), walk.background) for c, b in zip(chunk_cams, boundaries, strict=True)]
    if chunk_floors is not None and walk.background == "walk":
        seeds = [seed if floor is None or seed.shape[0] < 2 else floor_background(seed, _on_grid(floor, boundary.shape).to(device))
                 for seed, floor, boundary in zip(seeds, chunk_floors, boundaries, strict=True)]
    return propagate_many(seeds, boundaries, walk.infer_radius, walk.beta, walk.exp_times)


def masks_from_walk(walked: list[torch.Tensor], chunk_images: list[np.ndarray], chunk_cams: list, walk: IrnetParams) -> list[np.ndarray]:
    """The walk's last step (background plane or weight, argmax): label maps before any CRF.
    Only this step reads ``threshold`` and ``bg_weight``, so a sweep over them reuses ``walked``."""
    return [pseudo_mask(result, cam.class_ids, image.shape[:2], walk.threshold, upsample=4 // walk.infer_scale,
                        background=walk.background, bg_weight=walk.bg_weight)
            for image, cam, result in zip(chunk_images, chunk_cams, walked, strict=True)]


@dataclass(frozen=True)
class PseudoMask:
    """One image's pseudo mask, with what it was made from."""

    record: ImageRecord
    image: np.ndarray
    cams: ImageCams
    walked: np.ndarray  # label map of the walk, before any CRF
    mask: np.ndarray  # the pseudo mask (after the CRF with ``irnet.post_crf``)


def pseudo_masks(model, manifest: Manifest, cams: CamStore | Path, params: Params, desc: str = "pseudo masks",
                 show: bool = True, background_floor: Callable[[ImageRecord, tuple[int, int]], np.ndarray | None] | None = None) -> Iterator[PseudoMask]:
    """The pseudo mask of every image of ``manifest`` (CAMs from a :class:`CamStore` or the shards in
    that folder), walked ``compute.chunk_size`` images at a time, in manifest order. ``background_floor(record, image size)``:
    ``None`` or a full-resolution floor of that image's background seed (:func:`walk_chunk`)."""
    walk = params.irnet
    records = manifest.records
    store = cams if isinstance(cams, CamStore) else CamStore(cams)
    size = params.compute.chunk_size
    for start in tqdm(range(0, len(records), size), desc=desc, unit="batch", disable=not show):
        chunk = records[start : start + size]
        images = [read_image(manifest.image_path(r)) for r in chunk]
        chunk_cams = [store.load(r.id, expected_size=img.shape[:2]) for r, img in zip(chunk, images, strict=True)]
        with torch.no_grad():
            floors = None if background_floor is None else [background_floor(r, img.shape[:2]) for r, img in zip(chunk, images, strict=True)]
            walked = masks_from_walk(walk_chunk(model, images, chunk_cams, walk, floors), images, chunk_cams, walk)
        masks = walked
        if walk.post_crf:
            tasks = [CrfTask(r.id, img, m) for r, img, m in zip(chunk, images, walked, strict=True)]
            masks = [refined for _, refined in crf_many(tasks, params.crf)]
        yield from (PseudoMask(*fields) for fields in zip(chunk, images, chunk_cams, walked, masks, strict=True))


def load_irnet(params: Params, path: Path, classifier_path: Path, device: torch.device | None = None):
    """A trained IRNet from its model file, in eval mode, on ``device`` (the CPU by default; its
    backbone kind is in the file, a ``classifier`` backbone is built from ``classifier_path``)."""
    state = checkpoint.load(path)
    model = build_irnet(params.model_copy(update={"irnet": params.irnet.model_copy(update={"backbone": state["backbone"], "backbone_weights": "none"})}),
                        classifier_path)
    model.load_state_dict(state["model"])
    model.eval()
    return model.to(device or torch.device("cpu"))
