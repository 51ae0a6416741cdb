"""Step 3's network: DeepLabv3+ from segmentation-models-pytorch, built from a :class:`SegmenterSpec`.

:func:`build_segmenter` is the factory: any smp encoder by name (``resnet50`` in the paper, with
ImageNet weights), or ``classifier``: the trained step-1 network (its backbone and extra convs,
output stride 8) under smp's DeepLabv3+ decoder, the CPU default's stand-in for ImageNet
pre-training (it has seen the training images with their image labels, nothing more).
:func:`save_segmenter` writes a model file that holds the spec, so :func:`load_segmenter`
rebuilds the network without params.yaml. smp's networks need height and width divisible by the
encoder's output stride; :func:`padded_forward` pads any image to that and crops the logits back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wsss import checkpoint
from wsss.errors import ConfigError, DataError
from wsss.models.classifier import (CamClassifier, _load_state_dict, build_classifier, feature_stages, imagenet_file,
                                    load_trained_classifier)

PARAMS_FILE = "params.yaml"
CLASSIFIER_ENCODER = "classifier"
DEFAULT_ATROUS_RATES = (12, 24, 36)  # smp's: DeepLabv3+'s (6, 12, 18) at output stride 16, doubled for 8
_TORCHVISION_HEAD = ("fc.", "classifier.")  # torchvision's ResNet / MobileNetV2 classifier layers: no encoder has them
# smp encoders whose ImageNet weights are torchvision's own file, which a package installs offline
# (wsss.models.classifier.imagenet_file): no download through the Hugging Face hub for these
_TORCHVISION_IMAGENET_FILES = {"mobilenet_v2": "mobilenet_v2-b0353104.pth"}
_EXAMPLE_ENCODERS = ("resnet18", "resnet34", "resnet50", "resnet101", "efficientnet-b0", "mobilenet_v2")


@dataclass(frozen=True)
class SegmenterSpec:
    """What rebuilds a trained segmenter: its architecture and its classes (index = class id)."""

    encoder: str
    num_classes: int
    output_stride: int = 16
    decoder_channels: int = 256
    class_names: tuple[str, ...] = ()
    atrous_rates: tuple[int, ...] = DEFAULT_ATROUS_RATES
    classifier_arch: str = ""  # encoder "classifier": the step-1 network's architecture and extra convs
    classifier_extra_convs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "encoder": self.encoder,
            "num_classes": self.num_classes,
            "output_stride": self.output_stride,
            "decoder_channels": self.decoder_channels,
            "class_names": list(self.class_names),
            "atrous_rates": list(self.atrous_rates),
            "classifier_arch": self.classifier_arch,
            "classifier_extra_convs": self.classifier_extra_convs,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SegmenterSpec:
        return cls(
            encoder=str(values["encoder"]),
            num_classes=int(values["num_classes"]),
            output_stride=int(values["output_stride"]),
            decoder_channels=int(values["decoder_channels"]),
            class_names=tuple(str(name) for name in values.get("class_names", ())),
            atrous_rates=tuple(int(rate) for rate in values.get("atrous_rates", DEFAULT_ATROUS_RATES)),
            classifier_arch=str(values.get("classifier_arch", "")),
            classifier_extra_convs=int(values.get("classifier_extra_convs", 0)),
        )


def encoder_names() -> list[str]:
    """smp's own encoder names (``tu-<timm model>`` names are accepted as well)."""
    import segmentation_models_pytorch as smp

    return smp.encoders.get_encoder_names()


class ClassifierEncoder(nn.Module):
    """The step-1 classifier's backbone and extra convs as an smp encoder (output stride 8).

    smp's DeepLabv3+ decoder reads ``features[2]`` (stride 4, its low-level branch) and
    ``features[-1]`` (the ASPP's input); slot 1 (stride 2 in smp's encoders) is not read."""

    output_stride = 8

    def __init__(self, classifier: CamClassifier):
        super().__init__()
        stages, channels, strides = feature_stages(classifier)
        low = max(index for index, stride in enumerate(strides) if stride == 4)
        self.low_level = nn.Sequential(*stages[: low + 1])
        self.high_level = nn.Sequential(*stages[low + 1 :])
        self.out_channels = (3, channels[low], channels[low], channels[-1])

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        low_level = self.low_level(images)
        return [images, low_level, low_level, self.high_level(low_level)]


def _classifier_deeplab(spec: SegmenterSpec, encoder_weights: str) -> nn.Module:
    """smp's DeepLabv3+ decoder and head on :class:`ClassifierEncoder`; ``encoder_weights``: ``none``
    or the step-1 model file (``models/classifier/model.pt``), whose network must be the spec's."""
    from segmentation_models_pytorch.base import SegmentationHead, SegmentationModel
    from segmentation_models_pytorch.decoders.deeplabv3.decoder import DeepLabV3PlusDecoder

    if spec.output_stride != ClassifierEncoder.output_stride:
        message = f"the classifier encoder has output stride {ClassifierEncoder.output_stride}, not {spec.output_stride}"
        raise ConfigError(PARAMS_FILE, [("segmenter.output_stride", message)])
    if encoder_weights == "none":
        classifier = build_classifier(spec.classifier_arch, 1, spec.classifier_extra_convs)
    else:
        classifier, state = load_trained_classifier(Path(encoder_weights))
        if (state["arch"], state["extra_convs"]) != (spec.classifier_arch, spec.classifier_extra_convs):
            message = (f"{encoder_weights} is a {state['arch']} with {state['extra_convs']} extra convs, "
                       f"not the classifier group's {spec.classifier_arch} with {spec.classifier_extra_convs}")
            raise ConfigError(PARAMS_FILE, [("segmenter.encoder", message)])

    class ClassifierDeepLabV3Plus(SegmentationModel):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = ClassifierEncoder(classifier)
            self.decoder = DeepLabV3PlusDecoder(encoder_channels=self.encoder.out_channels, encoder_depth=3,
                                                out_channels=spec.decoder_channels, atrous_rates=spec.atrous_rates,
                                                output_stride=8, aspp_separable=True, aspp_dropout=0.5)
            self.segmentation_head = SegmentationHead(spec.decoder_channels, spec.num_classes, kernel_size=1, upsampling=4)
            self.classification_head = None
            self.name = "deeplabv3plus-classifier"
            self.initialize()

    return ClassifierDeepLabV3Plus()


def build_segmenter(spec: SegmenterSpec, encoder_weights: str = "none") -> nn.Module:
    """DeepLabv3+ as ``spec`` says; ``encoder_weights``: ``none``, ``imagenet`` (download) or a
    local file (for the ``classifier`` encoder: the step-1 model file)."""
    import segmentation_models_pytorch as smp

    encoder, output_stride = spec.encoder, spec.output_stride
    if encoder == CLASSIFIER_ENCODER:
        return _classifier_deeplab(spec, encoder_weights)
    known = encoder_names()
    if encoder not in known and not encoder.startswith("tu-"):
        examples = ", ".join(name for name in _EXAMPLE_ENCODERS if name in known)
        message = f"unknown encoder {encoder!r}; e.g. {CLASSIFIER_ENCODER}, {examples} or tu-<timm model>"
        raise ConfigError(PARAMS_FILE, [("segmenter.encoder", message)])
    try:
        model = smp.DeepLabV3Plus(encoder_name=encoder, encoder_weights=None, encoder_output_stride=output_stride,
                                  decoder_channels=spec.decoder_channels, decoder_atrous_rates=spec.atrous_rates,
                                  classes=spec.num_classes)
    except (KeyError, ValueError, RuntimeError) as error:
        message = f"{encoder!r} cannot build DeepLabv3+ with output stride {output_stride} ({error})"
        raise ConfigError(PARAMS_FILE, [("segmenter.encoder", message)]) from None
    if encoder_weights == "imagenet":
        model.encoder.load_state_dict(_imagenet_encoder_state(encoder, output_stride))
    elif encoder_weights != "none":
        _load_local_encoder(model.encoder, Path(encoder_weights))
    return model


def _imagenet_encoder_state(encoder: str, output_stride: int) -> dict[str, torch.Tensor]:
    """smp's ImageNet weights for ``encoder``: torchvision's file where one is installed, else downloaded
    through the Hugging Face hub."""
    import segmentation_models_pytorch as smp

    local = imagenet_file(_TORCHVISION_IMAGENET_FILES[encoder]) if encoder in _TORCHVISION_IMAGENET_FILES else None
    if local is not None:
        state = _load_state_dict(local, "segmenter.encoder_weights")
        return {name: value for name, value in state.items() if not name.startswith(_TORCHVISION_HEAD)}
    weights: str | bool = True if encoder.startswith("tu-") else "imagenet"
    try:
        return smp.encoders.get_encoder(encoder, weights=weights, output_stride=output_stride).state_dict()
    except Exception as error:  # noqa: BLE001 - no such weights, no network, a broken cache: the user's to fix
        message = f"cannot get ImageNet weights for {encoder!r} ({error})"
        raise ConfigError(PARAMS_FILE, [("segmenter.encoder_weights", message)]) from None


def _load_local_encoder(encoder: nn.Module, path: Path) -> None:
    """Load an encoder state dict file: bare or under ``model`` / ``state_dict``, keys may start with ``encoder.``
    (a whole segmenter's weights); a torchvision ResNet's ``fc.*`` classifier keys are dropped."""
    key = "segmenter.encoder_weights"
    state = _load_state_dict(path, key)
    if isinstance(state, dict):
        for wrapper in ("model", "state_dict"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not (isinstance(state, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())):
        raise ConfigError(PARAMS_FILE, [(key, f"{path} does not hold a state dict of tensors")])
    if state and all(name.startswith("encoder.") for name in state):
        state = {name.removeprefix("encoder."): value for name, value in state.items()}
    state = {name: value for name, value in state.items() if not name.startswith(_TORCHVISION_HEAD)}
    expected = set(encoder.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ConfigError(PARAMS_FILE, [(key, f"{path} does not fit the encoder ({len(missing)} missing, "
                                              f"{len(unexpected)} unexpected keys; {detail})")])
    try:
        encoder.load_state_dict(state)
    except RuntimeError as error:
        raise ConfigError(PARAMS_FILE, [(key, f"{path} does not fit the encoder ({error})")]) from None


def save_segmenter(path: Path, model: nn.Module, spec: SegmenterSpec, extra: dict[str, Any] | None = None) -> None:
    """Atomically write a model file: weights, spec and any ``extra`` entries (e.g. metrics)."""
    extra = dict(extra or {})
    if {"model", "spec"} & set(extra):
        raise ValueError("extra entries must not be named 'model' or 'spec'")
    checkpoint.save(Path(path), {"model": model.state_dict(), "spec": spec.to_dict(), **extra})


def load_segmenter(path: Path) -> tuple[nn.Module, SegmenterSpec]:
    """Rebuild a trained segmenter from its model file, in eval mode (no download: the weights are inside)."""
    state = checkpoint.load(Path(path))
    try:
        spec = SegmenterSpec.from_dict(state["spec"])
        model = build_segmenter(spec)
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, ConfigError) as error:
        raise DataError(path, f"not a segmenter model file ({error})") from None
    model.eval()
    return model, spec


def input_multiple(model: nn.Module) -> int:
    """The number that the input's height and width must be multiples of (1 for networks without an smp encoder)."""
    return int(getattr(getattr(model, "encoder", None), "output_stride", 1) or 1)


def padded_forward(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Logits ``[N, C, H, W]`` for images of any size: pad bottom/right to the input multiple, run, crop."""
    height, width = images.shape[-2:]
    multiple = input_multiple(model)
    pad_height, pad_width = -height % multiple, -width % multiple
    if pad_height == 0 and pad_width == 0:
        return model(images)
    mode = "reflect" if pad_height < height and pad_width < width else "replicate"
    padded = F.pad(images, (0, pad_width, 0, pad_height), mode=mode)
    return model(padded)[..., :height, :width]
