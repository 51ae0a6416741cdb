"""Step 3's network: DeepLabv3+ from segmentation-models-pytorch, built by encoder name.

:func:`build_segmenter` is the factory (``segmenter.encoder``, ``encoder_weights``,
``output_stride``, ``decoder_channels``); :func:`save_segmenter` writes a model file that holds
its :class:`SegmenterSpec`, so :func:`load_segmenter` rebuilds the network without params.yaml.
smp's networks need height and width divisible by the encoder's output stride (8 or 16 once the
last stages are dilated); :func:`padded_forward` pads any image to that and crops the logits back.
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
from wsss.models.classifier import _load_state_dict

PARAMS_FILE = "params.yaml"
_TORCHVISION_HEAD = "fc."
_EXAMPLE_ENCODERS = ("resnet18", "resnet34", "resnet50", "resnet101", "efficientnet-b0", "mobilenet_v2")


@dataclass(frozen=True)
class SegmenterSpec:
    """What rebuilds a trained segmenter: its architecture and its classes (index = class id)."""

    encoder: str
    num_classes: int
    output_stride: int = 16
    decoder_channels: int = 256
    class_names: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "encoder": self.encoder,
            "num_classes": self.num_classes,
            "output_stride": self.output_stride,
            "decoder_channels": self.decoder_channels,
            "class_names": list(self.class_names),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SegmenterSpec:
        return cls(
            encoder=str(values["encoder"]),
            num_classes=int(values["num_classes"]),
            output_stride=int(values["output_stride"]),
            decoder_channels=int(values["decoder_channels"]),
            class_names=tuple(str(name) for name in values.get("class_names", ())),
        )


def encoder_names() -> list[str]:
    """smp's own encoder names (``tu-<timm model>`` names are accepted as well)."""
    import segmentation_models_pytorch as smp

    return smp.encoders.get_encoder_names()


def build_segmenter(encoder: str, num_classes: int, output_stride: int = 16, decoder_channels: int = 256,
                    encoder_weights: str = "none") -> nn.Module:
    """DeepLabv3+ with ``encoder``; ``encoder_weights``: ``none``, ``imagenet`` (download) or a local file."""
    import segmentation_models_pytorch as smp

    known = encoder_names()
    if encoder not in known and not encoder.startswith("tu-"):
        examples = ", ".join(name for name in _EXAMPLE_ENCODERS if name in known)
        message = f"unknown encoder {encoder!r}; e.g. {examples} or tu-<timm model>"
        raise ConfigError(PARAMS_FILE, [("segmenter.encoder", message)])
    try:
        model = smp.DeepLabV3Plus(encoder_name=encoder, encoder_weights=None, encoder_output_stride=output_stride,
                                  decoder_channels=decoder_channels, classes=num_classes)
    except (KeyError, ValueError, RuntimeError) as error:
        message = f"{encoder!r} cannot build DeepLabv3+ with output stride {output_stride} ({error})"
        raise ConfigError(PARAMS_FILE, [("segmenter.encoder", message)]) from None
    if encoder_weights == "imagenet":
        model.encoder.load_state_dict(_imagenet_encoder_state(encoder, output_stride))
    elif encoder_weights != "none":
        _load_local_encoder(model.encoder, Path(encoder_weights))
    return model


def _imagenet_encoder_state(encoder: str, output_stride: int) -> dict[str, torch.Tensor]:
    """smp's ImageNet weights for ``encoder`` (downloaded through the Hugging Face hub)."""
    import segmentation_models_pytorch as smp

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
        model = build_segmenter(spec.encoder, spec.num_classes, spec.output_stride, spec.decoder_channels, "none")
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
