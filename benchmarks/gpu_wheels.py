"""Fetch the Python 3.12 wheels that the lent GPU machine lacks, for ``benchmarks/gpu_check.py``, and print their size.

The GPU machine has Python 3.12 with torch, torchvision, timm, scikit-image, opencv and pytest, and nothing can
be downloaded there; at most 64 MiB travel with the working tree. ``--set base`` (the ``tests`` and
``throughput`` parts) is the library's own needs beyond that image; ``--set full`` adds what the ``repro`` part
runs (MLflow, DVC, Optuna and their dependencies). Versions are requirements.lock's.

    python benchmarks/gpu_wheels.py --set base --dest gpu_wheels      # then: run(carry=["gpu_wheels"], ...)
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# on the GPU machine's image already (or pulled in by what is): never carried
PRESENT = re.compile(r"^(torch|torchvision|triton|nvidia-.*|numpy|scipy|scikit-image|imageio|tifffile|lazy-loader|networkx|"
                     r"opencv-python.*|pillow|timm|huggingface.hub|safetensors|filelock|fsspec|jinja2|markupsafe|sympy|mpmath|"
                     r"setuptools|packaging|pytest.*|pluggy|iniconfig|pygments|requests|urllib3|idna|certifi|"
                     r"charset-normalizer|tqdm|pyyaml|typing.extensions|hf-xet)$", re.IGNORECASE)
BASE = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "pyyaml", "tqdm",
        "segmentation-models-pytorch", "albumentations", "albucore", "simsimd", "stringzilla")


def pinned() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name.lower().replace("_", "-")] = version.split(";")[0].strip()
    return pins


def wanted(which: str) -> list[str]:
    pins = pinned()
    if which == "base":
        names = [name for name in BASE if name in pins]
    else:
        names = [name for name in pins if not PRESENT.match(name) or name in BASE]
    return [f"{name}=={pins[name]}" for name in names if name != "pydensecrf2"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=("base", "full"), default="base")
    parser.add_argument("--dest", type=Path, default=Path("gpu_wheels"))
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(args.dest), "--python-version", "3.12",
               "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
               "--platform", "manylinux2014_x86_64", "--platform", "any"]
    failed = []
    for requirement in wanted(args.set):
        if subprocess.run([*command, requirement], capture_output=True).returncode:
            failed.append(requirement)
    if args.set == "full":  # no wheel exists: the sdist, built there (needs a C++ compiler and Cython on that machine)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary=:all:", "-d", str(args.dest),
                        f"pydensecrf2=={pinned().get('pydensecrf2', '1.1')}", "cython"], check=False)
    size = sum(path.stat().st_size for path in args.dest.iterdir())
    print(f"{args.set}: {len(list(args.dest.iterdir()))} files, {size / 2**20:.1f} MiB in {args.dest} (the carry allows 64 MiB)")
    if failed:
        print("no Python 3.12 wheel for: " + ", ".join(failed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
