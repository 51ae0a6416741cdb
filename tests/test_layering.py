"""The library (``src/wsss``, but the command line and the stages) never imports ``wsss.stages``: stage
modules do the I/O, tracking and orchestration and call the library, never the other way round."""

from __future__ import annotations

import pytest

from wsss import provenance
from wsss.provenance import code_closure

SRC = provenance.SOURCE_ROOT
ENTRY_POINTS = {"wsss.cli", "wsss.__main__"}  # the command line dispatches to the stages


def _library_modules() -> list[str]:
    modules = []
    for path in sorted((SRC / "wsss").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[1:2] == ("stages",):
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name not in ENTRY_POINTS:
            modules.append(name)
    return modules


def test_the_library_modules_are_found():
    modules = _library_modules()
    assert {"wsss.random_walk", "wsss.person", "wsss.models.segmenter", "wsss.data.manifest"} <= set(modules)
    assert not any(m.startswith("wsss.stages") for m in modules)


@pytest.mark.parametrize("module", _library_modules())
def test_no_library_module_imports_a_stage(module):
    stage_files = sorted(p.relative_to(SRC).as_posix() for p in code_closure(SRC, module) if "stages" in p.relative_to(SRC).parts)
    assert stage_files == [], f"{module} imports (directly or through others) {stage_files}"
