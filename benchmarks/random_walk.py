"""Sparse random walk vs irn's dense T^(2^exp_times): time, peak memory, label agreement.

Each method runs in its own process (memory: the rise of its peak RSS over the RSS it had before
the walk, with inputs loaded; Linux), on the same random boundary
map and CAMs of a ``grid x grid`` stride-4 grid (128 = a 512 x 512 image) with ``classes``
foreground classes; labels are the argmax with a background plane at 0.3 after the walk.

    python benchmarks/random_walk.py --grid 128 --classes 20      # the issue's setting (dense: minutes)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def inputs(grid: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    boundary = np.zeros((grid, grid), dtype=np.float32)
    for _ in range(6):  # a few closed rectangular boundaries, like object outlines
        top, left = rng.integers(0, grid - 20, 2)
        height, width = rng.integers(10, grid // 2, 2)
        bottom, right = min(grid - 1, top + height), min(grid - 1, left + width)
        boundary[top, left:right] = boundary[bottom, left:right] = 0.9
        boundary[top:bottom, left] = boundary[top:bottom, right] = 0.9
    boundary += rng.random((grid, grid), dtype=np.float32) * 0.1
    cams = rng.random((classes, grid, grid), dtype=np.float32) ** 4
    return torch.from_numpy(cams), torch.from_numpy(boundary)


def labels(walked: torch.Tensor) -> np.ndarray:
    normalised = walked / (walked.max() + 1e-5)
    return torch.cat([torch.full((1, *walked.shape[1:]), 0.3), normalised]).argmax(dim=0).numpy()


def run_one(method: str, grid: int, classes: int, out: Path) -> None:
    from wsss.random_walk import propagate, propagate_dense

    torch.set_num_threads(torch.get_num_threads())
    cams, boundary = inputs(grid, classes)
    baseline_kib = _current_rss_kib()
    walk = propagate if method == "sparse" else propagate_dense
    start = time.perf_counter()
    walked = walk(cams, boundary, radius=5, beta=10.0, exp_times=8)
    seconds = time.perf_counter() - start
    np.save(out / f"{method}.npy", labels(walked))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (out / f"{method}.json").write_text(json.dumps({"seconds": seconds, "peak_mib": (peak_kib - baseline_kib) / 1024}))


def _current_rss_kib() -> int:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * resource.getpagesize() // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=128)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--method", choices=["both", "sparse", "dense"], default="both")
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method != "both":
        run_one(args.method, args.grid, args.classes, Path(args.out))
        return
    with tempfile.TemporaryDirectory() as scratch:
        for method in ("sparse", "dense"):
            subprocess.run([sys.executable, __file__, "--grid", str(args.grid), "--classes", str(args.classes),
                            "--method", method, "--out", scratch], check=True)
        results = {m: json.loads((Path(scratch) / f"{m}.json").read_text()) for m in ("sparse", "dense")}
        agreement = float((np.load(Path(scratch) / "sparse.npy") == np.load(Path(scratch) / "dense.npy")).mean())
    sparse, dense = results["sparse"], results["dense"]
    print(f"grid {args.grid}x{args.grid} (N = {args.grid ** 2}), {args.classes} classes, radius 5, beta 10, 2^8 steps, "
          f"{torch.get_num_threads()} threads")
    print("| method | seconds | peak memory of the walk, MiB |")
    print("|---|---:|---:|")
    print(f"| sparse (scipy CSR, 256 products) | {sparse['seconds']:.2f} | {sparse['peak_mib']:.0f} |")
    print(f"| dense (T^256 by 8 squarings) | {dense['seconds']:.2f} | {dense['peak_mib']:.0f} |")
    print(f"| ratio | {dense['seconds'] / sparse['seconds']:.1f}x faster | {dense['peak_mib'] / sparse['peak_mib']:.1f}x less |")
    print(f"\nsame label on {100 * agreement:.3f}% of the grid")


if __name__ == "__main__":
    main()
