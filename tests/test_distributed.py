"""Several processes: the global-batch sampler, shards, the compute params, and each stage of the
main pipeline run by torchrun with 2 gloo processes against the same stage run as 1 process."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from conftest import make_document, make_params
from dvc_project import subprocess_env
from test_faults import _kill_when
from test_step3 import STEP3
from torch.utils.data import DataLoader, TensorDataset

from wsss import distributed
from wsss.cli import EXIT_USER_ERROR, main
from wsss.config import validate_params
from wsss.distributed import Context, GlobalBatchSampler, shard, shard_range
from wsss.affinity import half_plane_offsets
from wsss.errors import ConfigError, TrainingDiverged
from wsss.irnet import irnet_losses

# Batch sizes are global batches: multiples of the 2 processes; fp32 on every machine.
PARALLEL = {**STEP3, "compute.precision": "fp32", "classifier.epochs": 3, "classifier.batch_size": 8, "classifier.threads": 1, "irnet.batch_size": 8,
            "segmenter.batch_size": 8, "segmenter.epochs": 2, "compute.shard_size": 8}  # several shards: each process writes some
# What 2 processes must share with 1 exactly, by construction: the global batches (so the step counts), the inference
# outputs (each image is computed alone: same bytes), a resumed run's end (same arithmetic as the uninterrupted one).
# What they share only approximately, and the margins:
# - IRNet (GroupNorm, no dropout): the same loss but for the order in which the all-reduce sums the two halves'
#   gradients (fp32 rounding: 1e-7 on this test's data, 4e-4 after a whole epoch of the default, benchmarks/README.md
#   "Several processes"), so rel 1e-4 catches any change of the batches or the loss's mean.
# - The classifier and DeepLabv3+: BatchNorm normalises each process's half batch by its own statistics (gloo has no
#   SyncBatchNorm) and each process draws its own dropout masks: the same method on the same batches, not the same
#   arithmetic, and the curves part as two seeds do from the first step on (segmenter epoch-2 loss within 3 % on an
#   AVX-512 CPU, 4.1 % apart on an AVX2 one). The margins bound that drift with room for any CPU (~4x the largest
#   drift seen), not the rounding of one.
TOLERANCE = {"irnet_losses": 1e-4, "loss": 0.15, "f1": 0.2, "miou": 0.1}


def _batches(loader) -> list[list[int]]:
    return [batch[0].tolist() for batch in loader]


@pytest.mark.parametrize(("size", "batch", "drop_last"), [(37, 8, True), (37, 8, False), (16, 4, True), (7, 8, False)])
def test_the_global_batches_of_n_processes_are_those_of_one(size, batch, drop_last):
    dataset = TensorDataset(torch.arange(size))
    single = _batches(DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=drop_last,
                                 generator=torch.Generator().manual_seed(5)))
    for world in (1, 2, 4):
        if batch % world or size < world:
            continue
        per_rank = []
        for rank in range(world):
            generator = torch.Generator().manual_seed(5)
            sampler = GlobalBatchSampler(size, batch, drop_last, generator, rank, world)
            per_rank.append(_batches(DataLoader(dataset, batch_sampler=sampler, generator=generator)))
            assert len(per_rank[-1]) == len(sampler)
        assert [sum(parts, []) for parts in zip(*per_rank, strict=True)] == single


def test_a_batch_size_that_the_processes_cannot_share_is_refused():
    with pytest.raises(ConfigError, match="multiple of the 3 processes"):
        GlobalBatchSampler(40, 8, True, torch.Generator(), 0, 3)


@pytest.mark.parametrize("count", [0, 1, 5, 64])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_cover_every_item_once_in_order(count, world):
    items = list(range(count))
    shares = [shard(items, Context(rank=rank, world_size=world)) for rank in range(world)]
    assert sum(shares, []) == items
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert [len(shard_range(count, Context(rank=r, world_size=world))) for r in range(world)] == list(map(len, shares))


def test_a_stage_that_does_not_share_its_work_refuses_torchrun_naming_the_launcher(project, monkeypatch, capsys):
    # what init returns in one of torchrun's 2 processes (no process group is needed to refuse)
    monkeypatch.setattr(distributed, "init", lambda compute: Context(rank=1, world_size=2, local_world_size=2))
    for stage in ("prepare", "evaluate", "report"):
        assert main([stage, "--root", str(project)]) == 2
        assert f"compute.launcher: {stage} runs as one process" in capsys.readouterr().err
    assert not (project / "data/prepared").exists()


def test_a_single_process_needs_no_process_group(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    context = distributed.init(make_params().compute)
    try:
        assert (context.rank, context.world_size, context.is_main, context.distributed) == (0, 1, True, False)
        assert not torch.distributed.is_initialized()
        values = np.arange(6).reshape(2, 3)
        assert distributed.all_reduce_sum(values) is values and distributed.gather_rows(values) is values
    finally:
        distributed.shutdown()


@pytest.mark.parametrize(("overrides", "environment", "key"), [
    ({"compute.launcher": "bash -c 'rm -rf /'"}, {}, "compute.launcher"),
    ({"compute.launcher": "python && rm -rf ~"}, {}, "compute.launcher"),
    ({"compute.precision": "fp64"}, {}, "compute.precision"),
    ({"compute.precision": "fp16", "compute.device": "cpu"}, {}, "compute.precision"),
    ({"compute.batchnorm": "sync", "compute.device": "cpu"}, {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "compute.batchnorm"),
])
def test_bad_compute_settings_name_their_key(overrides, environment, key, monkeypatch):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        distributed.init(validate_params(make_document(overrides)).compute)
    assert key in str(error.value)
    assert not torch.distributed.is_initialized()  # refused before joining any process group


def test_global_batches_that_leave_a_process_fewer_than_two_samples_are_refused():
    context = Context(rank=0, world_size=2)
    distributed.check_batch_sizes({"classifier.batch_size": 8, "irnet.batch_size": 4}, context)
    with pytest.raises(ConfigError) as error:
        distributed.check_batch_sizes({"classifier.batch_size": 8, "irnet.batch_size": 3, "segmenter.batch_size": 2}, context)
    assert [key for key, _ in error.value.problems] == ["irnet.batch_size", "segmenter.batch_size"]
    distributed.check_batch_sizes({"segmenter.batch_size": 3}, Context())  # one process: anything goes


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_a_parameter_error():
    with pytest.raises(ConfigError, match="compute.device"):
        distributed.init(validate_params(make_document({"compute.device": "cuda"})).compute)


def test_auto_precision_is_recorded_as_resolved_and_never_resumes_a_checkpoint_of_the_other(project, mlflow_store, monkeypatch):
    # compute.precision: auto on a machine without native bf16, then on one with it (the detection mocked)
    (project / "params.yaml").write_text(yaml.safe_dump(make_document({**PARALLEL, "classifier.epochs": 1, "compute.precision": "auto"})))
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: False)
    for stage in ("prepare", "split", "train-classifier"):
        assert main([stage, "--root", str(project)]) == 0
    fp32 = json.loads((project / "metrics/classifier.json").read_text())
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: True)
    assert main(["train-classifier", "--root", str(project)]) == 0
    bf16 = json.loads((project / "metrics/classifier.json").read_text())
    runs = mlflow.search_runs(experiment_names=["wsss"], filter_string="tags.`wsss.stage` = 'train_classifier'",
                              order_by=["attributes.start_time ASC"])
    assert list(runs["tags.wsss.precision"]) == ["fp32", "bf16"]
    assert list(runs["tags.wsss.resumed_from_epoch"]) == ["None", "None"]  # bf16 trained anew, not resumed
    assert bf16["epochs"] == fp32["epochs"] == 1 and 0.0 <= bf16["val_macro_f1"] <= 1.0


class _SaturatedIrnet(torch.nn.Module):
    """IRNet's two outputs as bf16 autocast gives them where the boundary map is saturated at 0
    (sigmoid(-20)): in bf16, 1 - sigmoid(-20) rounds to 1, the affinity of a pair across classes."""

    def forward(self, images):
        grid = ((images.shape[-2] + 3) // 4, (images.shape[-1] + 3) // 4)
        boundary_logits = torch.full((len(images), 1, *grid), -20.0, requires_grad=True)
        displacement = torch.zeros((len(images), 2, *grid), requires_grad=True)
        return boundary_logits.bfloat16(), displacement.bfloat16()


def test_irnet_losses_stay_finite_under_bf16_when_the_boundary_map_saturates():
    labels = torch.zeros((1, 16, 16), dtype=torch.long)
    labels[:, :, 8:] = 1  # a class edge: negative pairs whose affinity is 1 in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = irnet_losses(_SaturatedIrnet(), torch.zeros((1, 3, 16, 16)), labels, half_plane_offsets(2))
    assert all(torch.isfinite(value) for value in losses.values()), losses
    assert losses["neg"].item() == pytest.approx(-math.log(1e-5), rel=1e-3)  # fp32: 1 + 1e-5 - 1, not 0
    losses["total"].backward()


def test_a_nan_loss_is_refused_before_it_reaches_the_weights():
    context = distributed.init(validate_params(make_document({"compute.precision": "bf16"})).compute)
    try:
        layer = torch.nn.Linear(2, 1)
        before = [parameter.detach().clone() for parameter in layer.parameters()]
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        loss = layer(torch.tensor([[float("nan"), 1.0]])).sum()
        with pytest.raises(TrainingDiverged, match=r"params.yaml: irnet: the training loss is nan in epoch 3 \(compute.precision: bf16\)"):
            distributed.optimizer_step(loss, optimizer, context.grad_scaler(), "irnet", 3)
        assert all(torch.equal(old, new) for old, new in zip(before, layer.parameters(), strict=True))
        distributed.optimizer_step(layer(torch.ones((1, 2))).sum(), optimizer, None, "irnet", 3)  # a finite loss steps
        assert not all(torch.equal(old, new) for old, new in zip(before, layer.parameters(), strict=True))
    finally:
        distributed.shutdown()


def test_a_diverging_training_stage_exits_non_zero_and_leaves_no_outputs(project, mlflow_store, monkeypatch, capsys):
    (project / "params.yaml").write_text(yaml.safe_dump(make_document({**PARALLEL, "classifier.epochs": 1})))
    for stage in ("prepare", "split"):
        assert main([stage, "--root", str(project)]) == 0
    monkeypatch.setattr(torch.nn.BCEWithLogitsLoss, "forward", lambda self, logits, targets: (logits * float("nan")).mean())
    assert main(["train-classifier", "--root", str(project)]) == EXIT_USER_ERROR
    assert "classifier: the training loss is nan in epoch 1" in capsys.readouterr().err
    assert not (project / "metrics/classifier.json").exists() and not (project / "models/classifier").exists()


# --- each stage under torchrun (2 gloo processes) against 1 process ---------------------------------------------

def _torchrun_command(stage: str, root: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "wsss.cli", stage, "--root", str(root)]


def _torchrun(stage: str, root: Path, env: dict) -> None:
    done = subprocess.run(_torchrun_command(stage, root), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]


def _single(stage: str, root: Path, env: dict) -> None:
    """The stage as one process, in this one (no interpreter start: the test suite's time)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
        assert main([stage, "--root", str(root)]) == 0


def _curve(root: Path, name: str) -> list[float]:
    return [float(row.split(",")[1]) for row in (root / f"plots/{name}/training.csv").read_text().splitlines()[1:]]


def _metrics(root: Path, name: str) -> dict:
    return json.loads((root / f"metrics/{name}.json").read_text())


def _same_files(left: Path, right: Path) -> None:
    names = sorted(p.relative_to(left) for p in left.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(right) for p in right.rglob("*") if p.is_file())
    assert names


@pytest.fixture(scope="module")
def two_projects(tmp_path_factory, _migrated_store) -> tuple[Path, Path, dict]:
    """Two copies of one tiny project after ``split``: one for 1 process, one for torchrun."""
    folder = tmp_path_factory.mktemp("parallel")
    (folder / "mlruns").mkdir()
    shutil.copy(_migrated_store, folder / "mlruns/mlflow.db")
    env = subprocess_env(f"sqlite:///{folder / 'mlruns/mlflow.db'}")
    single = folder / "single"
    (single / "data/sources").mkdir(parents=True)
    shutil.copytree(Path(__file__).resolve().parents[1] / "data/sources/fashion-mnist", single / "data/sources/fashion-mnist")
    (single / "params.yaml").write_text(yaml.safe_dump(make_document(PARALLEL)))
    (single / "dvc.yaml").write_text("stages: {}\n")
    for stage in ("prepare", "split"):
        _single(stage, single, env)
    parallel = folder / "parallel"
    shutil.copytree(single, parallel)
    shutil.copytree(single, folder / "killed")
    return single, parallel, env


def _adopt(single: Path, parallel: Path, *outputs: str) -> None:
    """Give the torchrun copy the single-process outputs, so that the next stage reads the same inputs in both."""
    for output in outputs:
        target = parallel / output
        if target.is_dir():
            shutil.rmtree(target)
        (shutil.copytree if (single / output).is_dir() else shutil.copy)(single / output, target)


def test_each_stage_under_torchrun_matches_one_process(two_projects):
    single, parallel, env = two_projects
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])

    # step 1: the classifier (training) and the CAMs (sharded inference, CRF on val)
    _single("train-classifier", single, env)
    _torchrun("train-classifier", parallel, env)
    one, two = _metrics(single, "classifier"), _metrics(parallel, "classifier")
    assert two["epochs"] == one["epochs"] == PARALLEL["classifier.epochs"]
    assert abs(two["val_macro_f1"] - one["val_macro_f1"]) <= TOLERANCE["f1"], (one, two)
    assert _curve(parallel, "classifier")[0] == pytest.approx(_curve(single, "classifier")[0], rel=TOLERANCE["loss"])
    _adopt(single, parallel, "models/classifier", "metrics/classifier.json")

    # torchrun killed (SIGKILL, every process) after the first epoch, run again: it resumes and ends as the uninterrupted run
    killed = parallel.parent / "killed"
    process = subprocess.Popen(_torchrun_command("train-classifier", killed), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    _kill_when(process, (killed / "checkpoints/classifier/last.pt").is_file)
    assert not (killed / "metrics/classifier.json").exists()
    _torchrun("train-classifier", killed, env)
    assert _metrics(killed, "classifier") == two
    resumed = mlflow.search_runs(experiment_names=["wsss"], filter_string="tags.`wsss.stage` = 'train_classifier'")
    # continued, not restarted (from epoch 4 = after the last: the kill came between the last checkpoint and the outputs)
    assert set(resumed["tags.wsss.resumed_from_epoch"]) - {"None"} <= {"2", "3", "4"}
    assert len(set(resumed["tags.wsss.resumed_from_epoch"]) - {"None"}) == 1

    _single("cams", single, env)
    _torchrun("cams", parallel, env)
    _same_files(single / "cams", parallel / "cams")
    one, two = _metrics(single, "cams"), _metrics(parallel, "cams")
    assert two["cam"]["miou"] == pytest.approx(one["cam"]["miou"], abs=1e-6)
    assert two["cam_crf"]["miou"] == pytest.approx(one["cam_crf"]["miou"], abs=1e-6)
    index_one, index_two = (json.loads((root / "cams/index.json").read_text()) for root in (single, parallel))
    assert two["val_predicted"]["cam_crf"]["miou"] == pytest.approx(one["val_predicted"]["cam_crf"]["miou"], abs=1e-6)
    assert index_two["predicted_labels"] == index_one["predicted_labels"]
    for split in ("train", "val", "val_predicted"):
        assert [(e["id"], e["labels"]) for e in index_two["images"][split]] == [(e["id"], e["labels"]) for e in index_one["images"][split]]
        assert [e["confidence"] for e in index_two["images"][split]] == pytest.approx([e["confidence"] for e in index_one["images"][split]])
    _adopt(single, parallel, "cams")

    # step 2: IR labels (sharded CRF), IRNet (training), pseudo masks (sharded random walk + CRF)
    _single("ir-labels", single, env)
    _torchrun("ir-labels", parallel, env)
    _same_files(single / "ir_labels", parallel / "ir_labels")
    assert _metrics(parallel, "ir_labels") == _metrics(single, "ir_labels")
    assert all((parallel / "ir_labels" / p.name).read_bytes() == p.read_bytes() for p in (single / "ir_labels").iterdir())

    _single("train-irnet", single, env)
    _torchrun("train-irnet", parallel, env)
    one, two = _metrics(single, "irnet"), _metrics(parallel, "irnet")
    assert two["steps"] == one["steps"]  # the same global batches
    for name, value in one["final_losses"].items():
        assert two["final_losses"][name] == pytest.approx(value, rel=TOLERANCE["irnet_losses"], abs=1e-6), name
    _adopt(single, parallel, "models/irnet")

    _single("person-classifier", single, env)  # one process (a small binary classifier); its CAMs merge into the masks
    _adopt(single, parallel, "cams_person")
    _single("pseudo-masks", single, env)
    _torchrun("pseudo-masks", parallel, env)
    _same_files(single / "pseudo_masks", parallel / "pseudo_masks")
    assert _metrics(parallel, "pseudo_masks")["val"]["miou"] == pytest.approx(_metrics(single, "pseudo_masks")["val"]["miou"], abs=1e-6)
    assert _metrics(parallel, "pseudo_masks")["val_predicted"]["miou"] == pytest.approx(
        _metrics(single, "pseudo_masks")["val_predicted"]["miou"], abs=1e-6)
    _adopt(single, parallel, "pseudo_masks")

    # step 3: DeepLabv3+ (training)
    _single("train-segmenter", single, env)
    _torchrun("train-segmenter", parallel, env)
    one, two = _metrics(single, "segmenter"), _metrics(parallel, "segmenter")
    assert two["steps"] == one["steps"]
    assert abs(two["best_val_miou"] - one["best_val_miou"]) <= TOLERANCE["miou"], (one, two)
    assert _curve(parallel, "segmenter") == pytest.approx(_curve(single, "segmenter"), rel=TOLERANCE["loss"])

    # one MLflow run per stage execution, from rank 0, that says how it ran
    runs = mlflow.search_runs(experiment_names=["wsss"])
    per_stage = runs.groupby("tags.wsss.stage")["tags.wsss.processes"].apply(sorted).to_dict()
    for stage in ("cams", "ir_labels", "train_irnet", "pseudo_masks", "train_segmenter"):
        assert per_stage[stage] == ["1", "2"], stage
    assert per_stage["train_classifier"][0] == "1" and set(per_stage["train_classifier"][1:]) == {"2"}  # + the killed copy's
    for folder in (parallel / "cams", parallel / "pseudo_masks", parallel):
        assert not list(folder.glob(".*.tmp-*")), f"a staging folder was left in {folder}"


def test_dvc_starts_the_parallel_stages_with_the_launcher_of_params_yaml(tmp_path, mlflow_store):
    from dvc.repo import Repo
    from dvc_project import dvc_project

    launcher = "torchrun --standalone --nproc_per_node 2"
    root, _ = dvc_project(tmp_path, mlflow_store, {"compute.launcher": launcher})
    with Repo(str(root)) as repo:  # dvc.yaml as DVC resolves it with this params.yaml
        commands = {stage.name: stage.cmd for stage in repo.index.stages}
    parallel = ("train_classifier", "cams", "ir_labels", "train_irnet", "pseudo_masks", "train_segmenter", "oracle")
    for stage in parallel:
        assert commands[stage] == f"{launcher} pipelines/{stage}.py"
    assert all(command.startswith("python ") for stage, command in commands.items() if stage not in parallel)
