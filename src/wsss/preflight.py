"""Checks of a whole parameter set that a stage would otherwise meet only when it starts, minutes or hours in.

The schema (:mod:`wsss.config`) checks each group, and every stage enforces it when it loads
``params.yaml``. The rules here span groups or need the machine (a network that must build, a file
that must exist, a device): :func:`problems` runs them, ``wsss check-params`` refuses any, and the
main pipeline's first stage (``prepare``) refuses those of the main pipeline; a rule of the sweep or
the ablation (groups only their own pipelines read) is refused there by their first stage, and
``prepare`` prints it as a warning. Each rule carries the overrides that break it, so the tests walk
:data:`RULES` and check that each one is enforced at start.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsss.config import Params, sweep_space_problems

MAIN, SWEEP, ABLATION = "main", "sweep", "ablation"
FIRST_STAGES = {"prepare": MAIN, "sweep": SWEEP, "ablation-masks": ABLATION}  # command -> the pipeline it starts
_NPROC = re.compile(r"--nproc[_-]per[_-]node[ =](\d+)")
# the global batches that torchrun's processes share (wsss.distributed.check_batch_sizes at each stage's start)
_BATCH_KEYS = ("classifier.batch_size", "irnet.batch_size", "segmenter.batch_size")


@dataclass(frozen=True)
class Rule:
    """One check of ``params`` across keys: ``check`` returns ``(key, message)`` problems (empty when it holds);
    ``pipeline`` is the pipeline whose stages would refuse it; ``breaks_it`` holds dotted overrides of the CPU
    default that violate it (for the tests)."""

    name: str
    pipeline: str
    check: Callable[[Params, Path], list[tuple[str, str]]]
    breaks_it: dict[str, Any] = field(default_factory=dict)


def _person_merge(params: Params, root: Path) -> list[tuple[str, str]]:
    if params.person.merge and params.data.person_class is None:
        return [("person.merge", "true needs a person class, but data.person_class is null: set person.merge: false "
                                 "(a dataset without a person has nothing to merge)")]
    return []


def segmenter_problem(params: Params, encoder: str, output_stride: int, key: str) -> list[tuple[str, str]]:
    """Whether DeepLabv3+ builds with ``encoder`` at ``output_stride`` (no weights are loaded; built on
    torch's meta device, which allocates and initialises nothing: seconds less at every pipeline's start)."""
    import torch

    from wsss.errors import ConfigError
    from wsss.models.segmenter import CLASSIFIER_ENCODER, SegmenterSpec, build_segmenter

    config = params.segmenter
    from_classifier = encoder == CLASSIFIER_ENCODER
    spec = SegmenterSpec(encoder, 2, output_stride, config.decoder_channels, (), tuple(config.atrous_rates),
                         params.classifier.arch if from_classifier else "", params.classifier.extra_convs if from_classifier else 0)
    try:
        with torch.device("meta"):
            build_segmenter(spec, "none")
    except ConfigError as error:
        return [(key, message) for _, message in error.problems]
    return []


def _segmenter_builds(params: Params, root: Path) -> list[tuple[str, str]]:
    return segmenter_problem(params, params.segmenter.encoder, params.segmenter.output_stride, "segmenter.encoder")


def _weight_files(params: Params, root: Path) -> list[tuple[str, str]]:
    problems = []
    named = {"classifier.weights": params.classifier.weights, "segmenter.encoder_weights": params.segmenter.encoder_weights}
    if params.irnet.backbone == "resnet50":
        named["irnet.backbone_weights"] = params.irnet.backbone_weights
    for key, value in named.items():
        if value in ("none", "imagenet"):
            continue
        path = Path(value) if Path(value).is_absolute() else root / value
        if not path.is_file():
            problems.append((key, f"file {path} not found (none, imagenet or the path of a local state dict)"))
    if params.classifier.arch == "small_cnn" and params.classifier.weights == "imagenet":
        problems.append(("classifier.weights", "small_cnn has no ImageNet weights; use none or a path"))
    return problems


def _device(params: Params, root: Path) -> list[tuple[str, str]]:
    import torch

    compute = params.compute
    cuda = torch.cuda.is_available()
    problems = []
    if compute.device == "cuda" and not cuda:
        problems.append(("compute.device", "cuda is requested but torch sees no CUDA device"))
    on_cuda = compute.device == "cuda" or (compute.device == "auto" and cuda)
    if compute.precision == "fp16" and not on_cuda:
        problems.append(("compute.precision", "fp16 needs CUDA; on a CPU use auto, bf16 or fp32"))
    processes = launcher_processes(compute.launcher)
    if compute.batchnorm == "sync" and processes > 1 and not on_cuda:
        problems.append(("compute.batchnorm", "sync needs CUDA (torch's SyncBatchNorm); on CPUs use local"))
    if processes > 1:
        for key in _BATCH_KEYS:
            group, name = key.split(".")
            size = getattr(getattr(params, group), name)
            if size % processes or size // processes < 2:
                problems.append((key, f"the global batch {size} must be a multiple of the {processes} processes of "
                                      "compute.launcher, with at least 2 samples each"))
    return problems


def launcher_processes(launcher: str) -> int:
    """The processes per node that ``compute.launcher`` starts (1 for python, torchrun's default 1)."""
    match = _NPROC.search(launcher)
    return int(match.group(1)) if match and launcher.startswith("torchrun") else 1


def _sweep_space(params: Params, root: Path) -> list[tuple[str, str]]:
    if params.sweep is None:
        return [("sweep", "required key is missing (the sweep group: pipelines/sweep/dvc.yaml reads it)")]
    return sweep_space_problems(params)


def _ablation_group(params: Params, root: Path) -> list[tuple[str, str]]:
    if params.ablation is None:
        return [("ablation", "required key is missing (the grid's encoders and thresholds: pipelines/ablation/dvc.yaml reads them)")]
    return []


def _ablation_person(params: Params, root: Path) -> list[tuple[str, str]]:
    if params.ablation is not None and True in params.ablation.person and params.data.person_class is None:
        return [("ablation.person", "true needs a person class, but data.person_class is null; use [false]")]
    return []


def _ablation_thresholds(params: Params, root: Path) -> list[tuple[str, str]]:
    if params.ablation is None or params.irnet.background != "plane":
        return []
    outside = [value for value in params.ablation.thresholds if not 0 < value < 1]
    if outside:
        return [("ablation.thresholds", f"{outside} are no background planes: with irnet.background 'plane' every "
                                        "threshold must lie in (0, 1)")]
    return []


def _ablation_encoders(params: Params, root: Path) -> list[tuple[str, str]]:
    if params.ablation is None:
        return []
    from wsss.models.segmenter import CLASSIFIER_ENCODER

    problems = []
    for encoder in params.ablation.encoders:
        stride = params.segmenter.output_stride
        if encoder != CLASSIFIER_ENCODER and params.ablation.smp_output_stride is not None:
            stride = params.ablation.smp_output_stride
        problems += segmenter_problem(params, encoder, stride, "ablation.encoders")
    return problems


RULES: tuple[Rule, ...] = (
    Rule("person merge needs a person class", MAIN, _person_merge,
         {"data.source": "voc", "data.person_class": None, "data.person_label_drop": 0.0, "person.merge": True}),
    Rule("segmenter encoder builds", MAIN, _segmenter_builds, {"segmenter.encoder": "resnet9000"}),
    Rule("weight files exist", MAIN, _weight_files, {"classifier.weights": "weights/missing.pt"}),
    Rule("device, precision and processes fit the machine", MAIN, _device, {"compute.precision": "fp16", "compute.device": "cpu"}),
    Rule("searched keys have an effect", SWEEP, _sweep_space, {"irnet.background": "plane"}),
    Rule("the ablation has its grid", ABLATION, _ablation_group, {"ablation": None}),
    Rule("ablation person cells need a person class", ABLATION, _ablation_person,
         {"data.source": "voc", "data.person_class": None, "data.person_label_drop": 0.0, "ablation.person": [False, True]}),
    Rule("ablation thresholds are background planes", ABLATION, _ablation_thresholds,
         {"irnet.background": "plane", "ablation.thresholds": [0.3, 1.6]}),
    Rule("ablation encoders build", ABLATION, _ablation_encoders, {"ablation.encoders": ["classifier", "resnet9000"]}),
)


def problems(params: Params, root: str | Path, pipelines: tuple[str, ...] = (MAIN, SWEEP, ABLATION)) -> list[tuple[str, str]]:
    """Every ``(key, message)`` that the rules of ``pipelines`` find in ``params`` (paths relative to ``root``)."""
    found: list[tuple[str, str]] = []
    for rule in RULES:
        if rule.pipeline in pipelines:
            found += [problem for problem in rule.check(params, Path(root)) if problem not in found]
    return found
