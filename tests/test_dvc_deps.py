"""Each DVC stage lists as deps the library code it runs, so that `dvc repro` re-runs it when that
code changes (a stage whose code changed but whose deps did not would keep stale outputs).

A stage runs its entry script, which calls one stage module of ``wsss.stages`` (``wsss.stages.sweep`` for the
sweep); what that module imports, at module or function level, transitively, is its code."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from wsss import provenance
from wsss.config import SPEED_KNOBS
from wsss.provenance import code_closure
from wsss.stages import ABLATION_STAGES, STAGES

REPO = Path(__file__).resolve().parents[1]
PIPELINES = ("dvc.yaml", "pipelines/ablation/dvc.yaml", "pipelines/sweep/dvc.yaml")
# Library files that no stage output depends on, and why; every other file a stage imports is a dep.
NOT_OUTPUT_CODE = {f"src/{path}": why for path, why in provenance.NOT_OUTPUT_CODE.items()}


def _stage_module(command_line: str) -> tuple[str, str]:
    """The entry script of a stage's ``cmd`` and the module it runs."""
    script = next(word for word in command_line.split() if word.endswith(".py"))
    command = Path(script).stem.replace("_", "-")
    if command == "sweep":
        return script, "wsss.stages.sweep"
    return script, {**STAGES, **ABLATION_STAGES}[command].module


def test_the_closure_follows_function_level_and_from_package_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub/__init__.py").write_text("")
    (package / "a.py").write_text("import os\n\ndef run():\n    from pkg import b\n    return b\n")
    (package / "b.py").write_text("from pkg.sub import c\nfrom pkg.sub.c import VALUE\n")
    (package / "sub/c.py").write_text("VALUE = 1\n")
    (package / "unused.py").write_text("")
    names = {p.relative_to(tmp_path).as_posix() for p in code_closure(tmp_path, "pkg.a")}
    assert names == {"pkg/__init__.py", "pkg/a.py", "pkg/b.py", "pkg/sub/__init__.py", "pkg/sub/c.py"}


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_every_stage_depends_on_the_code_it_runs(pipeline):
    stages = yaml.safe_load((REPO / pipeline).read_text())["stages"]
    missing = {}
    for name, stage in stages.items():
        script, module = _stage_module(stage["cmd"])
        deps = [dep if isinstance(dep, str) else next(iter(dep)) for dep in stage.get("deps", [])]
        needed = {script} | {p.relative_to(REPO).as_posix() for p in code_closure(REPO / "src", module) if not provenance.package_marker(p)}
        absent = sorted(f for f in needed - NOT_OUTPUT_CODE.keys()
                        if not any(f == dep or f.startswith(dep.rstrip("/") + "/") for dep in deps))
        if absent:
            missing[name] = absent
        # and no more: a library file the stage does not run would re-run it for nothing, and its checkpoint
        # fingerprint (the digest of the same closure, wsss.provenance) would not change with it
        code = {p.relative_to(REPO).as_posix() for p in provenance.output_code(module, REPO / "src")}
        extra = sorted(dep for dep in deps if dep.startswith("src/") and dep not in code)
        if extra:
            missing[f"{name} (deps it does not run)"] = extra
    assert not missing, f"{pipeline}: stages whose code deps differ from the code they run: {missing}"


def test_the_exempt_files_exist():
    assert all((REPO / path).is_file() for path in NOT_OUTPUT_CODE)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_no_stage_depends_on_a_speed_knob(pipeline):
    """A speed knob (``wsss.config.SPEED_KNOBS``: loader workers, threads, CRF processes, inference batch
    sizes, chunk and shard sizes) is no stage's DVC param, nor inside a group a stage lists: changing
    one re-runs nothing (tests/paper_project.py runs `dvc status` after changing them all)."""
    stages = yaml.safe_load((REPO / pipeline).read_text())["stages"]
    listed = {}
    for name, stage in stages.items():
        for entry in stage.get("params") or []:
            keys = [entry] if isinstance(entry, str) else [key for keys in entry.values() for key in keys or []]
            hits = [knob for key in keys for knob in SPEED_KNOBS if knob == key or knob.startswith(f"{key}.")]
            if hits:
                listed[name] = hits
    assert not listed, f"{pipeline}: stages that would re-run when a speed knob changes: {listed}"


def test_the_person_merge_params_are_the_pseudo_masks_stage_s():
    """The merge's keys change the pseudo masks alone: that stage lists them (a change re-runs it and what
    follows) and no other stage of the main pipeline does (it would re-run for nothing)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    merge_keys = {"person.merge", "person.presence_threshold", "person.cam_threshold", "person.post_crf", "person.background_seed"}
    assert merge_keys <= set(stages["pseudo_masks"]["params"])
    elsewhere = {name: sorted(merge_keys & set(stage.get("params", []))) for name, stage in stages.items() if name != "pseudo_masks"}
    # the person classifier reads its presence threshold too (its val F1)
    assert {name: keys for name, keys in elsewhere.items() if keys} == {"person_classifier": ["person.presence_threshold"]}
