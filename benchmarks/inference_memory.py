"""Peak memory and speed of the inference stages at N and 10 N images of VOC's size: is memory bounded
by the batch, not by the dataset?

For each N, writes a VOC-layout tree of N images (80 % train, 20 % val; sizes vary around VOC's
375 x 500, every fifth portrait, three to four classes drawn as boxes), sets up a copy of this
project on it with the paper profile's settings but small networks (``small_cnn`` classifier, IRNet
and DeepLabv3+ on it, 64 px training crops, one epoch each: the point is inference at full image
size), runs every main stage's script in order, and reads each stage's peak resident memory
(``ru_maxrss`` of the process and its children, e.g. the CRF's workers) and wall time. Prints one
table: peak MiB and images/s per stage at N and 10 N, and the ratio of the peaks.

    python benchmarks/inference_memory.py [--images 40] [--factor 10] [--workers 0] [--keep]
                                          [--variant MALLOC_MMAP_THRESHOLD_=1048576] [--variant-stages a,b]

The profile's ``compute.mmap_threshold_mib`` (1) applies unless ``--mmap-threshold-mib`` says
otherwise (0: glibc's moving default). ``--variant KEY=VALUE`` measures ``--variant-stages`` (pseudo_masks and evaluate) a second time with that environment variable (e.g.
a glibc malloc setting, to tell the dataset's size from the allocator's fragmentation) and adds columns.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from paper_project import command_env, copy_project, paper_document, write_voc_tree  # noqa: E402

SETUP = ("prepare", "split", "train_classifier")
MEASURED = ("cams", "ir_labels", "train_irnet", "pseudo_masks", "train_segmenter", "evaluate")
TARGETS = ("cams", "ir_labels", "pseudo_masks", "evaluate")  # the bound: inference stages
SMALL_NETWORKS = {
    "classifier.arch": "small_cnn", "classifier.weights": "none", "classifier.extra_convs": 1,
    "classifier.image_size": 64, "classifier.batch_size": 16, "classifier.epochs": 1,
    "irnet.backbone": "classifier", "irnet.backbone_weights": "none", "irnet.crop_size": 64,
    "irnet.batch_size": 16, "irnet.epochs": 1, "irnet.train_scales": [1.0],
    "segmenter.encoder": "classifier", "segmenter.encoder_weights": "none", "segmenter.image_size": 64,
    "segmenter.batch_size": 8, "segmenter.epochs": 1, "segmenter.decoder_channels": 32,
    "irnet.confidence_cutoff": 0.0, "compute.device": "cpu",
    # what memory may follow: one image per forward pass, four images per walk / CRF chunk, so that
    # N already fills every batch and chunk and 10 N differs from it only in the dataset's size
    "cams.batch_size": 1, "compute.eval_batch_size": 1, "compute.chunk_size": 4, "compute.shard_size": 8,
    # the pictures hold a fixed number of example images, which N must already fill (N = 20 has 4 val images)
    "cams.num_overlays": 1, "evaluate.num_figures": 1,
}

WRAPPER = """
import resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run([sys.executable, f"pipelines/{sys.argv[1]}.py"], capture_output=True, text=True)
seconds = time.perf_counter() - start
if done.returncode:
    sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
    sys.exit(done.returncode)
print(seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def build(root: Path, images: int, store: str, workers: int, mmap_threshold_mib: int | None) -> dict:
    copy_project(root)
    train = int(round(images * 0.8))
    write_voc_tree(root / "data" / "voc", train=train, val=images - train, size=(375, 500))
    overrides = {**SMALL_NETWORKS, "data.source": "voc", "data.root": "data/voc", "compute.workers": workers}
    if mmap_threshold_mib is not None:
        overrides["compute.mmap_threshold_mib"] = mmap_threshold_mib or None
    document = paper_document(overrides)
    (root / "params.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    env = command_env(store)
    env["PYTHONPATH"] = str(root / "src")  # the copy's code: edits here during a run change nothing
    return env


def measure(root: Path, env: dict, stage: str) -> tuple[float, float]:
    """(seconds, peak MiB) of one stage's script in a fresh process."""
    done = subprocess.run([sys.executable, "-c", WRAPPER, stage], cwd=root, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{stage} failed:\n{done.stderr}")
    seconds, kib = done.stdout.split()
    return float(seconds), int(kib) / 1024


def images_of(root: Path, stage: str) -> int:
    splits = {name: json.loads((root / "data/splits" / f"{name}.json").read_text())["images"] for name in ("train", "val", "test")}
    if stage in ("cams", "pseudo_masks"):
        return len(splits["train"]) + len(splits["val"])
    if stage in ("ir_labels", "train_irnet", "train_segmenter"):
        return len(splits["train"])
    return len(splits["val"]) + len(splits["test"])  # evaluate: val and test


def run_size(scratch: Path, images: int, workers: int, variant: dict[str, str], variant_stages: tuple[str, ...],
             mmap_threshold_mib: int | None) -> dict[str, tuple[float, float, int]]:
    root = scratch / f"n{images}"
    store = f"sqlite:///{scratch / f'mlflow-{images}.db'}"
    env = build(root, images, store, workers, mmap_threshold_mib)
    for stage in SETUP:
        measure(root, env, stage)
    results = {}
    for stage in MEASURED:
        seconds, peak = measure(root, env, stage)
        results[stage] = (seconds, peak, images_of(root, stage))
        print(f"  {images} images: {stage} {seconds:.1f} s, peak {peak:.0f} MiB", flush=True)
        if stage in variant_stages:  # the same stage again, its outputs rewritten alike
            seconds, peak = measure(root, {**env, **variant}, stage)
            results[f"{stage}+variant"] = (seconds, peak, images_of(root, stage))
            print(f"  {images} images: {stage} with {variant} {seconds:.1f} s, peak {peak:.0f} MiB", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40, help="N: images in the small tree")
    parser.add_argument("--factor", type=int, default=10, help="the large tree has factor x N images")
    parser.add_argument("--workers", type=int, default=0, help="compute.workers (loader processes)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE",
                        help="measure --variant-stages again with this environment variable")
    parser.add_argument("--variant-stages", default="pseudo_masks,evaluate")
    parser.add_argument("--mmap-threshold-mib", type=int, default=None,
                        help="compute.mmap_threshold_mib (default: the profile's; 0: glibc's moving default)")
    args = parser.parse_args()
    variant = dict(item.split("=", 1) for item in args.variant)
    variant_stages = tuple(args.variant_stages.split(",")) if variant else ()
    scratch = Path(tempfile.mkdtemp(prefix="wsss-memory-"))
    small, large = args.images, args.images * args.factor
    runs = {n: run_size(scratch, n, args.workers, variant, variant_stages, args.mmap_threshold_mib) for n in (small, large)}
    threshold = {None: "the profile's", 0: "glibc's default"}.get(args.mmap_threshold_mib, args.mmap_threshold_mib)
    print(f"\nVOC-sized trees (~375 x 500), small networks, CPU, compute.workers {args.workers}, "
          f"compute.mmap_threshold_mib {threshold}\n")
    print(f"| stage | peak MiB, N = {small} | peak MiB, {args.factor} N = {large} | ratio | images/s at N | images/s at {args.factor} N |")
    print("|---|---:|---:|---:|---:|---:|")
    for stage in MEASURED:
        (s1, p1, i1), (s2, p2, i2) = runs[small][stage], runs[large][stage]
        mark = " (target <= 1.2)" if stage in TARGETS else ""
        print(f"| {stage} | {p1:.0f} | {p2:.0f} | {p2 / p1:.2f}{mark} | {i1 / s1:.2f} | {i2 / s2:.2f} |")
        if f"{stage}+variant" in runs[small]:
            (s1, p1, i1), (s2, p2, i2) = runs[small][f"{stage}+variant"], runs[large][f"{stage}+variant"]
            label = " ".join(f"{key}={value}" for key, value in variant.items())
            print(f"| {stage}, {label} | {p1:.0f} | {p2:.0f} | {p2 / p1:.2f} | {i1 / s1:.2f} | {i2 / s2:.2f} |")
    if args.keep:
        print(f"\nkept: {scratch}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
