"""MLflow tracking: one run per stage execution, tagged with its lineage.

The store is ``sqlite:///<project root>/mlruns/mlflow.db`` with artifacts under
``<project root>/mlruns/artifacts/<experiment>`` (absolute paths: DVC may run a stage from another
folder); the environment variable ``MLFLOW_TRACKING_URI`` overrides it (another SQLite file keeps
its artifacts beside it; a tracking server with PostgreSQL decides where its artifacts go).
Each run carries the tags ``wsss.stage``, ``wsss.git_commit``, ``wsss.git_dirty`` and
``wsss.input.<name>`` (DVC's MD5 of each input file or folder, the value ``dvc.lock`` records;
taken from the lock where it still describes the files, see :func:`input_hashes`), how it ran (``wsss.processes``,
``wsss.device``, ``wsss.precision``, ``wsss.batchnorm``), plus the stage's flattened params.

A stage that reads the prepared manifest or the splits logs them as MLflow input datasets (the UI's
Datasets column), with DVC's MD5 as digest. Every run started under one ``dvc repro`` (or ``dvc exp run``) carries the same ``wsss.pipeline_run``
tag, so the UI's "Group by" shows each repro as one group (see :func:`pipeline_run_id`); the experiment
carries ``mlflow.experimentKind`` so that the MLflow 3 UI opens it on its training runs, not on traces.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from wsss.io import dvc_md5

STORE_DIR = "mlruns"
ROOT_ENV = "WSSS_PROJECT_ROOT"
PIPELINE_RUN_ENV = "WSSS_PIPELINE_RUN"
PIPELINE_RUN_TAG = "wsss.pipeline_run"
# MLflow 3's UI opens an experiment by its kind: this one holds model-training runs
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# inputs that are datasets: logged with mlflow.log_input (the UI's Datasets column), DVC's MD5 as digest
DATASET_INPUTS = ("prepared", "splits")
# where DVC runs `dvc exp run --temp` and queued experiments: <project>/.dvc/tmp/exps/<copy>
EXPERIMENT_COPIES = (".dvc", "tmp", "exps")
# the DVC commands whose stage runs form one group
_DVC_RUNS = {("repro",), ("exp", "run"), ("exp", "exec-run"), ("queue", "start")}


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


def store_root(root: Path) -> Path:
    """The project whose MLflow store a run in ``root`` logs to: ``root`` itself, or, for a copy that
    ``dvc exp run --temp`` or a ``dvc queue`` worker runs in (``<project>/.dvc/tmp/exps/...``), the
    project it was copied from, so that its runs outlive the copy and sit beside the workspace's."""
    root = Path(root).resolve()
    for folder in root.parents:
        dvc_folder = folder.parent.parent
        if (dvc_folder.name, folder.parent.name, folder.name) == EXPERIMENT_COPIES and dvc_folder.is_dir():
            return dvc_folder.parent
    return root


def default_tracking_uri(root: Path | None = None) -> str:
    """The project's own store: ``sqlite:///<root>/mlruns/mlflow.db`` (the outer project's for a
    ``dvc exp`` copy, see :func:`store_root`)."""
    store = (store_root(root or project_root()) / STORE_DIR).resolve()
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
    if experiment is None:
        try:
            return mlflow.create_experiment(name, artifact_location=artifact_location(uri, name), tags=EXPERIMENT_KIND)
        except mlflow.exceptions.MlflowException:  # created meanwhile by another process
            experiment = mlflow.get_experiment_by_name(name)
    missing = {key: value for key, value in EXPERIMENT_KIND.items() if key not in experiment.tags}
    for key, value in missing.items():  # an experiment created before the tag existed
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def _dvc_command(cmdline: list[str]) -> tuple[str, ...] | None:
    """The DVC subcommand of a process's command line (``dvc repro ...``, ``python -m dvc exp run ...``), or None."""
    for position, word in enumerate(cmdline):
        if Path(word).name == "dvc" or (word == "dvc" and position > 0 and cmdline[position - 1] == "-m"):
            words = tuple(w for w in cmdline[position + 1 :] if not w.startswith("-"))
            return next((command for command in _DVC_RUNS if words[: len(command)] == command), None)
    return None


def pipeline_run_id() -> str | None:
    """The id of the pipeline execution this process belongs to: ``$WSSS_PIPELINE_RUN`` if set, else
    derived from the nearest ancestor process that is a ``dvc repro`` / ``dvc exp run`` (its pid and
    start time: every stage of one repro gets the same id, the next repro another); None for a stage
    run by hand."""
    if os.environ.get(PIPELINE_RUN_ENV):
        return os.environ[PIPELINE_RUN_ENV]
    import psutil

    try:
        process = psutil.Process().parent()
        while process is not None:
            if _dvc_command(process.cmdline()) is not None:
                key = f"{process.pid}-{process.create_time():.3f}"
                return hashlib.sha256(key.encode()).hexdigest()[:16]
            process = process.parent()
    except (psutil.Error, OSError):  # a parent that ended or that we may not inspect: no group
        return None
    return None


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


class InputHashes(dict):
    """Input name -> DVC MD5, remembering each input's path (``paths``) for :func:`log_datasets`."""

    def __init__(self, hashes: Mapping[str, str], paths: Mapping[str, Path]):
        super().__init__(hashes)
        self.paths = dict(paths)


def input_hashes(inputs: Mapping[str, Path]) -> InputHashes:
    """DVC's MD5 of each named input file or folder: read from ``dvc.lock`` where the lock records it
    and the files still match it by size, count and modification time (a stage's inputs at LID scale
    are not read again), else computed the same way (:func:`wsss.io.dvc_md5`)."""
    hashes = {}
    for name, path in inputs.items():
        path = Path(os.path.abspath(path))
        repo = _repo_root(path)
        entry = locked_outputs(repo).get(path) if repo is not None else None
        hashes[name] = entry["md5"] if entry is not None and _still_locked(path, entry) else dvc_md5(path)
    return InputHashes(hashes, {name: Path(os.path.abspath(path)) for name, path in inputs.items()})


def log_datasets(datasets: Mapping[str, tuple[Path, str]]) -> None:
    """Log each ``name: (path, DVC MD5)`` as an input dataset of the active run (metadata only: the
    folder's URI and its digest; MLflow stores no data)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    for name, (path, digest) in datasets.items():
        with warnings.catch_warnings():  # MLflow registers its local-file source twice and says so
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(Path(path).resolve().as_uri())
        mlflow.log_input(MetaDataset(source, name=name, digest=digest), context="input")


def lineage_tags(stage: str, hashes: Mapping[str, str], root: Path) -> dict[str, str]:
    from wsss import distributed

    commit, dirty = git_state(root)
    context = distributed.current()
    tags = {"wsss.stage": stage, "wsss.git_commit": commit, "wsss.git_dirty": str(dirty).lower(),
            # how it ran (tags, not params: a run resumed on another machine may change them)
            "wsss.processes": str(context.world_size), "wsss.device": str(context.device),
            "wsss.precision": context.precision, "wsss.batchnorm": context.batchnorm}
    tags.update({f"wsss.input.{name}": digest for name, digest in hashes.items()})
    group = pipeline_run_id()
    if group is not None:
        tags[PIPELINE_RUN_TAG] = group
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
    computed = input_hashes(inputs or {})
    merged = {**computed, **(hashes or {})}
    paths = {**computed.paths, **getattr(hashes, "paths", {})}
    tags = lineage_tags(stage, merged, root)
    if resume_run_id is not None and not _run_exists(resume_run_id):
        resume_run_id = None
    if resume_run_id is not None:
        context = mlflow.start_run(run_id=resume_run_id)
    else:
        context = mlflow.start_run(experiment_id=experiment_id, run_name=stage)
    with context as run:
        mlflow.set_tags(tags)
        mlflow.log_params({key: _param_value(value) for key, value in params.items()})
        log_datasets({name: (paths[name], merged[name]) for name in DATASET_INPUTS if name in merged and name in paths})
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


def link_pipeline_runs(run_id: str) -> dict[str, str]:
    """Tag the pipeline run ``run_id`` with the ids of the other runs of its group, the stages that ran
    in the same repro: ``wsss.stage_run.<stage>`` = run id (the latest, where a stage ran twice).
    Returns the tags set (none for a run outside a group)."""
    import mlflow

    run = mlflow.get_run(run_id)
    group = run.data.tags.get(PIPELINE_RUN_TAG)
    if group is None:
        return {}
    members = mlflow.search_runs([run.info.experiment_id], filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{group}'",
                                 order_by=["attributes.start_time ASC"], output_format="list")
    tags = {f"wsss.stage_run.{member.data.tags['wsss.stage']}": member.info.run_id
            for member in members if member.info.run_id != run_id and "wsss.stage" in member.data.tags}
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    return tags
