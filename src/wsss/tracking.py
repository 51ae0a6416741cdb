"""MLflow tracking: one run per stage execution, tagged with its lineage.

The store is ``sqlite:///<project root>/mlruns/mlflow.db`` with artifacts under
``<project root>/mlruns/artifacts/<experiment>`` (absolute paths: DVC may run a stage from another
folder); the environment variable ``MLFLOW_TRACKING_URI`` overrides it (another SQLite file keeps
its artifacts beside it; a tracking server with PostgreSQL decides where its artifacts go).
Each run carries the tags ``wsss.stage``, ``wsss.git_commit``, ``wsss.git_dirty`` and
``wsss.input.<name>`` (DVC's MD5 of each input file or folder, the value ``dvc.lock`` records;
taken from the lock where it still describes the files, see :func:`input_hashes`), how it ran (``wsss.processes``,
``wsss.device``, ``wsss.precision``, ``wsss.batchnorm``), plus the stage's flattened params.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from wsss.io import dvc_md5

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


def _repo_root(path: Path) -> Path | None:
    for folder in (path, *path.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return None


_LOCKS: dict[tuple[str, int], dict[Path, dict]] = {}


def locked_outputs(repo: Path) -> dict[Path, dict]:
    """The outputs that the repo's ``dvc.lock`` files record (main and ``pipelines/*``): absolute path
    -> ``{md5, size, nfiles}``, each with the mtime of its lock file (``lock_mtime``)."""
    found: dict[Path, dict] = {}
    for lock in [repo / "dvc.lock", *sorted((repo / "pipelines").glob("*/dvc.lock"))]:
        try:
            mtime = lock.stat().st_mtime_ns
        except FileNotFoundError:
            continue
        key = (str(lock), mtime)
        if key not in _LOCKS:
            import yaml

            entries: dict[Path, dict] = {}
            try:
                stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
            except (OSError, yaml.YAMLError):
                stages = {}
            for stage in stages.values() if isinstance(stages, dict) else ():
                for out in stage.get("outs", []) if isinstance(stage, dict) else ():
                    if isinstance(out, dict) and out.get("hash") == "md5" and "md5" in out and "path" in out:
                        path = Path(os.path.normpath(lock.parent / out["path"]))
                        entries[path] = {**out, "lock_mtime": mtime}
            _LOCKS[key] = entries
        found.update(_LOCKS[key])
    return found


def _still_locked(path: Path, entry: dict) -> bool:
    """Whether ``path`` still looks like what the lock recorded: same size and file count, and nothing
    in it modified after the lock was written (the check DVC's own state makes, by stat, no reading)."""
    try:
        if path.is_file():
            stat = path.stat()
            return stat.st_size == entry.get("size") and stat.st_mtime_ns <= entry["lock_mtime"]
        count = size = 0
        for folder, _, names in os.walk(path):
            for name in names:
                stat = os.stat(os.path.join(folder, name))
                if stat.st_mtime_ns > entry["lock_mtime"]:
                    return False
                count, size = count + 1, size + stat.st_size
        return count == entry.get("nfiles") and size == entry.get("size")
    except OSError:
        return False


def input_hashes(inputs: Mapping[str, Path]) -> dict[str, str]:
    """DVC's MD5 of each named input file or folder: read from ``dvc.lock`` where the lock records it
    and the files still match it by size, count and modification time (a stage's inputs at LID scale
    are not read again), else computed the same way (:func:`wsss.io.dvc_md5`)."""
    hashes = {}
    for name, path in inputs.items():
        path = Path(os.path.abspath(path))
        repo = _repo_root(path)
        entry = locked_outputs(repo).get(path) if repo is not None else None
        hashes[name] = entry["md5"] if entry is not None and _still_locked(path, entry) else dvc_md5(path)
    return hashes


def lineage_tags(stage: str, hashes: Mapping[str, str], root: Path) -> dict[str, str]:
    from wsss import distributed

    commit, dirty = git_state(root)
    context = distributed.current()
    tags = {"wsss.stage": stage, "wsss.git_commit": commit, "wsss.git_dirty": str(dirty).lower(),
            # how it ran (tags, not params: a run resumed on another machine may change them)
            "wsss.processes": str(context.world_size), "wsss.device": str(context.device),
            "wsss.precision": context.precision, "wsss.batchnorm": context.batchnorm}
    tags.update({f"wsss.input.{name}": digest for name, digest in hashes.items()})
    return tags


@contextlib.contextmanager
def stage_run(
    stage: str,
    experiment: str,
    params: Mapping[str, Any],
    inputs: Mapping[str, Path] | None = None,
    root: Path | None = None,
    hashes: Mapping[str, str] | None = None,
    resume_run_id: str | None = None,
) -> Iterator[Any]:
    """Open the MLflow run of one stage execution, log its params and lineage tags, yield it.

    Inputs are hashed here, or passed already hashed (``hashes``). ``resume_run_id`` continues
    the run of an execution that was killed (its id is kept in the stage's checkpoint), so a
    resumed stage is still one run. A stage that raises ends its run as FAILED."""
    import mlflow

    root = root or project_root()
    experiment_id = ensure_experiment(experiment, root)
    tags = lineage_tags(stage, {**input_hashes(inputs or {}), **(hashes or {})}, root)
    if resume_run_id is not None and not _run_exists(resume_run_id):
        resume_run_id = None
    if resume_run_id is not None:
        context = mlflow.start_run(run_id=resume_run_id)
    else:
        context = mlflow.start_run(experiment_id=experiment_id, run_name=stage)
    with context as run:
        mlflow.set_tags(tags)
        mlflow.log_params({key: _param_value(value) for key, value in params.items()})
        yield run


def _run_exists(run_id: str) -> bool:
    import mlflow

    try:
        mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return True


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."
