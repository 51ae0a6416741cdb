"""Inference that scales: images read ahead by loader processes, batches of one size with a bounded
number of images waiting, CAMs streamed to disk in manifest order whatever the sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.cam import CamStore
from wsss.cam_inference import compute_cams, evaluate_cams, read_images, same_size_batches
from wsss.config import CamParams, CrfParams
from wsss.data.manifest import ImageRecord, Manifest
from wsss.errors import DataError
from wsss.io import write_mask_png
from wsss.models.classifier import build_classifier

SIZES = [(20, 16), (16, 20), (24, 24), (20, 16), (12, 28), (16, 20), (20, 16), (28, 12), (24, 24), (20, 16), (16, 16)]


def varied_manifest(root: Path, sizes=SIZES, with_masks: bool = False) -> Manifest:
    rng = np.random.default_rng(0)
    records = []
    for index, (height, width) in enumerate(sizes):
        image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / f"im{index}.png")
        mask = None
        if with_masks:
            truth = np.zeros((height, width), np.uint8)
            truth[height // 4 : height // 2, width // 4 :] = 1 + index % 2
            write_mask_png(root / f"im{index}_mask.png", truth)
            mask = f"im{index}_mask.png"
        records.append(ImageRecord(f"im{index}", "train", f"im{index}.png", mask, (1 + index % 2,), (1 + index % 2,)))
    return Manifest("test", ("background", "a", "b"), None, tuple(records), root)


def test_same_size_batches_keep_every_image_once_and_bound_what_waits():
    items = [(f"r{i}", np.zeros((*size, 3), np.uint8)) for i, size in enumerate(SIZES * 3)]
    consumed = 0

    def counted():
        nonlocal consumed
        for item in items:
            consumed += 1
            yield item

    emitted, seen = 0, []
    for batch in same_size_batches(counted(), batch_size=2, max_pending=3):
        assert consumed - emitted <= 3, "more images waited than max_pending"
        assert 1 <= len(batch) <= 2 and len({image.shape for _, image in batch}) == 1
        emitted += len(batch)
        seen += [name for name, _ in batch]
    assert sorted(seen) == sorted(name for name, _ in items)
    # one size only: full batches in order, as the pipeline always batched
    same = [(f"s{i}", np.zeros((8, 8, 3), np.uint8)) for i in range(7)]
    assert [[n for n, _ in b] for b in same_size_batches(iter(same), 3)] == [["s0", "s1", "s2"], ["s3", "s4", "s5"], ["s6"]]


def test_loader_processes_read_the_same_images_in_order_and_name_a_corrupt_file(tmp_path):
    manifest = varied_manifest(tmp_path)
    plain = list(read_images(manifest, workers=0))
    ahead = list(read_images(manifest, workers=2))
    assert [r.id for r, _ in ahead] == [r.id for r in manifest.records]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(plain, ahead, strict=True))
    (tmp_path / "im3.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="im3.png"):
        list(read_images(manifest, workers=2))


def test_streamed_cams_of_varied_sizes_equal_one_image_at_a_time(tmp_path):
    """Batching by size, reading ahead and a small bound on waiting images change nothing in the CAM
    files; evaluation streams the CRF in chunks and scores every masked image."""
    torch.manual_seed(0)
    model = build_classifier("small_cnn", num_outputs=2, extra_convs=1).eval()
    manifest = varied_manifest(tmp_path, with_masks=True)
    params = CamParams(scales=[1.0, 0.5], batch_size=3)
    batched = compute_cams(model, [1, 2], manifest, tmp_path / "batched", params, workers=2, shard_size=4)
    single = compute_cams(model, [1, 2], manifest, tmp_path / "single", params.model_copy(update={"batch_size": 1}))
    assert [s.id for s in batched] == [r.id for r in manifest.records]
    assert sorted(p.name for p in (tmp_path / "batched").iterdir()) == [f"shard-0000{i}.npz" for i in range(3)] + ["shards.json"]
    by_batch, by_image = CamStore(tmp_path / "batched"), CamStore(tmp_path / "single")
    for record in manifest.records:
        a, b = by_batch.load(record.id), by_image.load(record.id)
        assert a.class_ids.tolist() == list(record.labels)
        assert np.allclose(a.full, b.full, atol=2e-3) and np.allclose(a.stride4, b.stride4, atol=2e-3)
    evaluation = evaluate_cams(manifest, tmp_path / "batched", params, CrfParams(workers=1), num_examples=2, workers=1)
    pixels = sum(h * w for h, w in SIZES)
    assert evaluation.cam_matrix.sum() == pixels and evaluation.crf_matrix.sum() == pixels
    assert [e["id"] for e in evaluation.examples] == ["im0", "im1"] and all("crf" in e for e in evaluation.examples)


def test_cam_shards_are_deterministic_and_a_resumed_run_computes_only_the_missing_ones(tmp_path, monkeypatch):
    """Shards written again from the same maps have the same bytes (DVC sees no change); with some
    shards already there (a killed run) only the others are computed, and the result is the same."""
    import wsss.cam_inference as cam_inference

    torch.manual_seed(0)
    model = build_classifier("small_cnn", num_outputs=2, extra_convs=1).eval()
    manifest = varied_manifest(tmp_path)
    params = CamParams(scales=[1.0], batch_size=2)
    whole = compute_cams(model, [1, 2], manifest, tmp_path / "whole", params, shard_size=4)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "shard-00001.npz").write_bytes((tmp_path / "whole/shard-00001.npz").read_bytes())  # left by the kill
    computed: list[str] = []
    original = cam_inference.labelled_cams
    monkeypatch.setattr(cam_inference, "labelled_cams", lambda m, images, s, w: computed.append(len(w)) or original(m, images, s, w))
    again = compute_cams(model, [1, 2], manifest, resumed, params, shard_size=4)
    assert sum(computed) == len(manifest.records) - 4  # shard 1's four images were not computed again
    assert again == whole
    for name in ("shard-00000.npz", "shard-00002.npz", "shards.json"):
        assert (resumed / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_mask_shards_fill_only_what_is_missing_and_feed_a_loader_with_worker_processes(tmp_path):
    from torch.utils.data import DataLoader

    from wsss.segmentation import SegmentationDataset
    from wsss.shards import MaskStore, fill_shards, matrix_from_meta, matrix_meta, metas, stored_masks, write_index

    rng = np.random.default_rng(0)
    ids = [f"img{i}" for i in range(7)]
    masks = {i: rng.integers(0, 3, (6 + n % 2, 5), dtype=np.uint8) for n, i in enumerate(ids)}
    asked: list[list[int]] = []

    def make(positions):
        asked.append(positions)
        counts = np.zeros((3, 3), np.int64)
        counts[0, 1] = len(positions)
        return [{"mask": masks[ids[p]]} for p in positions], {"counts": matrix_meta(counts)}

    fill_shards(tmp_path / "masks", ids, [0, 2], 3, make, desc="test")  # shards 0 and 2 only (another process has 1)
    assert asked == [[0, 1, 2], [6]]
    fill_shards(tmp_path / "masks", ids, [0, 1, 2], 3, make, desc="test")  # resumed: only the missing shard
    assert asked[2:] == [[3, 4, 5]]
    assert sum(matrix_from_meta(m["counts"], 3)[0, 1] for m in metas(tmp_path / "masks")) == 7
    write_index(tmp_path / "masks")
    store = MaskStore(tmp_path / "masks")
    assert all(np.array_equal(store.load(i), masks[i]) for i in ids)

    # a segmentation dataset reads them in loader processes (each opens the shards itself)
    images = []
    for i in ids:
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(np.zeros((*masks[i].shape, 3), np.uint8)).save(images[-1])
    dataset = SegmentationDataset(images, stored_masks(tmp_path / "masks", ids), None, "none", seed=0, num_classes=3)
    loaded = [mask[0].numpy() for _, mask in DataLoader(dataset, batch_size=1, num_workers=2)]
    assert all(np.array_equal(got, masks[i]) for got, i in zip(loaded, ids, strict=True))

    # errors name the shard and the image: another size, a class id the dataset does not have, an unknown image
    with pytest.raises(DataError, match=r"shard-00000\.npz \(img0\).*5x6 but its image is 5x7"):
        store.load("img0", expected_size=(7, 5))
    masks["img1"][0, 0] = 9
    fill_shards(tmp_path / "bad", ids, [0], 3, make, desc="test")
    write_index(tmp_path / "bad")
    bad = SegmentationDataset(images[:3], stored_masks(tmp_path / "bad", ids[:3]), None, "none", seed=0, num_classes=3)
    with pytest.raises(DataError, match=r"shard-00000\.npz \(img1\).*mask values \[9\]"):
        bad[1]
    with pytest.raises(DataError, match="no shard holds image 'img5'"):
        MaskStore(tmp_path / "bad").load("img5")


def test_cams_on_other_labels_copy_the_maps_a_store_has_and_compute_only_the_rest(tmp_path, monkeypatch):
    """val on its predicted labels: an image whose classes all have a map on its image labels is copied
    (per-class maps of one image do not depend on the other classes), the others are computed."""
    import wsss.cam_inference as cam_inference

    torch.manual_seed(0)
    model = build_classifier("small_cnn", num_outputs=2, extra_convs=1).eval()
    manifest = varied_manifest(tmp_path)
    both = manifest.derive([r.with_labels((1, 2)) for r in manifest.records])
    params = CamParams(scales=[1.0, 0.5], batch_size=2)
    compute_cams(model, [1, 2], both, tmp_path / "both", params, shard_size=4)
    # labels 1 and 2 on every image in the store: one class or the other is a subset, so nothing is computed
    computed: list[int] = []
    original = cam_inference.labelled_cams
    monkeypatch.setattr(cam_inference, "labelled_cams", lambda m, images, s, w: computed.append(len(w)) or original(m, images, s, w))
    copied = compute_cams(model, [1, 2], manifest, tmp_path / "copied", params, shard_size=4, reuse=CamStore(tmp_path / "both"))
    assert computed == []
    fresh = compute_cams(model, [1, 2], manifest, tmp_path / "fresh", params, shard_size=4)
    assert sum(computed) == len(manifest.records) and [s.labels for s in copied] == [s.labels for s in fresh]
    for summary_copied, summary_fresh in zip(copied, fresh, strict=True):
        assert summary_copied.confidence == pytest.approx(summary_fresh.confidence, abs=1e-5)
    stores = CamStore(tmp_path / "copied"), CamStore(tmp_path / "fresh")
    for record in manifest.records:
        a, b = (store.load(record.id) for store in stores)
        assert a.class_ids.tolist() == list(record.labels) and np.allclose(a.full, b.full, atol=2e-3)
    # a class the store has no map of: that image is computed
    computed.clear()
    partial = manifest.derive([r.with_labels((1,)) if i else r.with_labels((1, 2)) for i, r in enumerate(manifest.records)])
    compute_cams(model, [1, 2], partial, tmp_path / "partial", params, shard_size=4, reuse=CamStore(tmp_path / "copied"))
    assert sum(computed) == sum(1 for i, r in enumerate(manifest.records) if i == 0 or 1 not in r.labels)



def test_a_resumed_output_drops_the_temporary_files_of_writes_a_kill_interrupted(tmp_path):
    from wsss.shards import FINGERPRINT, partial_dir, resumable_dir, write_shard

    final = tmp_path / "pseudo_masks"
    staging = partial_dir(final)  # what a run killed while writing its second shard leaves
    (staging / "train").mkdir(parents=True)
    (staging / FINGERPRINT).write_text("same inputs")
    write_shard(staging / "train" / "shard-00000.npz", [("a", {"mask": np.zeros((2, 2), np.uint8)})])
    (staging / "train" / ".shard-00001.npz.tmp-k1ll3d").write_bytes(b"half a shard")
    (staging / ".val.tmp-k1ll3d").mkdir()
    shard = staging / "train" / "shard-00000.npz"
    identity = (shard.stat().st_ino, shard.stat().st_mtime_ns)
    with resumable_dir(final, "same inputs") as resumed:
        assert sorted(p.relative_to(resumed).as_posix() for p in resumed.rglob("*")) == [FINGERPRINT, "train", "train/shard-00000.npz"]
    assert sorted(p.relative_to(final).as_posix() for p in final.rglob("*")) == ["train", "train/shard-00000.npz"]
    kept = final / "train" / "shard-00000.npz"
    assert (kept.stat().st_ino, kept.stat().st_mtime_ns) == identity  # the complete shard is kept, not rewritten
