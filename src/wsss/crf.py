"""Dense CRF (pydensecrf) on label maps, one image per task across a process pool.

The unary comes from a label map (each pixel's label with probability ``gt_prob``, the rest
shared by the other labels); the pairwise terms are a Gaussian (``gaussian_sxy``,
``gaussian_compat``) and a bilateral on the image (``bilateral_sxy``, ``bilateral_srgb``,
``bilateral_compat``); ``iterations`` of mean-field inference. Constants of the paper's code:
method-notes, "IR labels". Only the labels present in the input map take part.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from wsss.config import CrfParams
from wsss.errors import WsssError


class CrfError(WsssError):
    """The CRF failed on one or more images (named in the message)."""


def crf_labels(image: np.ndarray, labels: np.ndarray, params: CrfParams) -> np.ndarray:
    """Refine a label map (``H x W`` class ids) with a dense CRF on ``image`` (``H x W x 3`` uint8)."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    present, compact = np.unique(labels, return_inverse=True)
    if len(present) == 1:
        return labels.copy()
    height, width = labels.shape
    n_labels = len(present)
    field = dcrf.DenseCRF2D(width, height, n_labels)
    unary = unary_from_labels(compact.reshape(height, width), n_labels, gt_prob=params.gt_prob, zero_unsure=False)
    field.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    field.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    field.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                               rgbim=np.array(image, dtype=np.uint8, order="C"), compat=params.bilateral_compat)  # a writable copy: pydensecrf needs one
    q = np.asarray(field.inference(params.iterations)).reshape(n_labels, height, width)
    return present[q.argmax(axis=0)].astype(labels.dtype)


@dataclass(frozen=True)
class CrfTask:
    name: str
    image: np.ndarray
    labels: np.ndarray


def _run(task: CrfTask, params: CrfParams) -> tuple[str, np.ndarray | None, str | None]:
    try:
        return task.name, crf_labels(task.image, task.labels, params), None
    except Exception as error:  # noqa: BLE001 - reported by name to the caller
        return task.name, None, f"{type(error).__name__}: {error}"


def crf_many(tasks: Iterable[CrfTask], params: CrfParams, chunksize: int = 16) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, refined labels)`` in order, over ``params.workers`` processes (0 = all cores,
    shared by the torchrun processes of this machine).

    If any image fails, :class:`CrfError` names every failed image after the others are done."""
    from wsss import distributed

    workers = params.workers or distributed.current().cpu_threads()
    failures = []

    def collect(results):
        for name, refined, error in results:
            if error is None:
                yield name, refined
            else:
                failures.append(f"{name} ({error})")

    if workers == 1:
        yield from collect(_run(task, params) for task in tasks)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            tasks = list(tasks)
            yield from collect(pool.map(_run, tasks, [params] * len(tasks), chunksize=chunksize))
    if failures:
        raise CrfError(f"dense CRF failed on {len(failures)} image(s): " + "; ".join(failures))


def crf_refined(items: Iterable[tuple[str, np.ndarray, np.ndarray, np.ndarray]], crf: CrfParams,
                chunk: int = 64) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(mask, prediction refined by the dense CRF on its image)`` of each ``(name, image, mask,
    prediction)``, in order; a chunk of images at a time is held in memory (and spread over the
    CRF's processes). A failure names the image."""
    def refine(batch):
        tasks = [CrfTask(name, image, prediction) for name, image, _, prediction in batch]
        refined = crf_many(tasks, crf)
        return [(mask, labels) for (_, _, mask, _), (_, labels) in zip(batch, refined, strict=True)]

    batch: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
    for item in items:
        batch.append(item)
        if len(batch) == chunk:
            yield from refine(batch)
            batch = []
    if batch:
        yield from refine(batch)
