"""IRNet: a class-boundary branch and a displacement branch on five frozen backbone stages.

Backbones (``irnet.backbone``): ``resnet50`` (the paper's: stem, layer1..layer4 with layer4
dilated, strides 4, 4, 8, 16, 16; ImageNet weights through torchvision) or ``classifier`` (the
trained step-1 network: its four backbone stages and its extra convs as the fifth). The backbone
gets no gradient and keeps BatchNorm in eval mode whatever ``train()`` says.

Boundary branch: each stage -> 1x1 conv to 32 channels, GroupNorm(4), ReLU, resized to the
stride-4 grid (``ceil(H/4) x ceil(W/4)``), concatenated (160) -> 1x1 conv -> one logit.
Displacement branch: stages -> 64, 128, 256, 256, 256 channels (1x1 conv, GroupNorm, ReLU);
stages 3-5 are fused (1x1 conv to 256) and resized to the stride-4 grid, concatenated with
stages 1-2 -> 1x1 conv 256 -> 1x1 conv to 2 channels (dy, dx in grid units).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from wsss.errors import ConfigError
from wsss.models.classifier import CamClassifier, _load_state_dict, feature_stages, imagenet_state_dict


class FrozenStages(nn.Module):
    """Five feature stages of a backbone; frozen (no gradients, BatchNorm statistics fixed)."""

    def __init__(self, stages: list[nn.Module], channels: list[int]):
        super().__init__()
        if len(stages) != 5:
            raise ValueError("IRNet needs five backbone stages")
        self.stages = nn.ModuleList(stages)
        self.channels = channels
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenStages:  # noqa: ARG002 - the backbone never trains
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features, outputs = images, []
        for stage in self.stages:
            features = stage(features)
            outputs.append(features)
        return outputs


def classifier_stages(model: CamClassifier) -> FrozenStages:
    """The step-1 network as five frozen stages: its backbone's blocks, then its extra convs."""
    stages, channels, _ = feature_stages(model)
    return FrozenStages(stages, channels)


def resnet50_stages(weights: str) -> FrozenStages:
    import torchvision

    net = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, False, True])
    if weights != "none":
        if weights == "imagenet":
            state = imagenet_state_dict(torchvision.models.ResNet50_Weights.IMAGENET1K_V1, "irnet.backbone_weights")
        else:
            state = _load_state_dict(Path(weights), "irnet.backbone_weights")
        if not isinstance(state, dict):
            raise ConfigError("params.yaml", [("irnet.backbone_weights", f"{weights} does not hold a state dict")])
        try:
            net.load_state_dict(state)
        except RuntimeError as error:
            raise ConfigError("params.yaml", [("irnet.backbone_weights", f"{weights} does not fit torchvision's resnet50 ({error})")]) from None
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    return FrozenStages([stem, net.layer1, net.layer2, net.layer3, net.layer4], [64, 256, 512, 1024, 2048])


def _reduce(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.GroupNorm(4, cout), nn.ReLU(inplace=True))


def _resize(tensor: torch.Tensor, size: torch.Size) -> torch.Tensor:
    return tensor if tensor.shape[-2:] == size else F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)


class IRNet(nn.Module):
    def __init__(self, stages: FrozenStages):
        super().__init__()
        self.backbone = stages
        c = stages.channels
        self.boundary_reduce = nn.ModuleList([_reduce(ch, 32) for ch in c])
        self.boundary_head = nn.Conv2d(160, 1, 1)
        self.displacement_reduce = nn.ModuleList([_reduce(ch, out) for ch, out in zip(c, (64, 128, 256, 256, 256), strict=True)])
        self.displacement_fuse = _reduce(768, 256)
        self.displacement_head = nn.Sequential(_reduce(64 + 128 + 256, 256), nn.Conv2d(256, 2, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Boundary logits ``[N, 1, h, w]`` and displacement ``[N, 2, h, w]`` on the stride-4 grid."""
        features = [f.detach() for f in self.backbone(images)]
        # the stride-4 grid of the labels and CAMs, whatever the backbone's strides (VGG16's second stage is at /8)
        grid = torch.Size(((images.shape[-2] + 3) // 4, (images.shape[-1] + 3) // 4))
        boundary = torch.cat([_resize(reduce(f), grid) for reduce, f in zip(self.boundary_reduce, features, strict=True)], dim=1)
        reduced = [reduce(f) for reduce, f in zip(self.displacement_reduce, features, strict=True)]
        deep_grid = reduced[2].shape[-2:]
        deep = self.displacement_fuse(torch.cat([_resize(r, deep_grid) for r in reduced[2:]], dim=1))
        displacement = self.displacement_head(torch.cat([_resize(reduced[0], grid), _resize(reduced[1], grid), _resize(deep, grid)], dim=1))
        return self.boundary_head(boundary), displacement

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        boundary = list(self.boundary_reduce.parameters()) + list(self.boundary_head.parameters())
        displacement = [*self.displacement_reduce.parameters(), *self.displacement_fuse.parameters(), *self.displacement_head.parameters()]
        return {"boundary": boundary, "displacement": displacement}

    @torch.no_grad()
    def boundary_map(self, images: torch.Tensor) -> torch.Tensor:
        """Boundary probabilities ``[N, h, w]``, mean of the image and its mirror (paper)."""
        logits, _ = self(torch.cat([images, images.flip(-1)]))
        probabilities = torch.sigmoid(logits[:, 0])
        count = images.shape[0]
        return (probabilities[:count] + probabilities[count:].flip(-1)) / 2
