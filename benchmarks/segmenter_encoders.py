"""DeepLabv3+ encoders on this checkout's pseudo masks: val mIoU per epoch and seconds per epoch.

Trains the ``segmenter`` group of ``params.yaml`` once per ``--encoder`` (each ``name[:key=value;...]``
overrides segmenter keys, e.g. ``resnet18:output_stride=16;atrous_rates=[12,24,36]``), with no
checkpoint to resume from, on the training images and ``pseudo_masks/train`` (run
``dvc repro pseudo_masks`` first), and prints one row per encoder. ``classifier`` needs
``models/classifier/model.pt``.

    python benchmarks/segmenter_encoders.py --epochs 7 --encoder classifier 'resnet18:output_stride=16;atrous_rates=[12,24,36]'
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from _scratch import REPO
from wsss import distributed
from wsss.config import load_params
from wsss.data.manifest import load_manifest
from wsss.segmentation import SegmentationDataset, train_segmenter
from wsss.shards import stored_masks
from wsss.stages.segmenter import encoder_inputs, segmenter_spec


def parse_encoder(text: str) -> tuple[str, dict]:
    """``name[:key=value;...]``: the encoder and its segmenter overrides (values as JSON where they parse)."""
    name, _, rest = text.partition(":")
    overrides: dict = {"encoder": name}
    for pair in filter(None, rest.split(";")):
        key, _, value = pair.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return name, overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", nargs="+", default=["classifier"])
    parser.add_argument("--epochs", type=int, default=None, help="default: segmenter.epochs")
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    distributed.init(params.compute)  # compute.precision and compute.device, as the stages run
    train = load_manifest(REPO / "data/splits/train.json")
    val = load_manifest(REPO / "data/splits/val.json")
    images = [train.image_path(r) for r in train.records]
    masks = stored_masks(REPO / "pseudo_masks/train", [r.id for r in train.records])
    val_records = [r for r in val.records if r.mask is not None]
    print(f"{len(images)} training images, {len(val_records)} val images, {os.cpu_count()} cores")
    print("| encoder | settings | epochs | val mIoU per epoch | best | seconds per epoch |")
    print("|---|---|---:|---|---:|---:|")
    for text in args.encoder:
        name, overrides = parse_encoder(text)
        if args.epochs:
            overrides["epochs"] = args.epochs
        config = params.segmenter.model_copy(update=overrides)
        config = type(config).model_validate(config.model_dump())
        run_params = params.model_copy(update={"segmenter": config})
        weights, _ = encoder_inputs(run_params, REPO)
        dataset = SegmentationDataset(images, masks, config.image_size, config.augmentation, params.seed, train.num_classes,
                                      config.scale_range)
        stamps = [time.perf_counter()]
        with tempfile.TemporaryDirectory() as checkpoints:
            result = train_segmenter(config, params.seed, segmenter_spec(run_params, train), dataset,
                                     [val.image_path(r) for r in val_records], [val.mask_path(r) for r in val_records],
                                     Path(checkpoints), "benchmark", encoder_weights=weights,
                                     on_epoch=lambda _: stamps.append(time.perf_counter()), desc=name)
        per_epoch = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
        settings = f"OS{config.output_stride}, ASPP rates {list(config.atrous_rates)}, decoder {config.decoder_channels}"
        curve = " ".join(f"{r.val_miou:.3f}" for r in result.history)
        print(f"| {name} | {settings} | {config.epochs} | {curve} | {result.best_miou:.3f} | {per_epoch:.0f} |", flush=True)


if __name__ == "__main__":
    main()
