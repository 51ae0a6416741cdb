"""Every params file a user copies to params.yaml (the CPU default and each profile) holds every key
that the three dvc.yaml files name, so `dvc repro` does not stop with "Parameters ... are missing"
before the first stage (the schema fills defaults, DVC does not); `wsss check-params` says so too."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from wsss.cli import main
from wsss.config import dvc_param_keys, load_params, lookup, missing_dvc_params

REPO = Path(__file__).resolve().parents[1]
PARAMS_FILES = ("params.yaml", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "profiles").glob("*.yaml")))


def test_the_pipelines_name_params():
    keys = dvc_param_keys(REPO)
    assert {"data.embedded", "segmenter.encoder", "compute.launcher", "data.root"} <= keys["dvc.yaml"]
    assert "segmenter" not in keys["dvc.yaml"] and "segmenter.workers" not in keys["dvc.yaml"]  # a speed knob
    assert "segmenter.atrous_rates" in keys["pipelines/ablation/dvc.yaml"] and "ablation.encoders" in keys["pipelines/ablation/dvc.yaml"]
    assert "sweep" in keys["pipelines/sweep/dvc.yaml"]


@pytest.mark.parametrize("params_file", PARAMS_FILES)
def test_every_params_file_holds_every_key_dvc_reads(params_file):
    load_params(REPO / params_file)  # the schema accepts it
    assert missing_dvc_params(yaml.safe_load((REPO / params_file).read_text()), REPO) == []


def test_a_missing_key_is_found_and_check_params_names_it(tmp_path, capsys):
    document = yaml.safe_load((REPO / "params.yaml").read_text())
    assert lookup(document, "segmenter.encoder") == document["segmenter"]["encoder"]
    del document["segmenter"]["atrous_rates"]
    document["cams"].pop("num_overlays")
    problems = dict(missing_dvc_params(document, REPO))
    assert set(problems) == {"segmenter.atrous_rates", "cams.num_overlays"}
    assert "pipelines/ablation/dvc.yaml" in problems["segmenter.atrous_rates"]

    for name in ("dvc.yaml", "pipelines"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, tmp_path / name)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(document))
    assert main(["check-params", "--root", str(tmp_path)]) != 0  # valid for the schema, not for DVC
    error = capsys.readouterr().err
    assert "segmenter.atrous_rates" in error and "cams.num_overlays" in error
    shutil.copy(REPO / "profiles/paper.yaml", tmp_path / "params.yaml")
    assert main(["check-params", "--root", str(tmp_path)]) == 0
