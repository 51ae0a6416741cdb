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
