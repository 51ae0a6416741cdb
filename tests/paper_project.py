"""A copy of this project set up as the README's "paper profile" instructions say, on a tiny
VOC- or LID-layout tree that the tests write, and shrunk only where a CPU test has to be.

``profiles/paper.yaml`` is taken as it is, with these changes and no others:

- sizes, epochs, batch sizes and counts (``PAPER_SHRINK``);
- ``data.root`` points at the tiny tree;
- ImageNet weights come from local files (no network here: the real download path is tested apart),
  randomly initialised torchvision ``vgg16_bn`` features and ``resnet50``;
- ``irnet.confidence_cutoff: 0``: a classifier trained for two epochs from random weights is never
  0.8 confident, and the paper's cutoff then (rightly) stops ``ir_labels`` with an error.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from wsss.data.sources import VOC_CLASSES
from wsss.io import write_mask_png

REPO = Path(__file__).resolve().parents[1]

PAPER_SHRINK = {
    "classifier.image_size": 32,
    "classifier.batch_size": 4,
    "classifier.epochs": 2,
    "classifier.step_size": 1,
    "person.epochs": 1,
    "classifier.workers": 0,
    "cams.batch_size": 4,
    "irnet.crop_size": 32,
    "irnet.batch_size": 4,
    "irnet.epochs": 1,
    "irnet.train_scales": [1.0],
    "irnet.workers": 0,
    "irnet.exp_times": 3,
    "segmenter.image_size": 32,
    "segmenter.batch_size": 4,
    "segmenter.epochs": 2,
    "segmenter.decoder_channels": 16,
    "evaluate.num_figures": 2,
    "cams.num_overlays": 2,
    "crf.workers": 1,
}

# Four VOC classes drawn as solid shapes; the tiny trees use a few of VOC's names.
SHAPE_CLASSES = ("aeroplane", "bird", "car", "dog")


def set_dotted(document: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = document
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def paper_document(overrides: dict | None = None) -> dict:
    """``profiles/paper.yaml`` with the test's changes."""
    document = yaml.safe_load((REPO / "profiles/paper.yaml").read_text())
    for key, value in {**PAPER_SHRINK, "irnet.confidence_cutoff": 0.0, **(overrides or {})}.items():
        set_dotted(document, key, value)
    return document


def write_weights(folder: Path) -> dict[str, str]:
    """Random-init torchvision files that stand in for the ImageNet downloads."""
    import torch
    import torchvision

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vgg = folder / "vgg16_bn_features.pth"
    if not vgg.is_file():
        # torchvision's own vgg16_bn().features, without building the 120M-parameter head
        features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"], batch_norm=True).state_dict()
        torch.save({f"features.{name}": value for name, value in features.items()}, vgg)
    resnet = folder / "resnet50.pth"
    if not resnet.is_file():
        torch.save(torchvision.models.resnet50(weights=None).state_dict(), resnet)
    return {"classifier.weights": str(vgg), "irnet.backbone_weights": str(resnet), "segmenter.encoder_weights": str(resnet)}


def _scene(classes: list[int], height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A photo-like image: a textured background and one solid, class-coloured box per class."""
    rng = np.random.default_rng(seed)
    image = rng.integers(40, 90, (height, width, 3)).astype(np.uint8)
    mask = np.zeros((height, width), dtype=np.uint8)
    for position, class_id in enumerate(classes):
        top = int(rng.integers(2, height // 2))
        left = int(4 + position * width // (len(classes) + 1))
        bottom, right = min(height - 2, top + height // 3), min(width - 2, left + width // 3)
        colour = np.array([(class_id * 67) % 256, (class_id * 131) % 256, (class_id * 197) % 256], dtype=np.uint8)
        image[top:bottom, left:right] = colour
        mask[top:bottom, left:right] = class_id
    return image, mask


def _save_jpeg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=95)


def _class_sets(count: int, ids: list[int], person: int | None, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    sets = []
    for index in range(count):
        chosen = [ids[index % len(ids)]]
        if rng.uniform() < 0.4:
            chosen.append(ids[(index + 1) % len(ids)])
        if person is not None and rng.uniform() < 0.5:
            chosen.append(person)
        sets.append(chosen)
    return sets


def write_voc_tree(root: Path, train: int = 16, val: int = 8, size: tuple[int, int] = (40, 48)) -> Path:
    """A VOC2012-layout tree: JPEGImages, SegmentationClassAug (palette PNGs with a 255 border),
    ImageSets/Segmentation/{train_aug,val}.txt; image sizes vary around ``size`` (height, width: 48 x 40
    by default; with VOC's 375 x 500 every fifth image is portrait, as in VOC)."""
    ids = [VOC_CLASSES.index(name) for name in SHAPE_CLASSES]
    person = VOC_CLASSES.index("person")
    lists = {"train_aug": [], "val": []}
    for subset, count, seed in (("train_aug", train, 1), ("val", val, 2)):
        for index, classes in enumerate(_class_sets(count, ids, person, seed)):
            image_id = f"2007_{seed}{index:05d}"
            height, width = size[0] + 4 * (index % 3), size[1] + 4 * (index % 2)
            if size[0] > 100 and index % 5 == 4:
                height, width = width, height
            image, mask = _scene(classes, height, width, seed * 1000 + index)
            mask[0, :] = 255  # VOC's void boundary
            _save_jpeg(root / "JPEGImages" / f"{image_id}.jpg", image)
            (root / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
            write_mask_png(root / "SegmentationClassAug" / f"{image_id}.png", mask)
            lists[subset].append(image_id)
    (root / "ImageSets/Segmentation").mkdir(parents=True, exist_ok=True)
    for name, image_ids in lists.items():
        (root / "ImageSets/Segmentation" / f"{name}.txt").write_text("".join(f"{i}\n" for i in image_ids))
    return root


LID_CLASSES = ("dog", "person", "bird", "car", "aeroplane")


def write_lid_tree(root: Path, train: int = 16, val: int = 8) -> Path:
    """A LID-layout tree: the train list with image labels only (no masks), the val list with
    empty labels and PNG masks, ``idx_to_name.json`` with 1-based ids."""
    import json

    person = LID_CLASSES.index("person") + 1
    ids = [i + 1 for i, name in enumerate(LID_CLASSES) if name != "person"]
    train_dir = root / "ILSVRC/Data/DET/train"
    entries = []
    for index, classes in enumerate(_class_sets(train, ids, person, 3)):
        relative = f"ILSVRC2013_train/n0{index % 2}/img_{index:04d}"
        image, _ = _scene(classes, 40 + 4 * (index % 3), 48, 3000 + index)
        _save_jpeg(train_dir / f"{relative}.JPEG", image)
        entries.append([relative, sorted(set(classes))])
    (train_dir / "train.json").write_text(json.dumps(entries))
    (train_dir / "idx_to_name.json").write_text(json.dumps({str(i + 1): name for i, name in enumerate(LID_CLASSES)}))
    val_dir = root / "LID_track1/val"
    names = []
    for index, classes in enumerate(_class_sets(val, ids, person, 4)):
        name = f"ILSVRC2012_val_{index:08d}"
        image, mask = _scene(classes, 44, 48 + 4 * (index % 2), 4000 + index)
        _save_jpeg(val_dir / f"{name}.JPEG", image)
        (val_dir / "masks").mkdir(parents=True, exist_ok=True)
        write_mask_png(val_dir / "masks" / f"{name}.png", mask)
        names.append([name, []])
    (val_dir / "val.json").write_text(json.dumps(names))
    return root


def copy_project(root: Path) -> Path:
    """The project as a fresh clone has it: every file git tracks (and new files it does not ignore),
    the committed metrics of the CPU default included; no outputs, no caches."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    return root


def command_env(mlflow_uri: str) -> dict:
    """The environment of the project's commands: this interpreter's tools first on PATH, no network."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": mlflow_uri, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run(args: list[str] | str, cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, shell=isinstance(args, str))
    if check:
        assert done.returncode == 0, f"{args} failed ({done.returncode}):\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    return done


def paper_project(root: Path, source: str, weights: dict[str, str], mlflow_uri: str, overrides: dict | None = None) -> tuple[Path, dict]:
    """A git + DVC project whose params.yaml is the shrunk paper profile on a tiny ``source`` tree."""
    copy_project(root)
    env = command_env(mlflow_uri)
    run(["git", "init", "-q"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "clone"], root, env)
    # the README's instructions: the profile as params.yaml, data.root set to the data
    shutil.copy(root / "profiles/paper.yaml", root / "params.yaml")
    tree = root / "data" / source
    (write_voc_tree if source == "voc" else write_lid_tree)(tree)
    document = paper_document({**weights, "data.source": source, "data.root": f"data/{source}", **(overrides or {})})
    (root / "params.yaml").write_text(yaml.safe_dump(copy.deepcopy(document), sort_keys=False))
    return root, env


MAIN_STAGES = ("prepare", "split", "train_classifier", "cams", "person_classifier", "ir_labels", "train_irnet", "pseudo_masks",
               "train_segmenter", "oracle", "evaluate", "report")


def repro_and_check(root: Path, env: dict, dvc_checks: bool = True) -> dict:
    """`dvc repro`, then what a user looks at: every stage ran, `dvc metrics show` is clean and shows
    this run's numbers; with ``dvc_checks`` (they do not depend on the data source: one test runs them)
    `dvc exp show`, the model registry, and a second `dvc repro` that has nothing to do. Returns the
    shown metrics."""
    import json

    repro = run(["dvc", "repro"], root, env)
    (root / "repro.log").write_text(repro.stdout + repro.stderr)
    for stage in MAIN_STAGES:
        assert f"Running stage '{stage}'" in repro.stdout, f"stage {stage} did not run:\n{repro.stdout[-3000:]}"
    shown = run(["dvc", "metrics", "show", "--json"], root, env)
    assert '"error"' not in shown.stdout and "failed" not in shown.stderr.lower(), shown.stdout[-3000:] + shown.stderr
    metrics = json.loads(shown.stdout)[""]["data"]
    assert metrics["metrics/prepare.json"]["data"]["source"] == yaml.safe_load((root / "params.yaml").read_text())["data"]["source"]
    if not dvc_checks:
        return {name: entry["data"] for name, entry in metrics.items()}
    # `dvc exp show` has the flat headline file; the final segmenter is the registered model's newest version
    experiments = json.loads(run(["dvc", "exp", "show", "--json"], root, env).stdout)
    headline = experiments[0]["data"]["metrics"]["metrics/summary.json"]["data"]
    assert {"val_cam_crf_miou", "val_pseudo_masks_miou", "val_segmentation_miou", "test_miou", "final_mode"} <= headline.keys()
    import mlflow

    from wsss import serving

    newest = mlflow.MlflowClient().get_model_version_by_alias(serving.REGISTERED_NAME, serving.ALIAS)
    assert mlflow.get_run(newest.run_id).data.tags["wsss.stage"] == "train_segmenter"
    again = run(["dvc", "repro"], root, env)
    assert "Running stage" not in again.stdout, again.stdout
    # every speed knob changed: still nothing to re-run (they are no stage's DVC params)
    from wsss.config import SPEED_KNOBS

    document = yaml.safe_load((root / "params.yaml").read_text())
    for knob in SPEED_KNOBS:
        set_dotted(document, knob, {"compute.mmap_threshold_mib": 2}.get(knob, 3))
    (root / "params.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    status = run(["dvc", "status", "dvc.yaml"], root, env)
    assert "up to date" in status.stdout, status.stdout
    return {name: entry["data"] for name, entry in metrics.items()}
