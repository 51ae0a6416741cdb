"""MLflow tracking: one run per stage execution, tagged with its lineage.

The store is ``sqlite:///<project root>/mlruns/mlflow.db`` with artifacts under
``<project root>/mlruns/artifacts/<experiment>`` (absolute paths: DVC may run a stage from another
folder); the environment variable ``MLFLOW_TRACKING_URI`` overrides it (another SQLite file keeps
its artifacts beside it; a tracking server with PostgreSQL decides where its artifacts go).
Each run carries the tags ``wsss.stage``, ``wsss.git_commit``, ``wsss.git_dirty`` and
``wsss.input.<name>`` (SHA-256 of each input file or folder), plus the stage's flattened params.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from wsss.io import content_hash

STORE_DIR = "mlruns"
ROOT_ENV = "WSSS_PROJECT_ROOT"


def project_root(start: Path | None = None) -> Path:
    """The project folder: ``$WSSS_PROJECT_ROOT``, else the nearest parent holding ``dvc.yaml``
    and ``params.yaml``, else the current folder."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV]).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "params.yaml").is_file():
            return folder
    return here


def default_tracking_uri(root: Path | None = None) -> str:
    """The project's own store: ``sqlite:///<root>/mlruns/mlflow.db``."""
    store = ((root or project_root()) / STORE_DIR).resolve()
    return f"sqlite:///{store / 'mlflow.db'}"


def tracking_uri(root: Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the project's own SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a SQLite store live beside its database (``<db folder>/artifacts/<name>``);
    a tracking server or another backend decides for itself (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///"))
    return (database.parent / "artifacts" / experiment).resolve().as_uri()


def ensure_experiment(name: str, root: Path | None = None) -> str:
    """Create the experiment if needed (artifacts per :func:`artifact_location`); return its id."""
    import mlflow

    uri = tracking_uri(root)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)  # note: MLflow also exports it as $MLFLOW_TRACKING_URI
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location(uri, name))
    except mlflow.exceptions.MlflowException:  # created meanwhile by another process
        return mlflow.get_experiment_by_name(name).experiment_id


def git_state(root: Path) -> tuple[str, bool | None]:
    """(commit sha or "unknown", whether tracked files differ from it or None if unknown)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", None
    return commit, bool(status.strip())


def lineage_tags(stage: str, inputs: Mapping[str, Path], root: Path) -> dict[str, str]:
    commit, dirty = git_state(root)
    tags = {"wsss.stage": stage, "wsss.git_commit": commit, "wsss.git_dirty": str(dirty).lower()}
    for name, path in inputs.items():
        tags[f"wsss.input.{name}"] = content_hash(Path(path))
    return tags


@contextlib.contextmanager
def stage_run(
    stage: str,
    experiment: str,
    params: Mapping[str, Any],
    inputs: Mapping[str, Path],
    root: Path | None = None,
    extra_tags: Mapping[str, str] | None = None,
) -> Iterator[Any]:
    """Open the MLflow run of one stage execution, log its params and lineage tags, yield it.

    A stage that raises ends its run as FAILED (MLflow's context manager does that)."""
    import mlflow

    root = root or project_root()
    experiment_id = ensure_experiment(experiment, root)
    tags = {**lineage_tags(stage, inputs, root), **(extra_tags or {})}
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=tags) as run:
        mlflow.log_params({key: _param_value(value) for key, value in params.items()})
        yield run


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."
