"""Images per second of the paper's networks at the paper profile's sizes, and the hours of the paper
profile on VOC and LID that follow from them.

Random weights and inputs (speed does not depend on them): VGG16-BN-D1 + 4 extra convs trained at
352 px and its multi-scale CAMs (scales 1, 0.5, 1.5, 2 x flip) of a 375 x 500 image; IRNet on
ResNet-50 trained on 512 px crops and its inference (boundary map x flip + the random walk, radius 5,
beta 10, 2^8 steps, two classes) of a 375 x 500 image; DeepLabv3+ ResNet-50 at output stride 8 trained
at 352 px and its TTA (0.5, 1, 2 x flip) of a 375 x 500 image. Each figure is the median of
``--steps`` timed iterations after one warm-up.

The estimate multiplies each stage's images (training: images x epochs x IRNet's four scales) by
its measured time per image, with the profile's epochs: classifier 15, IRNet 3, segmenter 40 (and
the upper bound's 40 on VOC); CAMs of train + val, walks of train + val, TTA of val + test. The CRF
of the IR labels and the data stages are left out.

    python benchmarks/throughput.py [--device cpu|cuda] [--precision fp32|bf16] [--batch 2] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from wsss.affinity import half_plane_offsets
from wsss.cam import labelled_cams
from wsss.irnet import irnet_losses
from wsss.models.classifier import build_classifier
from wsss.models.irnet import IRNet, resnet50_stages
from wsss.models.segmenter import SegmenterSpec, build_segmenter
from wsss.random_walk import propagate_many
from wsss.tta import tta_logits

# images per stage: VOC train_aug / val (the held-out masks); LID as the paper balanced it (train / its
# own val part); LID's masked val set is not counted in the paper, so its evaluation is left out
DATASETS = {"VOC 2012 (train_aug)": {"train": 10_582, "val": 1_449, "heldout": 1_449},
            "LID 2020 (balanced, paper)": {"train": 72_946, "val": 12_873, "heldout": 0}}
EPOCHS = {"classifier": 15, "irnet": 3, "segmenter": 40}
IRNET_SCALES = 4
VOC_SIZE = (375, 500)


def timed(step, steps: int, device: torch.device) -> float:
    """Median seconds of ``step()`` over ``steps`` runs after one warm-up."""
    step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_step(model: torch.nn.Module, loss_of, autocast):
    """One SGD step of ``model`` on ``loss_of(model)`` under ``autocast``, as a callable to time."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def step():
        with autocast:
            loss = loss_of(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


PAPER_SIZES = {"classifier": 352, "irnet_crop": 512, "segmenter": 352, "image": VOC_SIZE}
SMOKE_SIZES = {"classifier": 16, "irnet_crop": 16, "segmenter": 16, "image": (24, 32)}  # the code paths on a CPU in seconds
WHAT = {"train_classifier": "training step, {classifier} px", "cams": "CAMs, 4 scales x flip, {h} x {w}",
        "train_irnet": "training step, {irnet_crop} px crop", "pseudo_masks": "boundary map x flip + walk, {h} x {w}",
        "train_segmenter": "training step, {segmenter} px", "evaluate": "TTA 0.5 1 2 x flip, {h} x {w}"}


def measure(device: torch.device, precision: str, batch: int, steps: int, sizes: dict = PAPER_SIZES) -> dict[str, dict]:
    """Per stage: ``seconds`` per image and ``peak_mib`` (the stage's peak CUDA memory; None on a CPU)."""
    torch.manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    image = torch.rand(1, 3, *sizes["image"], device=device)
    result: dict[str, dict] = {}

    def record(stage: str, step, per: int = 1) -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = timed(step, steps, device) / per
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        result[stage] = {"seconds": seconds, "peak_mib": peak}

    def step1() -> None:  # each network in a function of its own: its memory is freed before the next
        side = sizes["classifier"]
        classifier = build_classifier("vgg16_bn_d1", num_outputs=20, extra_convs=4).to(device)
        images, targets = torch.rand(batch, 3, side, side, device=device), torch.randint(0, 2, (batch, 20), device=device).float()
        record("train_classifier", training_step(classifier, lambda m: F.binary_cross_entropy_with_logits(m(images), targets), autocast), batch)
        classifier.eval()

        def cams_step():
            with torch.no_grad(), autocast:
                labelled_cams(classifier, image, [1.0, 0.5, 1.5, 2.0], [torch.tensor([3, 7])])

        record("cams", cams_step)

    def step2() -> None:
        crop = sizes["irnet_crop"]
        irnet = IRNet(resnet50_stages("none")).to(device)
        crops = torch.rand(batch, 3, crop, crop, device=device)
        labels = torch.randint(0, 3, (batch, crop, crop), device=device)
        labels[labels == 2] = 255
        offsets = half_plane_offsets(5)
        record("train_irnet", training_step(irnet, lambda m: irnet_losses(m, crops, labels, offsets)["total"], autocast), batch)
        irnet.eval()

        def walk_step():
            with torch.no_grad():
                boundary = irnet.boundary_map(image)[0].float()
                cams = torch.rand(2, *boundary.shape, device=device)
                propagate_many([cams], [boundary], 5, 10.0, 8)

        record("pseudo_masks", walk_step)

    def step3() -> None:
        side = sizes["segmenter"]
        segmenter = build_segmenter(SegmenterSpec("resnet50", 21, 8, 256, atrous_rates=(12, 24, 36))).to(device)
        images, masks = torch.rand(batch, 3, side, side, device=device), torch.randint(0, 21, (batch, side, side), device=device)
        record("train_segmenter", training_step(segmenter, lambda m: F.cross_entropy(m(images), masks, ignore_index=255), autocast), batch)
        segmenter.eval()

        def tta_step():
            with torch.no_grad(), autocast:
                tta_logits(segmenter, image, [0.5, 1.0, 2.0])

        record("evaluate", tta_step)

    for part in (step1, step2, step3):
        part()
    return result


def estimated_hours(seconds: dict[str, float]) -> dict[str, dict[str, float]]:
    """Hours per stage of the paper profile on each dataset, from ``seconds`` per image of each stage."""
    table = {}
    for name, counts in DATASETS.items():
        hours = {
            "classifier": counts["train"] * EPOCHS["classifier"] * seconds["train_classifier"],
            "cams": (counts["train"] + counts["val"]) * seconds["cams"],
            "irnet": counts["train"] * IRNET_SCALES * EPOCHS["irnet"] * seconds["train_irnet"],
            "pseudo": (counts["train"] + counts["val"]) * seconds["pseudo_masks"],
            "segmenter": counts["train"] * EPOCHS["segmenter"] * seconds["train_segmenter"] * (2 if name.startswith("VOC") else 1),
            "evaluate": counts["heldout"] * seconds["evaluate"],
        }
        table[name] = {key: value / 3600 for key, value in hours.items()}
    return table


def tables(measured: dict[str, dict], sizes: dict = PAPER_SIZES) -> str:
    """Markdown: images per second (and peak memory) per stage, then the estimated hours per dataset."""
    h, w = sizes["image"]
    lines = ["| stage | what one image costs | images/s | peak GPU MiB |", "|---|---|---:|---:|"]
    for stage, entry in measured.items():
        peak = f"{entry['peak_mib']:.0f}" if entry["peak_mib"] is not None else "n/a"
        lines.append(f"| {stage} | {WHAT[stage].format(h=h, w=w, **sizes)} | {1 / entry['seconds']:.2f} | {peak} |")
    lines += ["", "| dataset | classifier | CAMs | IRNet | pseudo masks | segmenter | evaluate | total hours |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, hours in estimated_hours({stage: entry["seconds"] for stage, entry in measured.items()}).items():
        cells = [f"{value:.1f}" if value or key != "evaluate" else "n/a" for key, value in hours.items()]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{sum(hours.values()):.1f}** |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--batch", type=int, default=2, help="training batch (the profile's 40 / 32 / 12 need a GPU)")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    measured = measure(torch.device(args.device), args.precision, args.batch, args.steps)
    print(f"\npaper networks, {args.device}, {args.precision}, training batch {args.batch}, torch threads {torch.get_num_threads()}\n")
    print(tables(measured))


if __name__ == "__main__":
    main()
