"""What code a stage runs, and a digest of it.

A stage's code is its module of ``wsss.stages`` (``wsss.stages.sweep`` for the sweep) and every ``wsss``
module that module imports, at module or function level, transitively (found with :mod:`ast`, so
nothing is imported to find it). The same closure is what each stage of the three ``dvc.yaml``
files lists as deps (``tests/test_dvc_deps.py`` checks it), and its digest is part of every
checkpoint fingerprint, sweep study name and cache key: after a code change ``dvc repro`` re-runs
the stage, and the stage then retrains instead of taking a finished checkpoint of the old code.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the folder that holds the wsss package

# Library files that no stage output depends on, and why (paths relative to SOURCE_ROOT).
NOT_OUTPUT_CODE = {
    "wsss/__init__.py": "the version string",
    "wsss/cli.py": "the command line's dispatch",
    "wsss/stages/__init__.py": "the stage registry's dispatch",
    "wsss/config.py": "the params schema: the values a stage reads are its `params:` entries",
    "wsss/errors.py": "error types and their messages",
    "wsss/tracking.py": "MLflow runs, which are not DVC outputs",
    "wsss/serving.py": "MLflow models, which are not DVC outputs",
    "wsss/stages/paths.py": "the layout: dvc.yaml names the same paths as outs and deps",
    "wsss/provenance.py": "finds the code; the digest it computes changes with that code",
}


def module_file(src: Path, module: str) -> Path | None:
    """The file of a dotted module name under ``src`` (a package's ``__init__.py``), or None."""
    path = Path(src).joinpath(*module.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(src: Path, package: str, path: Path) -> set[str]:
    """The modules of ``package`` that ``path`` imports anywhere (function-level imports included),
    with their parent packages."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    modules = set()
    for name in found:
        parts = name.split(".")
        if parts[0] == package:
            modules.update(".".join(parts[:end]) for end in range(1, len(parts) + 1))
    return {m for m in modules if module_file(src, m) is not None}


def code_closure(src: Path, module: str) -> set[Path]:
    """The files of ``module`` and of every module of its package it imports, transitively."""
    package = module.split(".")[0]
    seen: set[str] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        pending.extend(imported_modules(src, package, module_file(src, name)))
    return {module_file(src, name) for name in seen}


def package_marker(path: Path) -> bool:
    """An ``__init__.py`` with nothing but a docstring: it cannot change what a stage computes."""
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def output_code(module: str, src: Path | None = None) -> list[Path]:
    """The files of ``module``'s closure that can change what it computes, sorted."""
    src = Path(src or SOURCE_ROOT)
    return sorted(path for path in code_closure(src, module)
                  if path.relative_to(src).as_posix() not in NOT_OUTPUT_CODE and not package_marker(path))


@cache
def _digest(module: str, src: Path) -> str:
    hasher = hashlib.sha256()
    for path in output_code(module, src):
        hasher.update(path.relative_to(src).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return hasher.hexdigest()


def code_digest(module: str) -> str:
    """SHA-256 of the code ``module`` runs (paths and contents), computed once per process."""
    return _digest(module, SOURCE_ROOT)


def clear_cache() -> None:
    """Forget computed digests (after the source changed under a running process: tests)."""
    _digest.cache_clear()
