"""A bad setting fails at start: every cross-key rule of the schema and of wsss.preflight is refused by
`wsss check-params` and by its pipeline's first stage; compute.precision: auto resolves from the machine."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import make_document
from pydantic import BaseModel

from wsss import config, distributed, preflight
from wsss.cli import EXIT_USER_ERROR, main

# One breaking example per model validator of the schema: (overrides of the tiny CPU default, the key named)
SCHEMA_RULES = {
    "EmbeddedParams._ranges": ({"data.embedded.objects_per_image": [2, 1]}, "data.embedded.objects_per_image"),
    "VocParams._class_names": ({"data.voc.classes": "  "}, "data.voc.classes"),
    "DataParams._person_known": ({"data.person_class": "hat"}, "data.person_class"),
    "CamParams._positive_scales": ({"cams.scales": [1.0, -0.5]}, "cams.scales"),
    "IrnetParams._thresholds": ({"irnet.conf_bg": 0.9, "irnet.conf_fg": 0.5}, "irnet.conf_bg"),
    "SegmenterParams._scale_range": ({"segmenter.scale_range": [2.0, 1.0]}, "segmenter.scale_range"),
    "SegmenterParams._divisible_size": ({"segmenter.image_size": 60}, "segmenter.image_size"),
    "SegmenterParams._classifier_encoder": ({"segmenter.output_stride": 16}, "segmenter.output_stride"),
    "EvaluateParams._positive_scales": ({"evaluate.tta_scales": [1.0, 0.0]}, "evaluate.tta_scales"),
    "SweepRange._ordered": ({"sweep.space": {"irnet.bg_weight": {"low": 2.0, "high": 1.0}}}, "sweep.space.irnet.bg_weight"),
    "SweepParams._known_keys": ({"sweep.space": {"irnet.beta": {"low": 1.0, "high": 2.0}}}, "sweep.space"),
    "PersonParams._threshold_in_range": ({"person.presence_threshold": 1.5}, "person.presence_threshold"),
    "AblationParams._distinct": ({"ablation.encoders": ["classifier", "classifier"]}, "ablation.encoders"),
    "ComputeParams._known_launcher": ({"compute.launcher": "bash"}, "compute.launcher"),
    "Params._ablation_stride_fits": ({"segmenter.encoder": "resnet18", "segmenter.image_size": 72,
                                      "segmenter.output_stride": 8, "ablation.smp_output_stride": 16}, "ablation.smp_output_stride"),
    "Params._sweep_space_fits": ({"sweep.space": {"irnet.bg_weight": {"low": 0.0, "high": 2.0}}}, "sweep.space.irnet.bg_weight"),
}


def _schema_validators() -> set[str]:
    found = set()
    for name, cls in vars(config).items():
        if inspect.isclass(cls) and issubclass(cls, BaseModel) and cls.__module__ == config.__name__:
            found.update(f"{name}.{validator}" for validator in cls.__pydantic_decorators__.model_validators)
    return found


def test_every_schema_rule_has_a_breaking_example():
    # a new model validator needs its row in SCHEMA_RULES (so the test below checks it)
    assert _schema_validators() == set(SCHEMA_RULES)


def _write(project, overrides: dict) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump(make_document(overrides)))


def _refused(argv: list[str], key: str, capsys) -> str:
    assert main(argv) == EXIT_USER_ERROR
    error = capsys.readouterr().err
    assert f": {key}" in error or f" {key}:" in error, error
    return error


@pytest.mark.parametrize("rule", sorted(SCHEMA_RULES))
def test_each_schema_rule_is_refused_by_check_params_and_prepare(rule, project, capsys):
    overrides, key = SCHEMA_RULES[rule]
    _write(project, overrides)
    _refused(["check-params", "--root", str(project)], key, capsys)
    _refused(["prepare", "--root", str(project)], key, capsys)
    assert not (project / "data/prepared").exists() and not (project / "metrics").exists()


def test_the_default_breaks_no_preflight_rule(project):
    assert preflight.problems(config.load_params(project / "params.yaml"), project) == []


def _first_stage_argv(pipeline: str, project) -> list[str]:
    command = next(command for command, started in preflight.FIRST_STAGES.items() if started == pipeline)
    options = {"ablation-masks": ["--threshold", "1.2", "--out", "ablation/masks/x", "--metrics", "metrics/ablation/x.json"]}
    return [command, "--root", str(project), *options.get(command, [])]


@pytest.mark.parametrize("rule", preflight.RULES, ids=[rule.name for rule in preflight.RULES])
def test_each_preflight_rule_is_refused_at_start_naming_its_key(rule, project, capsys):
    _write(project, rule.breaks_it)
    found = preflight.problems(config.load_params(project / "params.yaml"), project, (rule.pipeline,))
    keys = {key for key, _ in rule.check(config.load_params(project / "params.yaml"), project)}
    assert keys and keys <= {key for key, _ in found}
    key = sorted(keys)[0]
    _refused(["check-params", "--root", str(project)], key, capsys)
    _refused(_first_stage_argv(rule.pipeline, project), key, capsys)  # before it reads or writes anything
    assert not (project / "data/prepared").exists() and not (project / "ablation").exists()
    assert not (project / "metrics").exists() and not (project / "sweeps").exists()


def test_prepare_warns_of_what_the_sweep_will_refuse_and_runs(project, mlflow_store, capsys):
    _write(project, {"irnet.background": "plane", "ablation.thresholds": [0.3, 0.5]})
    assert main(["prepare", "--root", str(project)]) == 0
    error = capsys.readouterr().err
    assert "warning" in error and "sweep.space.irnet.bg_weight" in error
    assert (project / "data/prepared/manifest.json").is_file()


def test_a_torchrun_launcher_checks_the_batches_at_start(project, capsys):
    _write(project, {"compute.launcher": "torchrun --standalone --nproc_per_node 4", "segmenter.batch_size": 6})
    error = _refused(["check-params", "--root", str(project)], "segmenter.batch_size", capsys)
    assert "4 processes" in error
    assert preflight.launcher_processes("python") == 1 and preflight.launcher_processes("torchrun --nproc-per-node=3") == 3


# --- compute.precision: auto ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("flags", "capability", "onednn", "native"), [
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", "", True),
    ({"avx2", "amx_bf16", "amx_tile"}, "AVX512", "", True),
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX2", "", False),  # ATEN_CPU_CAPABILITY=avx2: AVX-512 kernels off
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", "AVX2", False),  # ONEDNN_MAX_CPU_ISA=AVX2
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", "AVX512_CORE_BF16", True),
    ({"avx2", "avx512f"}, "AVX512", "", False),  # AVX-512 without bf16 (Skylake, Zen 3)
    ({"avx", "avx2", "fma"}, "AVX2", "", False),
    ({"fp", "asimd", "sve", "bf16"}, "SVE256", "", True),  # ARM with bf16 (Graviton 3)
    ({"fp", "asimd"}, "DEFAULT", "", False),
    (set(), "DEFAULT", "", False),
])
def test_native_bf16_is_decided_from_the_flags_and_the_capability_torch_runs_at(flags, capability, onednn, native):
    assert distributed.cpu_has_native_bf16(flags, capability, onednn) is native


@pytest.mark.parametrize("native", [True, False])
def test_auto_resolves_to_bf16_only_where_the_device_computes_it(native, monkeypatch):
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert distributed.resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    for explicit in ("fp32", "bf16", "fp16"):
        assert distributed.resolve_precision(explicit, cpu) == explicit
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    assert distributed.resolve_precision("auto", torch.device("cuda", 0)) == ("bf16" if native else "fp32")
    context = distributed.init(config.validate_params(make_document({"compute.precision": "auto", "compute.device": "cpu"})).compute)
    try:
        assert context.precision == ("bf16" if native else "fp32")
        assert distributed.precision_fingerprint() == ([{"precision": "bf16"}] if native else [])
    finally:
        distributed.shutdown()


def test_auto_is_fp32_under_the_avx2_variables_on_any_cpu():
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    code = "import torch; from wsss.distributed import resolve_precision; print(resolve_precision('auto', torch.device('cpu')))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "fp32"
