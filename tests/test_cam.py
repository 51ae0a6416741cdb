from __future__ import annotations

import numpy as np
import pytest
import torch

from wsss.cam import (
    ImageCams,
    confidence_score,
    label_map,
    labelled_cams,
    load_cams,
    multiscale_cams,
    normalise,
    save_cams,
    stride4_size,
)
from wsss.errors import DataError
from wsss.models.classifier import build_classifier


def toy_batch(rng: np.random.Generator, count: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Noise images with a bright 10x10 square (class 0) and/or a bright ring (class 1)."""
    images = rng.normal(0, 0.3, (count, 3, size, size)).astype(np.float32)
    targets = np.zeros((count, 2), dtype=np.float32)
    boxes = []
    for i in range(count):
        top, left = rng.integers(0, size - 10, 2)
        kind = i % 2
        if kind == 0:
            images[i, :, top : top + 10, left : left + 10] += 2.0
        else:
            images[i, :, top : top + 10, left : left + 10] += 2.0
            images[i, :, top + 3 : top + 7, left + 3 : left + 7] -= 2.0
        targets[i, kind] = 1
        boxes.append((kind, top, left))
    return torch.from_numpy(images), torch.from_numpy(targets), boxes


def test_cam_of_a_fitted_classifier_peaks_inside_the_object():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_classifier("small_cnn", num_outputs=2, extra_convs=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        images, targets, _ = toy_batch(rng, 16)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    images, _, boxes = toy_batch(rng, 8)
    _, stride4, full = multiscale_cams(model, images, [1.0, 0.5, 1.5])
    assert stride4.shape == (8, 2, 8, 8) and full.shape == (8, 2, 32, 32)
    inside = 0
    for i, (kind, top, left) in enumerate(boxes):
        peak = np.unravel_index(int(full[i, kind].argmax()), (32, 32))
        inside += top - 2 <= peak[0] < top + 12 and left - 2 <= peak[1] < left + 12
    assert inside >= 7, f"CAM peaks inside the object in only {inside}/8 images"


def test_flip_is_undone_so_a_symmetric_model_gives_symmetric_cams():
    model = build_classifier("small_cnn", num_outputs=1, extra_convs=0).eval()
    image = torch.randn(1, 3, 16, 16)
    symmetric = torch.cat([image, image.flip(-1)], dim=-1)  # mirror-symmetric input
    _, _, full = multiscale_cams(model, symmetric, [1.0])
    assert torch.allclose(full, full.flip(-1), atol=1e-5)


def test_normalise_label_map_and_confidence():
    maps = np.stack([np.full((2, 2), 2.0), np.array([[0.0, 1.0], [4.0, 0.0]])])
    per_class = normalise(maps, "per_class")
    assert np.allclose(per_class.reshape(2, -1).max(axis=1), 1.0, atol=1e-4)
    assert np.allclose(normalise(maps, "global").max(), 1.0, atol=1e-4) and normalise(maps, "global")[0, 0, 0] == pytest.approx(0.5, abs=1e-4)
    labels = label_map(per_class, np.array([3, 5]), background_threshold=0.6)
    assert labels.tolist() == [[3, 3], [5, 3]]
    assert label_map(np.zeros((0, 2, 2)), np.array([], dtype=int), 0.5).tolist() == [[0, 0], [0, 0]]
    assert confidence_score(np.array([0.9, 0.4, 0.95]), np.array([1, 2, 4]), np.array([1, 4])) == pytest.approx(0.9)
    assert confidence_score(np.array([0.9]), np.array([1]), np.array([], dtype=int)) == 0.0


def _cams(height: int = 12, width: int = 10) -> ImageCams:
    rng = np.random.default_rng(1)
    h4, w4 = stride4_size(height, width)
    return ImageCams(np.array([2, 5]), rng.random((2, h4, w4)), rng.random((2, height, width)), np.array([0.3, 0.9]), np.array([2, 5]), 0.3)


def test_cam_files_round_trip_with_stable_bytes(tmp_path):
    cams = _cams()
    save_cams(tmp_path / "a.npz", cams)
    save_cams(tmp_path / "b.npz", cams)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()  # DVC-stable
    loaded = load_cams(tmp_path / "a.npz", expected_size=(12, 10))
    assert loaded.class_ids.tolist() == [2, 5] and loaded.confidence == pytest.approx(0.3)
    assert np.allclose(loaded.full, cams.full, atol=1e-3)  # float16 storage
    assert loaded.stride4.shape == (2, 3, 3)


def test_missing_or_inconsistent_cam_files_are_named(tmp_path):
    with pytest.raises(DataError, match="missing.npz: CAM file missing for a listed image"):
        load_cams(tmp_path / "missing.npz")
    save_cams(tmp_path / "c.npz", _cams())
    with pytest.raises(DataError, match="c.npz: CAM size .* does not match its image"):
        load_cams(tmp_path / "c.npz", expected_size=(12, 11))
    cams = _cams()
    broken = ImageCams(np.array([2]), cams.stride4, cams.full, cams.scores, cams.score_class_ids, 0.1)
    save_cams(tmp_path / "d.npz", broken)
    with pytest.raises(DataError, match="d.npz: CAM shapes .* do not match 1 classes"):
        load_cams(tmp_path / "d.npz")
    (tmp_path / "e.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="e.npz: not a valid CAM file"):
        load_cams(tmp_path / "e.npz")


def test_labelled_cams_upsample_only_the_wanted_classes_and_equal_all_class_maps():
    """Only each image's labelled classes are upsampled (x100 less work at 200 classes), with the
    same maps as upsampling all of them; an image without a known class gets empty maps."""
    torch.manual_seed(0)
    model = build_classifier("small_cnn", num_outputs=5, extra_convs=1).eval()
    images = torch.rand(3, 3, 24, 20)
    wanted = [torch.tensor([1, 4]), torch.tensor([3]), torch.tensor([], dtype=torch.long)]
    logits_all, stride4_all, full_all = multiscale_cams(model, images, [1.0, 0.5, 1.5])
    logits, stride4, full = labelled_cams(model, images, [1.0, 0.5, 1.5], wanted)
    assert torch.equal(logits, logits_all)
    for row, indices in enumerate(wanted):
        assert full[row].shape == (len(indices), 24, 20) and stride4[row].shape == (len(indices), 6, 5)
        assert torch.equal(full[row], full_all[row, indices]) and torch.equal(stride4[row], stride4_all[row, indices])


def test_predicted_labels_are_the_classes_scored_at_the_threshold_or_the_top_one():
    from wsss.cam import predicted_labels

    ids = np.array([5, 1, 3])
    assert predicted_labels(np.array([0.2, 0.9, 0.5]), ids, 0.5) == (1, 3)  # sorted class ids, >= the threshold
    assert predicted_labels(np.array([0.2, 0.1, 0.4]), ids, 0.5) == (3,)  # none passes: the top class
    assert predicted_labels(np.array([0.2, 0.1, 0.4]), ids, 0.15) == (3, 5)
    assert predicted_labels(np.array([]), np.array([], dtype=int), 0.5) == ()


def test_predicted_view_replaces_the_labels_by_the_stored_scores_predictions(tmp_path):
    from pathlib import Path

    from wsss.cam import CamStore, ImageCams, cams_arrays
    from wsss.cam_inference import predicted_view
    from wsss.data.manifest import ImageRecord, Manifest
    from wsss.shards import write_index, write_shard

    records = tuple(ImageRecord(f"i{n}", "val", f"i{n}.png", f"m{n}.png", (1,), (1,)) for n in range(3))
    manifest = Manifest("embedded", ("background", "a", "b", "c"), None, records, Path(tmp_path))
    scores = [np.array([0.9, 0.1, 0.7]), np.array([0.1, 0.2, 0.3]), np.array([0.4, 0.6, 0.1])]
    ids = np.array([1, 2, 3])
    write_shard(tmp_path / "cams/shard-00000.npz",
                [(r.id, cams_arrays(ImageCams(np.array([1]), np.zeros((1, 2, 2)), np.zeros((1, 8, 8)), s, ids, 0.5)))
                 for r, s in zip(records, scores, strict=True)])
    write_index(tmp_path / "cams")
    view = predicted_view(manifest, CamStore(tmp_path / "cams"), 0.5)
    assert [r.labels for r in view.records] == [(1, 3), (3,), (2,)]
    assert [r.mask for r in view.records] == [r.mask for r in records]  # scored against the same masks
