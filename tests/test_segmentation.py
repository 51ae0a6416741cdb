"""Step 3 library on tiny data: the DeepLabv3+ factory, padding, TTA, the dataset and training with resume."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsss import checkpoint
from wsss.config import SegmenterParams
from wsss.errors import ConfigError, DataError
from wsss.io import IGNORE_INDEX, write_image_png, write_mask_png
from wsss.models.classifier import CamClassifier, build_classifier, classifier_state
from wsss.models.segmenter import SegmenterSpec, build_segmenter, load_segmenter, padded_forward, save_segmenter
from wsss.segmentation import (LAST, SegmentationDataset, evaluate_segmenter, segmentation_loss, skip_confident_disagreement,
                               train_segmenter, weight_average)
from wsss.tta import predict_labels, tta_logits

NUM_CLASSES = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_segmenter(output_stride: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_segmenter(SegmenterSpec("resnet18", NUM_CLASSES, output_stride, decoder_channels=16))


def write_pairs(folder: Path, count: int, height: int, width: int, seed: int) -> tuple[list[Path], list[Path]]:
    """Noisy images with a bright square (class 1) and a dark bar (class 2), and their masks."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images, masks = [], []
    for index in range(count):
        image = rng.integers(60, 120, size=(height, width, 3), dtype=np.uint8)
        mask = np.zeros((height, width), dtype=np.uint8)
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        image[top : top + height // 3, left : left + width // 3] = (230, 40, 40)
        mask[top : top + height // 3, left : left + width // 3] = 1
        row = rng.integers(height // 2, height - 3)
        image[row : row + 3, :] = (10, 10, 200)
        mask[row : row + 3, :] = 2
        images.append(folder / f"{index:03d}.png")
        masks.append(folder / f"{index:03d}_mask.png")
        write_image_png(images[-1], image)
        write_mask_png(masks[-1], mask)
    return images, masks


# --- factory -------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_stride", [8, 16])
def test_factory_gives_logits_of_the_input_size(output_stride):
    model = tiny_segmenter(output_stride).eval()
    with torch.no_grad():
        logits = model(torch.zeros(2, 3, 32, 48))
    assert logits.shape == (2, NUM_CLASSES, 32, 48)
    assert model.encoder.output_stride == output_stride


def test_encoder_weights_from_a_local_file(tmp_path):
    source = tiny_segmenter(seed=1)
    torch.save(source.encoder.state_dict(), tmp_path / "encoder.pth")
    torch.save({"state_dict": source.encoder.state_dict()}, tmp_path / "wrapped.pth")
    for name in ("encoder.pth", "wrapped.pth"):
        torch.manual_seed(2)
        model = build_segmenter(SegmenterSpec("resnet18", NUM_CLASSES, decoder_channels=16), encoder_weights=str(tmp_path / name))
        assert torch.equal(model.encoder.conv1.weight, source.encoder.conv1.weight)
        assert torch.equal(model.encoder.layer4[1].bn2.running_var, source.encoder.layer4[1].bn2.running_var)

    (tmp_path / "garbage.pth").write_bytes(b"not a state dict")
    resnet34 = build_segmenter(SegmenterSpec("resnet34", NUM_CLASSES, decoder_channels=16))
    torch.save(resnet34.encoder.state_dict(), tmp_path / "resnet34.pth")
    for name in ("missing.pth", "garbage.pth", "resnet34.pth"):
        with pytest.raises(ConfigError, match=f"segmenter.encoder_weights: .*{name}"):
            build_segmenter(SegmenterSpec("resnet18", NUM_CLASSES, decoder_channels=16), encoder_weights=str(tmp_path / name))


def test_imagenet_weights_come_from_smp_and_a_failed_download_is_a_config_error(monkeypatch):
    import segmentation_models_pytorch as smp

    real_get_encoder = smp.encoders.get_encoder

    def offline_hub(name, weights, output_stride):
        assert weights == "imagenet"
        torch.manual_seed(7)
        return real_get_encoder(name, weights=None, output_stride=output_stride)

    monkeypatch.setattr(smp.encoders, "get_encoder", offline_hub)
    model = build_segmenter(SegmenterSpec("resnet18", NUM_CLASSES, decoder_channels=16), encoder_weights="imagenet")
    torch.manual_seed(7)
    assert torch.equal(model.encoder.conv1.weight, real_get_encoder("resnet18").conv1.weight)

    def no_network(name, weights, output_stride):
        raise OSError("no network")

    monkeypatch.setattr(smp.encoders, "get_encoder", no_network)
    with pytest.raises(ConfigError, match="segmenter.encoder_weights: cannot get ImageNet weights.*no network"):
        build_segmenter(SegmenterSpec("resnet18", NUM_CLASSES, decoder_channels=16), encoder_weights="imagenet")


def _classifier_file(path: Path, arch: str = "small_cnn", extra_convs: int = 1, seed: int = 3) -> CamClassifier:
    torch.manual_seed(seed)
    classifier = build_classifier(arch, 2, extra_convs)
    with torch.no_grad():  # BatchNorm statistics that differ from a fresh network's
        for module in classifier.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
    checkpoint.save(path, classifier_state(classifier.state_dict(), arch, extra_convs, [1, 2], ("background", "square", "bar"), 32))
    return classifier


def classifier_spec(extra_convs: int = 1, arch: str = "small_cnn") -> SegmenterSpec:
    return SegmenterSpec("classifier", NUM_CLASSES, 8, 16, ("background", "square", "bar"), (1, 2, 3), arch, extra_convs)


def test_the_classifier_encoder_starts_from_the_step1_network(tmp_path):
    classifier = _classifier_file(tmp_path / "classifier.pt")
    model = build_segmenter(classifier_spec(), encoder_weights=str(tmp_path / "classifier.pt")).eval()
    encoder_state = model.encoder.state_dict()
    classifier_tensors = {**classifier.backbone.state_dict(), **{f"extra.{k}": v for k, v in classifier.extra.state_dict().items()}}
    assert sum(t.numel() for t in encoder_state.values()) == sum(t.numel() for t in classifier_tensors.values())
    for encoder_tensor, classifier_tensor in zip(encoder_state.values(), classifier_tensors.values(), strict=True):
        assert torch.equal(encoder_tensor, classifier_tensor)
    assert model.encoder.output_stride == 8
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 48)).shape == (2, NUM_CLASSES, 32, 48)
        assert padded_forward(model, torch.zeros(1, 3, 30, 37)).shape == (1, NUM_CLASSES, 30, 37)
    # low-level features at stride 4 and the ASPP's input at stride 8, for both step-1 networks
    for arch, low_channels, high_channels in (("small_cnn", 64, 256), ("vgg16_bn_d1", 128, 512)):
        features = build_segmenter(classifier_spec(arch=arch)).encoder(torch.zeros(1, 3, 32, 32))
        assert features[2].shape[1:] == (low_channels, 8, 8) and features[-1].shape[1:] == (high_channels, 4, 4)


def test_the_classifier_encoder_refuses_another_network_or_stride(tmp_path):
    _classifier_file(tmp_path / "classifier.pt", extra_convs=2)
    with pytest.raises(ConfigError, match="segmenter.encoder: .*classifier.pt is a small_cnn with 2 extra convs.*with 1"):
        build_segmenter(classifier_spec(extra_convs=1), encoder_weights=str(tmp_path / "classifier.pt"))
    with pytest.raises(ConfigError, match="segmenter.output_stride: the classifier encoder has output stride 8, not 16"):
        build_segmenter(replace(classifier_spec(), output_stride=16))


def test_a_classifier_encoder_model_file_rebuilds_without_the_classifier(tmp_path):
    _classifier_file(tmp_path / "classifier.pt")
    spec = classifier_spec()
    model = build_segmenter(spec, encoder_weights=str(tmp_path / "classifier.pt"))
    save_segmenter(tmp_path / "model.pt", model, spec)
    (tmp_path / "classifier.pt").unlink()
    loaded, loaded_spec = load_segmenter(tmp_path / "model.pt")
    assert loaded_spec == spec
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), model.eval()(images))


def test_an_unknown_encoder_is_a_config_error():
    with pytest.raises(ConfigError, match="segmenter.encoder: unknown encoder 'resnet19'.*resnet50"):
        build_segmenter(SegmenterSpec("resnet19", NUM_CLASSES))


def test_model_file_round_trip_and_bogus_files(tmp_path):
    model = tiny_segmenter()
    spec = SegmenterSpec("resnet18", NUM_CLASSES, 16, 16, ("background", "square", "bar"))
    save_segmenter(tmp_path / "model.pt", model, spec, {"best_epoch": 3})
    loaded, loaded_spec = load_segmenter(tmp_path / "model.pt")
    assert loaded_spec == spec and not loaded.training
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[key], restored[key]) for key in saved)

    checkpoint.save(tmp_path / "other.pt", {"model": {}, "epoch": 1})
    (tmp_path / "bytes.pt").write_bytes(b"not a checkpoint")
    for name in ("other.pt", "bytes.pt", "missing.pt"):
        with pytest.raises(DataError, match=name):
            load_segmenter(tmp_path / name)


def test_padded_forward_returns_logits_of_any_image_size():
    model = tiny_segmenter().eval()
    with torch.no_grad():
        assert padded_forward(model, torch.randn(1, 3, 50, 37)).shape == (1, NUM_CLASSES, 50, 37)
        assert padded_forward(model, torch.randn(2, 3, 5, 3)).shape == (2, NUM_CLASSES, 5, 3)  # replicate padding
        plain = torch.randn(1, 3, 32, 48)
        assert torch.equal(padded_forward(model, plain), model(plain))


# --- test-time augmentation ----------------------------------------------------------------------


class MirrorEquivariant(nn.Module):
    """A 3x3 conv averaged with its mirrored self: f(mirror(x)) = mirror(f(x)) by construction."""

    def __init__(self, symmetric: bool = True):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, NUM_CLASSES, 3, padding=1)
        self.symmetric = symmetric

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.symmetric:
            return self.conv(images)
        return (self.conv(images) + self.conv(images.flip(-1)).flip(-1)) / 2


def test_flip_tta_of_a_mirror_equivariant_model_is_the_plain_prediction():
    images = torch.randn(2, 3, 17, 23)
    model = MirrorEquivariant().eval()
    with torch.no_grad():
        plain = padded_forward(model, images)
        flipped = tta_logits(model, images, [1.0], flip=True)
        assert torch.allclose(flipped, plain, atol=1e-6)
        assert torch.equal(flipped.argmax(1), plain.argmax(1))
        assert torch.equal(tta_logits(model, images, [1.0], flip=False), plain)
        asymmetric = MirrorEquivariant(symmetric=False)
        assert not torch.allclose(tta_logits(asymmetric, images, [1.0]), padded_forward(asymmetric, images), atol=1e-4)
    image = np.random.default_rng(0).integers(0, 256, size=(17, 23, 3), dtype=np.uint8)
    assert np.array_equal(predict_labels(model, image, [1.0]), predict_labels(model, image, None))


def test_tta_keeps_the_input_size_at_every_scale():
    model = tiny_segmenter().eval()
    with torch.no_grad():
        no_tta = tta_logits(model, torch.ones(1, 3, 37, 29), [1.0], flip=False)
        assert torch.equal(no_tta, padded_forward(model, torch.ones(1, 3, 37, 29)))
        logits = tta_logits(model, torch.randn(2, 3, 37, 29), [0.5, 1.0, 2.0])
    assert logits.shape == (2, NUM_CLASSES, 37, 29)
    labels = predict_labels(model, np.zeros((37, 29, 3), dtype=np.uint8), [0.5, 1.0, 2.0])
    assert labels.shape == (37, 29) and labels.dtype == np.uint8 and labels.max() < NUM_CLASSES


# --- dataset -------------------------------------------------------------------------------------


def test_dataset_rejects_a_mask_of_another_size(tmp_path):
    images, masks = write_pairs(tmp_path, 2, 32, 32, seed=0)
    write_mask_png(masks[1], np.zeros((32, 30), dtype=np.uint8))
    dataset = SegmentationDataset(images, masks, 32, "none", seed=0)
    assert dataset[0][1].shape == (32, 32)
    with pytest.raises(DataError, match=f"{masks[1].name}: mask is 30x32 but its image"):
        dataset[1]


def test_augmentation_moves_the_mask_and_fills_uncovered_areas_with_ignore(tmp_path):
    images, masks = write_pairs(tmp_path, 1, 48, 40, seed=1)
    dataset = SegmentationDataset(images, masks, 32, "strong", seed=0)
    seen: set[int] = set()
    for epoch in range(30):
        dataset.epoch = epoch
        image, mask = dataset[0]
        assert image.shape == (3, 32, 32) and mask.shape == (32, 32) and mask.dtype == torch.int64
        seen |= set(mask.unique().tolist())
    assert seen <= {0, 1, 2, IGNORE_INDEX}
    assert IGNORE_INDEX in seen  # rotation / translation uncovered corners: ignored, not background

    flips = SegmentationDataset(images, masks, None, "flip", seed=0)
    for epoch in range(4):
        flips.epoch = epoch
        image, mask = flips[0]
        red = (image[0] > 1.5) & (image[2] < 0)  # the class-1 square, normalised
        assert torch.equal(red, mask == 1)


# --- training ------------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


def test_the_background_weight_scales_the_loss_of_background_pixels_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 5)
    target = torch.randint(0, 4, (2, 5, 5))
    target[0, 0, :] = IGNORE_INDEX  # ignored whatever the weights
    per_pixel = torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")
    labelled = target != IGNORE_INDEX
    background = labelled & (target == 0)
    for weight in (1.0, 0.5, 2.0):
        weights = torch.where(background, weight, 1.0)[labelled]
        expected = (per_pixel[labelled] * weights).sum() / weights.sum()
        assert float(segmentation_loss(4, weight)(logits, target)) == pytest.approx(float(expected), rel=1e-6)
    assert float(segmentation_loss(4, 0.5)(logits, target)) != pytest.approx(float(segmentation_loss(4)(logits, target)))


def test_training_uses_the_background_weight_of_its_config(tmp_path):
    train_images, train_masks = write_pairs(tmp_path / "train", 6, 32, 32, seed=2)
    val_images, val_masks = write_pairs(tmp_path / "val", 2, 32, 32, seed=3)
    spec = SegmenterSpec("resnet18", NUM_CLASSES, 16, 16, ("background", "square", "bar"))

    def first_loss(background_weight: float) -> float:
        config = SegmenterParams(encoder="resnet18", decoder_channels=16, image_size=32, batch_size=3, epochs=1, lr=0.01,
                                 augmentation="none", threads=1, background_weight=background_weight)
        dataset = SegmentationDataset(train_images, train_masks, config.image_size, config.augmentation, seed=5)
        result = train_segmenter(config, 5, spec, dataset, val_images, val_masks, tmp_path / str(background_weight), "fp")
        return result.history[0].loss

    assert first_loss(1.0) != pytest.approx(first_loss(0.25))  # same seed and data: only the loss's weight differs


def test_only_labelled_pixels_the_network_contradicts_confidently_are_skipped():
    # four pixels, three classes: logits whose softmax is (p0, p1, p2) per pixel
    probabilities = torch.tensor([[0.05, 0.05, 0.90],   # label 1, class 2 at 0.90: contradicted -> skipped
                                  [0.10, 0.30, 0.60],   # label 1, class 2 at 0.60: not confident -> kept
                                  [0.02, 0.03, 0.95],   # label 2, class 2: agrees -> kept
                                  [0.90, 0.05, 0.05]])  # unlabelled stays unlabelled
    logits = probabilities.log().T.reshape(1, 3, 2, 2)
    masks = torch.tensor([[[1, 1], [2, IGNORE_INDEX]]])
    kept = skip_confident_disagreement(logits, masks, 0.8)
    assert kept.tolist() == [[[IGNORE_INDEX, 1], [2, IGNORE_INDEX]]]
    assert masks.tolist() == [[[1, 1], [2, IGNORE_INDEX]]]  # the batch's masks are left alone
    assert skip_confident_disagreement(logits, masks, 0.55).tolist() == [[[IGNORE_INDEX, IGNORE_INDEX], [2, IGNORE_INDEX]]]
    assert torch.equal(skip_confident_disagreement(logits, masks, 0.91), masks)


def test_training_skips_contradicted_pixels_after_its_warm_up_epochs_only(tmp_path):
    train_images, train_masks = write_pairs(tmp_path / "train", 6, 32, 32, seed=2)
    val_images, val_masks = write_pairs(tmp_path / "val", 2, 32, 32, seed=3)
    spec = SegmenterSpec("resnet18", NUM_CLASSES, 16, 16, ("background", "square", "bar"))

    def history(name: str, **skip) -> list:
        config = SegmenterParams(encoder="resnet18", decoder_channels=16, image_size=32, batch_size=3, epochs=3, lr=0.01,
                                 augmentation="none", threads=1, **skip)
        dataset = SegmentationDataset(train_images, train_masks, config.image_size, config.augmentation, seed=5)
        return train_segmenter(config, 5, spec, dataset, val_images, val_masks, tmp_path / name, "fp").history

    # a low confidence: a network trained for an epoch contradicts some labels at 0.4
    skipping = history("skip", skip_disagreement=0.4, skip_after_epochs=1)
    plain = history("plain")
    assert skipping[0].skipped == 0 and skipping[0].loss == pytest.approx(plain[0].loss)  # the warm-up epoch: every pixel
    assert 0 < skipping[1].skipped < 1 and 0 < skipping[2].skipped < 1
    assert skipping[1].loss != pytest.approx(plain[1].loss)
    assert all(record.skipped == 0 for record in plain)


def test_the_weight_average_follows_each_update_with_its_decay():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    average = weight_average(model, 0.75)
    assert weight_average(model, None) is None
    for value in (1.0, 3.0, 7.0):
        with torch.no_grad():
            for tensor in [*model.parameters(), model[1].running_mean]:
                tensor.fill_(value)
        average.update_parameters(model)
    expected = 0.75 * (0.75 * 1.0 + 0.25 * 3.0) + 0.25 * 7.0  # the first update takes the weights as they are
    assert torch.allclose(average.module[0].weight, torch.full((2, 2), expected))
    assert torch.allclose(average.module[1].running_mean, torch.full((2,), expected))  # BatchNorm statistics too
    assert torch.equal(model[0].weight, torch.full((2, 2), 7.0))  # the trained weights are left alone


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_training_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, ema_decay):
    train_images, train_masks = write_pairs(tmp_path / "train", 8, 32, 32, seed=2)
    val_images, val_masks = write_pairs(tmp_path / "val", 3, 36, 44, seed=3)
    config = SegmenterParams(encoder="resnet18", decoder_channels=16, image_size=32, batch_size=3, epochs=2, lr=0.01,
                             lr_head_factor=10.0, augmentation="flip", threads=1, ema_decay=ema_decay)
    spec = SegmenterSpec("resnet18", NUM_CLASSES, 16, 16, ("background", "square", "bar"))

    def run(folder: str, fingerprint: str = "fp", on_epoch=None):
        dataset = SegmentationDataset(train_images, train_masks, config.image_size, config.augmentation, seed=5)
        return train_segmenter(config, 5, spec, dataset, val_images, val_masks, tmp_path / folder, fingerprint,
                               on_epoch=on_epoch, extra_state={"mlflow_run_id": "abc"})

    uninterrupted = run("a")
    assert uninterrupted.resumed_from is None and uninterrupted.steps == 4 and len(uninterrupted.history) == 2
    assert all(0 <= record.val_miou <= 1 for record in uninterrupted.history)
    assert uninterrupted.history[1].lr < uninterrupted.history[0].lr  # poly decay

    def crash_after_first_epoch(record):
        if record.epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        run("b", on_epoch=crash_after_first_epoch)
    state = checkpoint.load(tmp_path / "b" / LAST)
    assert state["epoch"] == 1 and state["step"] == 2 and state["mlflow_run_id"] == "abc"
    assert ("average" in state) == (ema_decay is not None)
    resumed = run("b")
    assert resumed.resumed_from == 2 and resumed.steps == 4

    last_a, last_b = checkpoint.load(tmp_path / "a" / LAST), checkpoint.load(tmp_path / "b" / LAST)
    final_a, final_b = last_a["model"], last_b["model"]
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[key], final_b[key]) for key in final_a)
    if ema_decay is not None:  # the average resumes too, and it is not the trained weights
        assert all(torch.equal(last_a["average"][key], last_b["average"][key]) for key in last_a["average"])
        assert not all(torch.equal(last_a["average"][f"module.{key}"], final_a[key]) for key in final_a)
    assert [r.val_miou for r in uninterrupted.history] == [r.val_miou for r in resumed.history]
    assert resumed.best_epoch == uninterrupted.best_epoch
    assert all(torch.equal(uninterrupted.best_state[key], resumed.best_state[key]) for key in final_a)

    fresh = run("b", fingerprint="other params")
    assert fresh.resumed_from is None and fresh.steps == 4  # a checkpoint of other params is never continued

    model = tiny_segmenter()
    model.load_state_dict(resumed.best_state)
    scores = evaluate_segmenter(model, val_images, val_masks, NUM_CLASSES, batch_size=2)
    assert scores.miou == pytest.approx(resumed.best_miou)  # with ema_decay: the average is what was scored and kept


def test_evaluation_scores_a_perfect_prediction(tmp_path):
    images, masks = write_pairs(tmp_path, 2, 20, 24, seed=4)

    class Oracle(nn.Module):
        """Logits from the colours write_pairs paints: red square 1, blue bar 2, noise 0."""

        def forward(self, batch: torch.Tensor) -> torch.Tensor:
            red = (batch[:, 0] > 1.5) & (batch[:, 2] < 0)
            blue = batch[:, 2] > 1.0
            return F.one_hot(torch.where(red, 1, torch.where(blue, 2, 0)), NUM_CLASSES).permute(0, 3, 1, 2).float()

    scores = evaluate_segmenter(Oracle(), images, masks, NUM_CLASSES)
    assert scores.miou == pytest.approx(1.0)
