"""Compute and store the CAMs of every image of a manifest; evaluate them (and CAM+CRF) on masks.

Images of equal size are batched (``cams.batch_size``); each image keeps the maps of the classes
it is labelled with that the classifier knows (its ``class_ids``). Evaluation: the label map is
the argmax over a background plane at ``cams.eval_threshold`` and the full-resolution CAMs;
CAM+CRF refines that map with :func:`wsss.crf.crf_labels` (the paper's Table 2 row
"Classification + CRF"). Both go into one confusion matrix each, over all classes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from wsss import augment
from wsss.cam import ImageCams, confidence_score, label_map, load_cams, multiscale_cams, normalise, save_cams
from wsss.config import CamParams, CrfParams
from wsss.crf import CrfTask, crf_many
from wsss.data.manifest import ImageRecord, Manifest
from wsss.io import read_image, read_mask
from wsss.metrics import confusion_matrix
from wsss.models.classifier import CamClassifier


@dataclass(frozen=True)
class CamSummary:
    id: str
    labels: list[int]  # classes with a map
    confidence: float


def cam_path(folder: Path, record: ImageRecord) -> Path:
    return folder / f"{record.id}.npz"


def compute_cams(model: CamClassifier, class_ids: list[int], manifest: Manifest, out_dir: Path, params: CamParams,
                 device: torch.device | None = None, desc: str = "cams") -> list[CamSummary]:
    """Write ``<out_dir>/<id>.npz`` for every record; return each image's labels and confidence."""
    device = device or torch.device("cpu")
    model = model.to(device).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    known = np.array(class_ids)
    by_size: dict[tuple[int, int], list[tuple[ImageRecord, np.ndarray]]] = defaultdict(list)
    summaries: dict[str, CamSummary] = {}
    progress = tqdm(total=len(manifest.records), desc=desc, unit="img")

    def flush(batch: list[tuple[ImageRecord, np.ndarray]]) -> None:
        tensor = torch.stack([augment.to_tensor(image) for _, image in batch]).to(device)
        logits, stride4, full = multiscale_cams(model, tensor, params.scales)
        scores = torch.sigmoid(logits).cpu().numpy()
        stride4, full = stride4.cpu().numpy(), full.cpu().numpy()
        for row, (record, _) in enumerate(batch):
            wanted = np.isin(known, record.labels)
            cams = ImageCams(
                class_ids=known[wanted],
                stride4=normalise(stride4[row][wanted], params.normalize),
                full=normalise(full[row][wanted], params.normalize),
                scores=scores[row],
                score_class_ids=known,
                confidence=confidence_score(scores[row], known, np.array(record.labels)),
            )
            save_cams(cam_path(out_dir, record), cams)
            summaries[record.id] = CamSummary(record.id, cams.class_ids.tolist(), cams.confidence)
        progress.update(len(batch))

    for record in manifest.records:
        image = read_image(manifest.image_path(record))
        pending = by_size[image.shape[:2]]
        pending.append((record, image))
        if len(pending) == params.batch_size:
            flush(pending)
            pending.clear()
    for pending in by_size.values():
        if pending:
            flush(pending)
    progress.close()
    return [summaries[record.id] for record in manifest.records]


@dataclass(frozen=True)
class CamEvaluation:
    cam_matrix: np.ndarray
    crf_matrix: np.ndarray
    examples: list[dict]  # the first ``num_examples`` images: image, cam heat, maps, ground truth


def evaluate_cams(manifest: Manifest, cams_dir: Path, cam_params: CamParams, crf_params: CrfParams,
                  num_examples: int = 0) -> CamEvaluation:
    """Confusion matrices of CAM and CAM+CRF label maps against the masks of ``manifest``."""
    num_classes = manifest.num_classes
    cam_matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    crf_matrix = np.zeros_like(cam_matrix)
    tasks, truths, examples = [], {}, []
    for record in tqdm(manifest.records, desc="evaluate CAMs", unit="img"):
        mask_path = manifest.mask_path(record)
        if mask_path is None:
            continue
        image = read_image(manifest.image_path(record))
        truth = read_mask(mask_path)
        cams = load_cams(cam_path(cams_dir, record), expected_size=image.shape[:2])
        predicted = label_map(cams.full, cams.class_ids, cam_params.eval_threshold)
        cam_matrix += confusion_matrix(truth, predicted, num_classes)
        truths[record.id] = truth
        tasks.append(CrfTask(record.id, image, predicted))
        if len(examples) < num_examples:
            heat = cams.full.max(axis=0) if len(cams.class_ids) else np.zeros(image.shape[:2])
            examples.append({"id": record.id, "image": image, "heat": heat, "cam": predicted, "truth": truth})
    refined_examples = {example["id"]: example for example in examples}
    for name, refined in crf_many(tasks, crf_params):
        crf_matrix += confusion_matrix(truths[name], refined, num_classes)
        if name in refined_examples:
            refined_examples[name]["crf"] = refined
    return CamEvaluation(cam_matrix, crf_matrix, examples)
