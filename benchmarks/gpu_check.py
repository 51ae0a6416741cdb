"""The prepared GPU check: one command that, on a lent GPU machine, runs the CUDA tests, measures the
paper networks' throughput and peak memory in fp32 and bf16, runs the paper profile's stages on a
generated VOC-layout tree at the paper's sizes (each stage's time and peak GPU memory), and estimates
the paper profile's hours on VOC and LID. Every table goes to ``--out`` (Markdown and JSON).

    python benchmarks/gpu_check.py --out "$OUT"                     # on the GPU machine (sized for < 8 min on one H100)
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu-check     # the same code paths on a CPU (CI: tests/test_gpu_check.py)

Parts (``--parts``, all by default): ``tests`` (pytest ``-m cuda``: they skip without CUDA),
``throughput`` (``benchmarks/throughput.py``'s networks at the paper's sizes, batch ``--batch``),
``repro`` (the shrunk-in-epochs paper profile, ``--images`` generated training images of about 375 x 500
(``--source lid``: a LID-layout tree of ~48 x 40 images, masks for val only), each stage of ``dvc.yaml`` in its order,
in this process, in ``--project`` if given (kept): needs mlflow, dvc and pydensecrf2, else
the part says what is missing). ``--wheels DIR`` first installs every wheel of a carried folder
(``benchmarks/gpu_wheels.py``; see ``benchmarks/README.md``). ``--smoke``: tiny sizes and counts, any device. A part that fails is
reported in ``summary.md`` and the others still run; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "benchmarks"), str(REPO / "tests")]  # runs without installing wsss
REPRO_MODULES = ("mlflow", "dvc", "pydensecrf", "segmentation_models_pytorch", "albumentations", "optuna")
# the paper profile's stages, in dvc.yaml's order
STAGES = ("prepare", "split", "train-classifier", "cams", "person-classifier", "ir-labels", "train-irnet", "pseudo-masks",
          "train-segmenter", "oracle", "evaluate", "report")


def part_tests(out: Path, smoke: bool) -> dict:
    """The tests marked cuda (tests/test_cuda.py); on a machine without CUDA they all skip."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", str(REPO / "tests/test_cuda.py")],
                          cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))})
    (out / "tests.txt").write_text(done.stdout + done.stderr)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    return {"ok": done.returncode == 0, "summary": summary}


def part_throughput(out: Path, smoke: bool, device, batch: int, steps: int) -> dict:
    import throughput

    sizes = throughput.SMOKE_SIZES if smoke else throughput.PAPER_SIZES
    precisions = ["fp32", "bf16"]
    results, text = {}, []
    from wsss.distributed import resolve_precision

    for precision in precisions:
        if precision == "bf16" and resolve_precision("auto", device) != "bf16" and (device.type == "cuda" or smoke):
            continue  # not native here: a GPU without bf16, or the smoke on a CPU without it (emulated: 10-25x slower)
        measured = throughput.measure(device, precision, batch, steps, sizes)
        results[precision] = {"measured": measured,
                              "hours": throughput.estimated_hours({k: v["seconds"] for k, v in measured.items()})}
        text += [f"### {precision}, training batch {batch}", "", throughput.tables(measured, sizes), ""]
    (out / "throughput.json").write_text(json.dumps(results, indent=1))
    (out / "throughput.md").write_text("\n".join(text))
    return {"ok": True, "summary": ", ".join(f"{p}: {sum(r['hours']['VOC 2012 (train_aug)'].values()):.1f} h VOC, "
                                                f"{sum(r['hours']['LID 2020 (balanced, paper)'].values()):.1f} h LID"
                                                for p, r in results.items())}


def install_wheels(folder: Path) -> None:
    """Every wheel of ``folder`` (benchmarks/gpu_wheels.py), without an index or their dependencies."""
    wheels = sorted(str(path) for path in folder.glob("*.whl"))
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *wheels], check=True)


def _repro_overrides(smoke: bool, weights: dict, source: str = "voc") -> dict:
    overrides = {**weights, "data.source": source, "data.root": f"data/{source}", "classifier.epochs": 1, "person.epochs": 1,
                 "irnet.epochs": 1, "segmenter.epochs": 1, "compute.precision": "auto"}
    if smoke:  # the code paths in under a minute on one core: no loader or CRF processes
        overrides.update({"compute.workers": 0, "crf.workers": 1})
    else:  # the paper's sizes and batches (profiles/paper.yaml), one epoch each
        overrides.update({"classifier.image_size": 352, "classifier.batch_size": 40, "cams.batch_size": 16, "irnet.crop_size": 512,
                          "irnet.batch_size": 32, "irnet.train_scales": [1.0, 0.5, 1.5, 2.0], "irnet.exp_times": 8,
                          "segmenter.image_size": 352, "segmenter.batch_size": 12, "segmenter.decoder_channels": 256,
                          "crf.workers": 0, "classifier.workers": 4, "irnet.workers": 4})
    return overrides


def part_repro(out: Path, smoke: bool, images: int, source: str = "voc", project: Path | None = None) -> dict:
    """The stages on a generated ``source`` tree in ``project`` (kept; default a temporary folder, removed)."""
    missing = [name for name in REPRO_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        return {"ok": False, "summary": f"not run: {', '.join(missing)} not installed (carry wheels, --wheels DIR)"}
    import torch
    import yaml
    from paper_project import paper_document, write_lid_tree, write_voc_tree, write_weights

    from wsss.cli import main as wsss

    cuda = torch.cuda.is_available()
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        root = project or scratch / "project"  # the stages run in this process: the project needs its params and data only
        root.mkdir(parents=True)
        shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
        size = (40, 48) if smoke or source == "lid" else (375, 500)
        if source == "voc":
            write_voc_tree(root / "data/voc", train=images, val=max(8, images // 4), size=size)
        else:  # images of ~48 x 40: LID's photos vary, the tree writer has one size
            write_lid_tree(root / "data/lid", train=images, val=max(8, images // 4))
        weights = write_weights(scratch / "weights")
        document = paper_document(_repro_overrides(smoke, weights, source))
        (root / "params.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'mlflow.db'}"
        rows = []
        for stage in STAGES:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            status = wsss([stage, "--root", str(root)])
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
            rows.append({"stage": stage, "seconds": seconds, "peak_mib": peak, "exit": status})
            if status != 0:
                break
        summary = json.loads((root / "metrics/evaluate.json").read_text()) if (root / "metrics/evaluate.json").is_file() else {}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lines = [f"paper profile, one epoch per training stage, {images} training images of ~{size[0]} x {size[1]} ({source.upper()} layout)",
             "", "| stage | seconds | peak GPU MiB | exit |", "|---|---:|---:|---:|"]
    lines += [f"| {r['stage']} | {r['seconds']:.1f} | {r['peak_mib']:.0f} | {r['exit']} |" if r["peak_mib"] is not None
              else f"| {r['stage']} | {r['seconds']:.1f} | n/a | {r['exit']} |" for r in rows]
    (out / "repro.md").write_text("\n".join(lines) + "\n")
    (out / "repro.json").write_text(json.dumps({"stages": rows, "evaluate": summary}, indent=1))
    ok = len(rows) == len(STAGES) and all(r["exit"] == 0 for r in rows)
    return {"ok": ok, "summary": f"{len(rows)} stages, {sum(r['seconds'] for r in rows):.0f} s" + ("" if ok else f", stopped at {rows[-1]['stage']}")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check")))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: the code paths on any machine in a minute or two")
    parser.add_argument("--parts", default="tests,throughput,repro")
    parser.add_argument("--batch", type=int, default=None, help="throughput training batch (default 8 on CUDA, 2 on a CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per figure (default 5, 1 with --smoke)")
    parser.add_argument("--images", type=int, default=None, help="repro: training images (default 300, 6 with --smoke)")
    parser.add_argument("--source", choices=("voc", "lid"), default="voc", help="repro: the layout of the generated tree")
    parser.add_argument("--project", type=Path, default=None, help="repro: build and keep the project here (default: removed)")
    parser.add_argument("--wheels", type=Path, default=None, help="install every wheel of this folder first (benchmarks/gpu_wheels.py)")
    args = parser.parse_args(argv)
    if args.wheels is not None:  # before the first import of what they hold
        install_wheels(args.wheels)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    batch = args.batch or (8 if device.type == "cuda" else 2)
    steps = args.steps or (1 if args.smoke else 5)
    images = args.images or (6 if args.smoke else 300)
    parts = {"tests": lambda: part_tests(args.out, args.smoke),
             "throughput": lambda: part_throughput(args.out, args.smoke, device, batch, steps),
             "repro": lambda: part_repro(args.out, args.smoke, images, args.source, args.project)}
    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({torch.backends.cpu.get_cpu_capability()})"
    lines = [f"# GPU check{' (smoke)' if args.smoke else ''}: {device_name}, torch {torch.__version__}", "",
             "| part | ok | seconds | result |", "|---|---|---:|---|"]
    failed = False
    for name in args.parts.split(","):
        start = time.perf_counter()
        try:
            result = parts[name]()
        except Exception:  # noqa: BLE001 - one part's failure is reported, the other parts still run
            (args.out / f"{name}.error.txt").write_text(traceback.format_exc())
            result = {"ok": False, "summary": f"raised: see {name}.error.txt"}
        failed |= not result["ok"] and not result["summary"].startswith("not run")
        lines.append(f"| {name} | {'yes' if result['ok'] else 'no'} | {time.perf_counter() - start:.0f} | {result['summary']} |")
        print(lines[-1], flush=True)
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print(f"tables in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
