"""What DVC pays for an output of many images: one file per image against shards of 128 images.

Writes a simulated stage output of ``--images`` images (``--bytes`` of incompressible data each, about
a VOC CAM record) twice into a fresh DVC repository (no Git): as one file per image and as
``shard-*.npz``-sized files of 128 images. For each layout: files, `dvc add` seconds (hashing and
copying into the cache), `dvc status` seconds just after (DVC's state knows the files) and after
touching every file's modification time (DVC must hash again), and `dvc push` seconds to a local remote.

    python benchmarks/storage.py [--images 100000] [--bytes 2048]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DVC = str(Path(sys.executable).parent / "dvc")
SHARD = 128


def dvc(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run([DVC, *args], cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def write(folder: Path, images: int, size: int, per_file: int) -> int:
    folder.mkdir(parents=True)
    rng = os.urandom
    files = 0
    for start in range(0, images, per_file):
        count = min(per_file, images - start)
        (folder / f"part-{start // per_file:06d}.bin").write_bytes(rng(size * count))
        files += 1
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--bytes", type=int, default=2048, help="bytes per image")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="wsss-storage-"))
    rows = []
    try:
        for name, per_file in (("one file per image", 1), (f"shards of {SHARD}", SHARD)):
            repo = scratch / name.replace(" ", "-")
            repo.mkdir()
            subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=repo, check=True)
            subprocess.run([DVC, "remote", "add", "-d", "-q", "local", str(repo / "remote")], cwd=repo, check=True)
            files = write(repo / "cams", args.images, args.bytes, per_file)
            added = dvc(["add", "-q", "cams"], repo)
            status = dvc(["status", "-q"], repo)
            now = time.time()
            for path in (repo / "cams").iterdir():
                os.utime(path, (now, now))
            rehash = dvc(["status", "-q"], repo)
            pushed = dvc(["push", "-q"], repo)
            rows.append((name, files, added, status, rehash, pushed))
            print(f"  {name}: done", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n{args.images} images x {args.bytes} bytes, DVC {subprocess.run([DVC, '--version'], capture_output=True, text=True).stdout.strip()}\n")
    print("| layout | files | `dvc add` s | `dvc status` s | `dvc status` s, mtimes touched | `dvc push` s (local remote) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, files, added, status, rehash, pushed in rows:
        print(f"| {name} | {files} | {added:.1f} | {status:.1f} | {rehash:.1f} | {pushed:.1f} |")


if __name__ == "__main__":
    main()
