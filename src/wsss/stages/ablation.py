"""The ``ablation_masks`` stage of the ablation grid (``pipelines/ablation/dvc.yaml``; the paper's Table 3).

One per threshold: the pseudo masks of train and val with IRNet's background knob set to the
threshold (``irnet.threshold`` under a plane background, ``irnet.bg_weight`` under a walked one),
everything else as in the ``pseudo_masks`` stage. The cells that train on them:
:mod:`wsss.stages.ablation_cell`. Upstream outputs (classifier, CAMs, IRNet) are the main pipeline's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from wsss import distributed, tracking
from wsss.config import Params, flatten
from wsss.errors import ConfigError
from wsss.io import write_json
from wsss.shards import resumable_dir
from wsss.stages.common import background_knob, load_splits
from wsss.irnet_inference import load_irnet
from wsss.stages.pseudo_masks import output_fingerprint, pseudo_mask_metrics, write_pseudo_masks
from wsss.stages.paths import CAMS_DIR, CLASSIFIER_PATH, IRNET_PATH, SPLITS_DIR


def with_threshold(params: Params, threshold: float) -> Params:
    knob = background_knob(params.irnet)
    if knob == "threshold" and not 0 < threshold < 1:
        raise ConfigError("params.yaml", [("ablation.thresholds", f"{threshold} is no background plane: with irnet.background "
                                                                 "'plane' every threshold must lie in (0, 1)")])
    return params.model_copy(update={"irnet": params.irnet.model_copy(update={knob: threshold})})


def run_ablation_masks(params: Params, root: Path, threshold: float, out_dir: Path, metrics_path: Path) -> dict:
    import mlflow

    params = with_threshold(params, threshold)
    manifests = load_splits(root)
    hashes = tracking.input_hashes({"irnet": root / IRNET_PATH, "cams": root / CAMS_DIR, "splits": root / SPLITS_DIR})
    model = load_irnet(params, root / IRNET_PATH, root / CLASSIFIER_PATH, distributed.current().device)
    torch.set_num_threads(distributed.available_cpus())
    logged = {"ablation.threshold": threshold, **flatten(params.irnet.model_dump(), "irnet.")}
    with tracking.stage_run("ablation_masks", params.tracking.experiment, logged, root=root, hashes=hashes):
        with resumable_dir(root / out_dir, output_fingerprint(params, hashes)) as staging:
            matrices = write_pseudo_masks(model, manifests, root / CAMS_DIR, staging, params)
        metrics = {"threshold_key": f"irnet.{background_knob(params.irnet)}", "person": False,
                   **pseudo_mask_metrics(matrices, manifests["val"], params.irnet)}
        write_json(root / metrics_path, metrics)
        mlflow.log_metrics({"pseudo_mask_miou": metrics["val"]["miou"]})
    return metrics
