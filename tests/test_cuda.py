"""The CUDA paths (marked ``cuda``; they skip on a machine without a CUDA device). Run on a lent GPU by
``benchmarks/gpu_check.py``, or alone: ``python -m pytest -m cuda tests/test_cuda.py``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import make_document

from wsss import distributed
from wsss.affinity import half_plane_offsets
from wsss.cli import main
from wsss.config import validate_params
from wsss.irnet import irnet_losses
from wsss.models.classifier import build_classifier
from wsss.models.irnet import IRNet, classifier_stages
from wsss.random_walk import propagate_many

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda", 0)


def test_auto_picks_the_gpu_and_bf16_where_it_computes_it():
    context = distributed.init(validate_params(make_document({"compute.precision": "auto"})).compute)
    try:
        assert context.device.type == "cuda"
        assert context.precision == ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32")
    finally:
        distributed.shutdown()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_training_step_of_the_classifier_and_irnet_on_the_gpu_matches_the_cpu(precision):
    """fp32: the first loss of the same weights and inputs equals the CPU's but for cuDNN's other summation
    order and TF32 off (rel 1e-3); bf16 / fp16 autocast: 8 / 11 mantissa bits, rel 5e-2; every gradient finite."""
    torch.manual_seed(0)
    model = build_classifier("small_cnn", 4, 1)
    images, targets = torch.rand(4, 3, 64, 64), torch.randint(0, 2, (4, 4)).float()
    reference = F.binary_cross_entropy_with_logits(model(images), targets).item()
    model = model.to(CUDA)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = F.binary_cross_entropy_with_logits(model(images.to(CUDA)).float(), targets.to(CUDA))
    loss.backward()
    assert loss.item() == pytest.approx(reference, rel=1e-3 if dtype is None else 5e-2)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    irnet = IRNet(classifier_stages(model.float())).to(CUDA)
    labels = torch.randint(0, 3, (2, 64, 64), device=CUDA)
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        losses = irnet_losses(irnet, torch.rand(2, 3, 64, 64, device=CUDA), labels, half_plane_offsets(5))
    losses["total"].backward()
    assert all(torch.isfinite(value) for value in losses.values())


def test_the_walk_on_the_gpu_equals_the_walk_on_the_cpu():
    torch.manual_seed(0)
    cams, boundary = torch.rand(3, 24, 32), torch.rand(24, 32)
    on_cpu = propagate_many([cams], [boundary], 5, 10.0, 6, backend="scipy")[0]
    on_gpu = propagate_many([cams.to(CUDA)], [boundary.to(CUDA)], 5, 10.0, 6, backend="torch")[0]
    assert on_gpu.device.type == "cuda"
    assert torch.allclose(on_gpu.cpu(), on_cpu, rtol=1e-4, atol=1e-6)


def test_a_stage_trains_on_the_gpu_and_says_so(project, request):
    mlflow = pytest.importorskip("mlflow", reason="the stages log to MLflow: carry the full wheel set (benchmarks/gpu_wheels.py)")
    request.getfixturevalue("mlflow_store")
    (project / "params.yaml").write_text(yaml.safe_dump(make_document({"classifier.epochs": 1, "compute.device": "cuda"})))
    for stage in ("prepare", "split", "train-classifier"):
        assert main([stage, "--root", str(project)]) == 0
    assert json.loads((project / "metrics/classifier.json").read_text())["epochs"] == 1
    run = mlflow.search_runs(experiment_names=["wsss"], filter_string="tags.`wsss.stage` = 'train_classifier'").iloc[0]
    assert run["tags.wsss.device"] == "cuda:0" and run["tags.wsss.precision"] in ("fp32", "bf16")
