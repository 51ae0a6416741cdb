"""Milliseconds per training step of the CPU default's three networks, fp32 against bf16 autocast
(``compute.precision``), as the training loops run them: forward under autocast, the loss in fp32,
backward, optimizer step.

The classifier (``small_cnn`` + 1 extra conv, 32 images of 64 px, Adam), IRNet on the frozen
classifier (16 crops of 64 px, radius 5, SGD) and DeepLabv3+ on the classifier encoder (output
stride 8, decoder 64 channels, 16 images of 64 px, AdamW). Random weights and inputs; the median of
``--steps`` timed steps after three warm-up steps, on ``--threads`` threads. bf16 is fast only
where the CPU has bf16 instructions (``lscpu``: avx512_bf16 or amx_bf16); the table says which.

    python benchmarks/precision.py [--threads 2] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from wsss.affinity import half_plane_offsets
from wsss.distributed import cpu_flags
from wsss.irnet import irnet_losses
from wsss.models.classifier import build_classifier
from wsss.models.irnet import IRNet, classifier_stages
from wsss.models.segmenter import SegmenterSpec, build_segmenter


def _cpu_bf16_flags() -> str:
    found = sorted({"avx512_bf16", "amx_bf16", "bf16"} & cpu_flags())
    return ", ".join(found) or "none"


def _classifier_step() -> Callable[[str], None]:
    model = build_classifier("small_cnn", 6, 1)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    images, targets = torch.randn(32, 3, 64, 64), (torch.rand(32, 6) > 0.5).float()

    def forward() -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(model(images).float(), targets)

    return _step(forward, optimizer)


def _irnet_step() -> Callable[[str], None]:
    model = IRNet(classifier_stages(build_classifier("small_cnn", 6, 1)))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], 0.01, momentum=0.9)
    images, labels = torch.randn(16, 3, 64, 64), torch.randint(0, 3, (16, 64, 64))
    offsets = half_plane_offsets(5)
    return _step(lambda: irnet_losses(model, images, labels, offsets)["total"], optimizer)


def _segmenter_step() -> Callable[[str], None]:
    spec = SegmenterSpec(encoder="classifier", num_classes=8, output_stride=8, decoder_channels=64,
                         atrous_rates=(12, 24, 36), classifier_arch="small_cnn", classifier_extra_convs=1)
    model = build_segmenter(spec, "none")
    optimizer = torch.optim.AdamW(model.parameters(), 2e-3)
    images, masks = torch.randn(16, 3, 64, 64), torch.randint(0, 8, (16, 64, 64))
    return _step(lambda: F.cross_entropy(model(images).float(), masks), optimizer)


def _step(forward: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer) -> Callable[[str], None]:
    def step(precision: str) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = forward()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def median_ms(step: Callable[[str], None], precision: str, steps: int) -> float:
    for _ in range(3):
        step(precision)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(precision)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{args.threads} threads, torch {torch.__version__}, CPU bf16 instructions: {_cpu_bf16_flags()}")
    print("| network (training step) | fp32 ms | bf16 ms | speed-up |")
    print("|---|---:|---:|---:|")
    for name, build in (("classifier, 32 x 64 px", _classifier_step), ("IRNet, 16 x 64 px", _irnet_step),
                        ("DeepLabv3+, 16 x 64 px", _segmenter_step)):
        step = build()
        fp32, bf16 = median_ms(step, "fp32", args.steps), median_ms(step, "bf16", args.steps)
        print(f"| {name} | {fp32:.1f} | {bf16:.1f} | {fp32 / bf16:.2f}x |")


if __name__ == "__main__":
    main()
