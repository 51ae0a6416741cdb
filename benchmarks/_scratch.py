"""A scratch project for the benchmarks: this checkout's outputs linked in, its own MLflow store."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def scratch_project(reused: Iterable[str]) -> Iterator[Path]:
    """A temporary project root with ``reused`` paths of this checkout symlinked in, a copy of
    ``params.yaml``, an empty ``dvc.yaml`` and ``MLFLOW_TRACKING_URI`` pointing into it."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for name in reused:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(REPO / name, root / name)
        shutil.copy(REPO / "params.yaml", root / "params.yaml")
        (root / "dvc.yaml").write_text("stages: {}\n")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        try:
            yield root
        finally:
            if previous is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = previous


def run_stages(params, reused: Iterable[str], stages: Iterable[str], read: Callable[[Path], object]) -> tuple[object, dict[str, float]]:
    """``stages`` (``wsss.stages.STAGES`` names) in turn on ``params`` in a :func:`scratch_project` with ``reused``
    linked in: what ``read(root)`` returns before the folder goes, and each stage's seconds."""
    from wsss.stages import STAGES

    with scratch_project(reused) as root:
        timings = {}
        for stage in stages:
            start = time.perf_counter()
            STAGES[stage](params, root)
            timings[stage] = time.perf_counter() - start
        return read(root), timings
