"""A copy of this project as its own git + DVC repository with tiny params, for tests that run `dvc`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import REPO, make_document


def subprocess_env(tracking_uri: str) -> dict:
    """The environment of a `dvc` or `wsss` child process: this venv first, the test's MLflow store, one thread."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1", "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def run_ok(args: list[str], cwd: Path, env: dict) -> str:
    """Run a command that must succeed; its output (stdout + stderr)."""
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def stages_run(output: str) -> set[str]:
    """The stages a `dvc repro` output says it ran."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def dvc_project(folder: Path, tracking_uri: str, overrides: dict) -> tuple[Path, dict]:
    """``folder/clone``: dvc.yaml, pipelines, src and the Fashion-MNIST subset (no lock), a tiny
    params.yaml with ``overrides``, committed; and the environment to run `dvc` in it."""
    root = folder / "clone"
    root.mkdir()
    for name in ("dvc.yaml", "pipelines", "src", "data/sources/fashion-mnist"):
        source = REPO / name
        (shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "dvc.lock"))
         if source.is_dir() else shutil.copy(source, root / name))
    (root / "params.yaml").write_text(yaml.safe_dump(make_document(overrides)))
    env = subprocess_env(tracking_uri)
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        run_ok(command, root, env)
    return root, env
