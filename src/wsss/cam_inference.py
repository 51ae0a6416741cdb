"""Compute and store the CAMs of every image of a manifest; evaluate them (and CAM+CRF) on masks.

Streamed, so that memory follows the batch and not the dataset: images are read ahead by loader
processes (``compute.workers``), images of equal size are batched (``cams.batch_size``, at most four
batches waiting), each image keeps (and upsamples) only the maps of the classes it is labelled with
that the classifier knows (its ``class_ids``), and the maps go to shards of ``compute.shard_size``
images (:mod:`wsss.shards`) as soon as a shard is complete; shards already written are kept, so a
killed run resumes. Evaluation: the label map is
the argmax over a background plane at ``cams.eval_threshold`` and the full-resolution CAMs;
CAM+CRF refines that map with :func:`wsss.crf.crf_labels` (the paper's Table 2 row
"Classification + CRF"). Both go into one confusion matrix each, over all classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from wsss import augment
from wsss.cam import CamStore, ImageCams, cams_arrays, confidence_score, label_map, labelled_cams, normalise, predicted_labels
from wsss.config import CamParams, CrfParams
from wsss.crf import crf_refined
from wsss.data.manifest import ImageRecord, Manifest
from wsss.errors import DataError
from wsss.io import read_image, read_mask
from wsss.metrics import confusion_matrix
from wsss.shards import SHARD_SIZE, missing_shards, read_meta, shard_name, shard_numbers, write_index, write_shard
from wsss.models.classifier import CamClassifier


@dataclass(frozen=True)
class CamSummary:
    id: str
    labels: list[int]  # classes with a map
    confidence: float


class _Images(Dataset):
    """``(position, image or None, error or None)`` of each record: read by the loader's workers."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest

    def __len__(self) -> int:
        return len(self.manifest.records)

    def __getitem__(self, position: int):
        try:
            return position, read_image(self.manifest.image_path(self.manifest.records[position])), None
        except DataError as error:  # re-raised in the main process with its file named
            return position, None, (error.path, str(error)[len(error.path) + 2 :])


def _as_is(sample):
    return sample


def read_images(manifest: Manifest, workers: int = 0) -> Iterator[tuple[ImageRecord, np.ndarray]]:
    """``(record, image)`` in manifest order; with ``workers`` > 0 read ahead by that many loader
    processes (a couple of images each), so the reading overlaps the network."""
    if workers == 0:
        for record in manifest.records:
            yield record, read_image(manifest.image_path(record))
        return
    loader = DataLoader(_Images(manifest), batch_size=None, num_workers=workers, collate_fn=_as_is, prefetch_factor=2)
    for position, image, error in loader:
        if error is not None:
            raise DataError(*error)
        yield manifest.records[position], image


def same_size_batches(items: Iterable[tuple[ImageRecord, np.ndarray]], batch_size: int,
                      max_pending: int | None = None) -> Iterator[list[tuple[ImageRecord, np.ndarray]]]:
    """Batches of images of one size, in the order they fill. A size's batch goes out when it holds
    ``batch_size`` images; when ``max_pending`` images (4 batches by default) wait in all, the fullest
    size goes out early, so memory stays bounded however many sizes a dataset has."""
    max_pending = max_pending or 4 * batch_size
    by_size: dict[tuple[int, int], list[tuple[ImageRecord, np.ndarray]]] = {}
    pending = 0
    for record, image in items:
        group = by_size.setdefault(image.shape[:2], [])
        group.append((record, image))
        pending += 1
        if len(group) == batch_size:
            yield by_size.pop(image.shape[:2])
            pending -= batch_size
        elif pending >= max_pending:
            fullest = max(by_size, key=lambda size: len(by_size[size]))
            pending -= len(by_size[fullest])
            yield by_size.pop(fullest)
    yield from (group for group in by_size.values() if group)


def _reused(stored: ImageCams, wanted: np.ndarray, known: np.ndarray, labels: tuple[int, ...]) -> ImageCams | None:
    """``stored``'s maps of the classes ``known[wanted]``, if it has them all (per-class normalised maps of
    one image do not depend on which other classes are computed with them), else None."""
    rows = [np.flatnonzero(stored.class_ids == class_id) for class_id in known[wanted]]
    if any(len(row) == 0 for row in rows) or not np.array_equal(stored.score_class_ids, known):
        return None
    rows = np.array([row[0] for row in rows], dtype=np.int64)
    return ImageCams(known[wanted], stored.stride4[rows], stored.full[rows], stored.scores, known,
                     confidence_score(stored.scores, known, np.array(labels)))


def compute_cams(model: CamClassifier, class_ids: list[int], manifest: Manifest, out_dir: Path, params: CamParams,
                 device: torch.device | None = None, desc: str = "cams", workers: int = 0,
                 shards: Sequence[int] | None = None, shard_size: int = SHARD_SIZE, reuse: CamStore | None = None) -> list[CamSummary]:
    """The CAMs of ``manifest`` as shards in ``out_dir`` (:mod:`wsss.shards`): the shards numbered
    ``shards`` (all, and ``shards.json``, by default). A shard already in ``out_dir`` is kept: a killed
    run resumes where it stopped. Returns the labels and confidence of those shards' images, in order.

    Streamed: images are read ahead (``workers`` loader processes), batched by size
    (:func:`same_size_batches`), and only each image's labelled classes are upsampled; a shard is
    written as soon as its last image is done. ``reuse``: the same images' CAMs on other labels (per-class
    normalised, of this classifier): an image whose classes all have a map there is copied, not computed."""
    device = device or torch.device("cpu")
    model = model.to(device).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    known = np.array(class_ids)
    ranges = shard_numbers(len(manifest.records), shard_size)
    numbers = list(range(len(ranges))) if shards is None else list(shards)
    todo = missing_shards(out_dir, numbers)
    shard_of = {manifest.records[i].id: n for n in todo for i in ranges[n]}
    pending = manifest.derive([manifest.records[i] for n in todo for i in ranges[n]])
    done: dict[int, dict[str, tuple[dict, dict]]] = {n: {} for n in todo}
    progress = tqdm(total=sum(len(ranges[n]) for n in numbers), initial=sum(len(ranges[n]) for n in numbers) - len(pending.records),
                    desc=desc, unit="img")

    def finish(record: ImageRecord, cams: ImageCams) -> None:
        number = shard_of[record.id]
        summary = {"id": record.id, "labels": cams.class_ids.tolist(), "confidence": cams.confidence}
        done[number][record.id] = (cams_arrays(cams), summary)
        if len(done[number]) == len(ranges[number]):  # the shard is complete: write it, free it
            ids = [manifest.records[i].id for i in ranges[number]]
            write_shard(out_dir / shard_name(number), [(i, done[number][i][0]) for i in ids],
                        {"summaries": [done[number][i][1] for i in ids]})
            del done[number]

    if reuse is not None and params.normalize == "per_class":
        computed = []
        for record in pending.records:
            copied = _reused(reuse.load(record.id), np.flatnonzero(np.isin(known, record.labels)), known, record.labels)
            if copied is None:
                computed.append(record)
            else:
                finish(record, copied)
                progress.update(1)
        pending = manifest.derive(computed)
    for batch in same_size_batches(read_images(pending, workers), params.batch_size):
        tensor = torch.stack([augment.to_tensor(image) for _, image in batch]).to(device)
        wanted = [np.flatnonzero(np.isin(known, record.labels)) for record, _ in batch]
        logits, stride4, full = labelled_cams(model, tensor, params.scales, [torch.from_numpy(w) for w in wanted])
        scores = torch.sigmoid(logits).cpu().numpy()
        for row, (record, _) in enumerate(batch):
            finish(record, ImageCams(
                class_ids=known[wanted[row]],
                stride4=normalise(stride4[row].cpu().numpy(), params.normalize),
                full=normalise(full[row].cpu().numpy(), params.normalize),
                scores=scores[row],
                score_class_ids=known,
                confidence=confidence_score(scores[row], known, np.array(record.labels)),
            ))
        progress.update(len(batch))
    progress.close()
    if shards is None:
        write_index(out_dir)
    return [CamSummary(**summary) for n in numbers for summary in read_meta(out_dir / shard_name(n))["summaries"]]


def predicted_view(manifest: Manifest, store: CamStore, threshold: float) -> Manifest:
    """``manifest`` with each image's labels replaced by the classes its stored scores predict
    (:func:`wsss.cam.predicted_labels`): the labels steps 1-2 have on an image nobody labelled."""
    records = []
    for record in manifest.records:
        cams = store.load(record.id)
        records.append(record.with_labels(predicted_labels(cams.scores, cams.score_class_ids, threshold)))
    return manifest.derive(records)


@dataclass(frozen=True)
class CamEvaluation:
    cam_matrix: np.ndarray
    crf_matrix: np.ndarray
    examples: list[dict]  # the first ``num_examples`` images: image, cam heat, maps, ground truth


def evaluate_cams(manifest: Manifest, cams_dir: Path, cam_params: CamParams, crf_params: CrfParams,
                  num_examples: int = 0, workers: int = 0, chunk: int = 64) -> CamEvaluation:
    """Confusion matrices of CAM and CAM+CRF label maps against the masks of ``manifest``, streamed:
    the CRF refines a chunk of images at a time (:func:`wsss.crf.crf_refined`)."""
    num_classes = manifest.num_classes
    cam_matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    crf_matrix = np.zeros_like(cam_matrix)
    examples: list[dict] = []
    masked = manifest.derive([r for r in manifest.records if r.mask is not None])
    store = CamStore(cams_dir)

    def label_maps() -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
        for record, image in tqdm(read_images(masked, workers), total=len(masked.records), desc="evaluate CAMs", unit="img"):
            truth = read_mask(masked.mask_path(record))
            cams = store.load(record.id, expected_size=image.shape[:2])
            predicted = label_map(cams.full, cams.class_ids, cam_params.eval_threshold)
            cam_matrix[...] += confusion_matrix(truth, predicted, num_classes)
            if len(examples) < num_examples:
                heat = cams.full.max(axis=0) if len(cams.class_ids) else np.zeros(image.shape[:2])
                examples.append({"id": record.id, "image": image, "heat": heat, "cam": predicted, "truth": truth})
            yield record.id, image, truth, predicted

    for position, (truth, refined) in enumerate(crf_refined(label_maps(), crf_params, chunk)):
        crf_matrix += confusion_matrix(truth, refined, num_classes)
        if position < len(examples):
            examples[position]["crf"] = refined
    return CamEvaluation(cam_matrix, crf_matrix, examples)
