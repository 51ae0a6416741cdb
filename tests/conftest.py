"""Shared fixtures: tiny parameter sets, temporary projects and a pre-migrated MLflow store."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest
import yaml
from paper_project import set_dotted

from wsss.config import Params, validate_params

REPO = Path(__file__).resolve().parents[1]
FASHION_SUBSET = REPO / "data/sources/fashion-mnist/fashion_mnist_subset.npz"

TINY = {
    "data.embedded.num_train": 80,
    "data.embedded.num_heldout": 24,
    "data.embedded.image_size": 32,
}


# The files that take more than ~10 s, longest first (`make test`: pytest-xdist hands out whole files in
# collection order, --no-loadscope-reorder): one started last would leave the other worker, and its core, idle
# at the end (longest first: the tail is a short file). Worker seconds per file, benchmarks/README.md.
SLOW_FILES = ("test_paper_repro_voc.py", "test_distributed.py", "test_faults.py", "test_dvc_pipeline.py",
              "test_ablation.py", "test_gpu_check.py", "test_sweep.py", "test_segmentation.py", "test_step1.py",
              "test_step3.py", "test_paper_path.py", "test_heap.py")


def pytest_configure(config) -> None:
    """With one xdist worker per core (`make test`), each worker and the stages it starts keep to a core of
    their own (CPU affinity: the stages' threads follow it, wsss.distributed.available_cpus): torch threads of
    two workers on one core spin against each other and ran the suite 1.5-2x slower."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        if count >= len(cpus) > 1:
            os.sched_setaffinity(0, {cpus[int(worker.removeprefix("gw")) % len(cpus)]})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: each file's own order stays


def default_document() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def make_document(overrides: dict | None = None, tiny: bool = True) -> dict:
    document = copy.deepcopy(default_document())
    for key, value in {**(TINY if tiny else {}), **(overrides or {})}.items():
        set_dotted(document, key, value)
    return document


def make_params(overrides: dict | None = None, tiny: bool = True) -> Params:
    return validate_params(make_document(overrides, tiny))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A temporary project root with the Fashion-MNIST subset and a tiny params.yaml."""
    root = tmp_path / "project"
    (root / "data/sources/fashion-mnist").mkdir(parents=True)
    shutil.copy(FASHION_SUBSET, root / "data/sources/fashion-mnist")
    (root / "params.yaml").write_text(yaml.safe_dump(make_document()))
    (root / "dvc.yaml").write_text("stages: {}\n")
    return root


@pytest.fixture(scope="session")
def _migrated_store(tmp_path_factory) -> Path:
    """An MLflow SQLite database migrated once per session (a fresh one costs ~1.5 s)."""
    import mlflow

    folder = tmp_path_factory.mktemp("mlflow-template")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.search_experiments()  # creates and migrates the tables
    return folder / "mlflow.db"


@pytest.fixture
def mlflow_store(tmp_path: Path, _migrated_store: Path, monkeypatch) -> str:
    """A private MLflow store for one test, exported as ``MLFLOW_TRACKING_URI``."""
    import mlflow

    store = tmp_path / "mlruns"
    store.mkdir()
    shutil.copy(_migrated_store, store / "mlflow.db")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine two threads are many times slower for tiny nets."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
