"""Time the data stages (prepare, split) on params.yaml, in a scratch folder; print a table.

    python benchmarks/data_stages.py [--params params.yaml]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from wsss.config import load_params
from wsss.data.prepare import prepare_dataset
from wsss.data.split import split_records, write_splits

REPO = Path(__file__).resolve().parents[1]


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        start = time.perf_counter()
        manifest = prepare_dataset(params, (REPO / params.data.root).resolve(), scratch / "prepared")
        prepared = time.perf_counter() - start
        start = time.perf_counter()
        result = split_records(manifest, params)
        write_splits(manifest, result, scratch / "splits")
        split = time.perf_counter() - start
        size = folder_size(scratch / "prepared")
        shutil.rmtree(scratch / "prepared")
    images = len(manifest.records)
    print(f"source {params.data.source}, {images} images, {os.cpu_count()} cores")
    print("| stage | seconds | images/s | output |")
    print("|---|---:|---:|---:|")
    print(f"| prepare | {prepared:.1f} | {images / prepared:.0f} | {size / 2**20:.1f} MiB |")
    print(f"| split | {split:.2f} | {images / split:.0f} | train {len(result.train)}, val {len(result.val)}, test {len(result.test)} |")


if __name__ == "__main__":
    main()
