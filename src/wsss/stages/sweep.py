"""``wsss sweep``: an Optuna search over the IRNet threshold (or background weight) and the confidence cutoff.

The ``sweep`` group of ``params.yaml`` names the search space (``sweep.space``), the number of
trials, the objective and the storage. One study per set of fixed inputs: its name is
``<sweep.study>-<hash>`` of everything the objective depends on but the searched values (CAMs,
classifier, every other param), so a changed input starts a new study and ``--resume`` continues
a killed one.

What a trial reuses (``sweeps/cache/``, never versioned):

- IR labels are computed once for every training image the lowest cutoff in the space keeps
  (they do not depend on the cutoff, only the choice of images does);
- IRNet is trained once per distinct kept-image set (cache key: the sorted ids, the training
  params, the seed, the classifier), resumably, and saved atomically;
- the random walk on the val images is kept in memory per IRNet: a trial that changes only
  ``irnet.threshold`` or ``irnet.bg_weight`` re-runs only the walk's last step (and the CRF).

A trial's pseudo masks are made as the ``pseudo_masks`` stage makes them: under ``person.merge`` the
person CAMs floor the walk's background seed and are merged in (val: by the image labels, train: by
the noisy rule); the ``final`` objective's training masks keep ``irnet.ignore_uncertain``'s 255s.

Objectives: ``pseudo_masks`` (cheap, the default): val mIoU of the pseudo masks, reported per
quarter of the val images to a percentile pruner (the bottom quarter is pruned); ``final``: DeepLabv3+ (the ``segmenter`` group) trained
on the trial's pseudo masks of the training images, its best val mIoU, reported per epoch.

Storage (``sweep.storage``): ``sqlite`` (``sweeps/optuna.db``, one worker or a few on one host),
``journal`` (``sweeps/optuna.journal``; ``journal:<path>`` for another file: several processes on
one host), or an RDB URL (``postgresql://...``: several machines). MLflow gets one parent run per
study and a child run per trial; ``sweeps/best.json``, the optimisation history and a contour
plot go to ``sweeps/`` and to the parent run.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from wsss import checkpoint, distributed, provenance, tracking
from wsss.cam import CamStore
from wsss.config import Params, flatten, sweep_space_problems, with_values
from wsss.crf import CrfTask, crf_many
from wsss.data.manifest import ImageRecord, load_manifest
from wsss.errors import ConfigError, DataError, WsssError
from wsss.io import read_image, read_json, read_mask, write_csv, write_json, write_mask_png
from wsss.ir_labels import IrInput, ir_labels_many
from wsss.irnet import IrDataset, build_irnet, train_irnet
from wsss.metrics import confusion_matrix, segmentation_scores
from wsss.irnet_inference import load_irnet, masks_from_walk, walk_chunk
from wsss.shards import MASK
from wsss.stages.paths import CAMS_DIR, CLASSIFIER_PATH, INDEX_FILE, PERSON_CAMS, SPLITS_DIR
from wsss.stages.ir_labels import confident_ids
from wsss.stages.irnet import TRAIN_KEYS
from wsss.stages.pseudo_masks import PRESENCE, load_person_merge, mask_shard

SWEEPS_DIR = Path("sweeps")
CACHE_DIR = SWEEPS_DIR / "cache"
BEST_PATH = SWEEPS_DIR / "best.json"
HISTORY_PLOT = SWEEPS_DIR / "optimization_history.png"
HISTORY_CSV = SWEEPS_DIR / "history.csv"  # the `dvc plots` curve of the optimisation history
CONTOUR_PLOT = SWEEPS_DIR / "contour.png"
LOCK_PATH = SWEEPS_DIR / ".ask.lock"
PARENT_ATTR = "mlflow_parent_run_id"
CHILD_ATTR = "mlflow_run_id"
PRUNE_CHUNKS = 4  # intermediate values per trial of the pseudo_masks objective
WALKS_KEPT = 8  # IRNets whose val walk stays in memory (a few MB each on the default data)


# ---------------------------------------------------------------------------------------------
# study, storage and search space


def storage_url(spec: str, root: Path) -> str:
    """What ``sweep.storage`` means: the SQLite file, a journal file (``journal:<path>``) or an RDB URL."""
    if spec == "sqlite":
        return f"sqlite:///{root / SWEEPS_DIR / 'optuna.db'}"
    if spec == "journal":
        return f"journal:{root / SWEEPS_DIR / 'optuna.journal'}"
    if spec.startswith("journal:") or "://" in spec:
        return spec
    raise ConfigError("params.yaml", [("sweep.storage", f"{spec!r} is neither sqlite, journal, journal:<path> nor an RDB URL")])


def open_storage(url: str):
    import optuna

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(url)


def suggest(trial, space: dict) -> dict[str, float]:
    """The trial's values for every searched key (dotted ``params.yaml`` names)."""
    return {key: trial.suggest_float(key, interval.low, interval.high, step=interval.step, log=interval.log)
            for key, interval in sorted(space.items())}


def current_values(params: Params) -> dict[str, float]:
    """The searched keys' values in ``params``, if every one lies in its range (and on its step)."""
    values = {}
    for key, interval in params.sweep.space.items():
        value = float(getattr(params.irnet, key.removeprefix("irnet.")))
        on_step = interval.step is None or abs(round((value - interval.low) / interval.step) * interval.step + interval.low - value) < 1e-9
        if not (interval.low <= value <= interval.high and on_step):
            return {}
        values[key] = value
    return values


def fixed_inputs(params: Params, root: Path) -> dict[str, Any]:
    """Everything a trial's result depends on except the searched values."""
    sweep = params.sweep
    irnet = {k: v for k, v in params.irnet.model_dump().items() if f"irnet.{k}" not in sweep.space and k not in ("workers", "threads")}
    inputs = {"cams": root / CAMS_DIR, "classifier": root / CLASSIFIER_PATH, "splits": root / SPLITS_DIR}
    if params.person.merge:
        inputs["cams_person"] = root / PERSON_CAMS
    fixed = {"seed": params.seed, "irnet": irnet, "crf": {k: v for k, v in params.crf.model_dump().items() if k != "workers"},
             "objective": sweep.objective, "space": {k: v.model_dump() for k, v in sweep.space.items()},
             "inputs": tracking.input_hashes(inputs), "code": provenance.code_digest(__name__)}
    if params.person.merge:
        fixed["person"] = params.person.model_dump(exclude={"epochs"})
    precision = distributed.resolve_precision(params.compute.precision, distributed.select_device(params.compute.device))
    if precision != "fp32":  # fp32 studies keep the names they had before this setting; auto is named as resolved
        fixed["precision"] = precision
    if sweep.objective == "final":
        fixed["segmenter"] = {k: v for k, v in params.segmenter.model_dump().items() if k not in ("workers", "threads")}
    return fixed


def study_name(params: Params, root: Path, fixed: dict[str, Any] | None = None) -> str:
    """``<sweep.study>-<hash of the fixed inputs>`` (``fixed``: :func:`fixed_inputs`, if already computed)."""
    return f"{params.sweep.study}-{checkpoint.fingerprint(fixed or fixed_inputs(params, root))[:10]}"


def _states():
    from optuna.trial import TrialState

    return TrialState


def finished_count(study) -> int:
    states = _states()
    return sum(t.state in (states.COMPLETE, states.PRUNED) for t in study.get_trials(deepcopy=False))


@contextlib.contextmanager
def _ask_lock(root: Path) -> Iterator[None]:
    """One process at a time counts the trials and asks for the next (exactly N trials on one host)."""
    path = root / LOCK_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# the objective


@dataclass
class _Item:
    """An image with its CAMs (and, for val, its ground-truth mask) held in memory."""

    record: ImageRecord
    image: np.ndarray
    cams: Any
    truth: np.ndarray | None = None

    @property
    def id(self) -> str:
        return self.record.id


class TrialEvaluator:
    """Computes trial values in one worker process, reusing everything a trial does not change."""

    def __init__(self, params: Params, root: Path):
        self.params, self.root = params, Path(root)
        self.train = load_manifest(self.root / SPLITS_DIR / "train.json")
        self.val_manifest = load_manifest(self.root / SPLITS_DIR / "val.json")
        self.index = read_json(self.root / CAMS_DIR / INDEX_FILE)
        self.num_classes = self.val_manifest.num_classes
        self.person_merge = load_person_merge(params, self.root, self.val_manifest.person_class)
        self.cache = self.root / CACHE_DIR
        self.device = distributed.current().device
        self.irnet_trainings = 0  # IRNets trained (not loaded from the cache) by this evaluator
        self._walked: dict[str, list[torch.Tensor]] = {}
        self._val: list[_Item] | None = None
        crf = {k: v for k, v in params.crf.model_dump().items() if k != "workers"}
        fixed_labels = {"conf_fg": params.irnet.conf_fg, "conf_bg": params.irnet.conf_bg, "crf": crf,
                        "cams": tracking.input_hashes({"cams": self.root / CAMS_DIR}), "code": provenance.code_digest(__name__)}
        self.labels_key = checkpoint.fingerprint(fixed_labels)[:12]
        self.labels_dir = self.cache / f"ir_labels-{self.labels_key}"

    # -- inputs shared by all trials
    def val_images(self) -> list[_Item]:
        if self._val is None:
            manifest = self.val_manifest
            self._val = []
            store = CamStore(self.root / CAMS_DIR / "val")
            for record in manifest.records:
                if record.mask is None:
                    continue
                image = read_image(manifest.image_path(record))
                cams = store.load(record.id, expected_size=image.shape[:2])
                self._val.append(_Item(record, image, cams, read_mask(manifest.mask_path(record))))
            if not self._val:
                raise WsssError(f"{self.root / SPLITS_DIR / 'val.json'}: no val image has a mask to score a trial on")
        return self._val

    def ir_labels(self, ids: list[str]) -> Path:
        """IR labels of ``ids`` in the cache (computed once per image; they do not depend on the cutoff)."""
        missing = [i for i in ids if not (self.labels_dir / f"{i}.png").is_file()]
        if missing:
            self.labels_dir.mkdir(parents=True, exist_ok=True)
            records = {r.id: r for r in self.train.records}
            store = CamStore(self.root / CAMS_DIR / "train")
            for start in range(0, len(missing), 256):
                items = []
                for image_id in missing[start : start + 256]:
                    image = read_image(self.train.image_path(records[image_id]))
                    cams = store.load(image_id, expected_size=image.shape[:2])
                    items.append(IrInput(image_id, image, cams.full, cams.class_ids))
                for image_id, labels in ir_labels_many(items, self.params.irnet.conf_fg, self.params.irnet.conf_bg, self.params.crf).items():
                    write_mask_png(self.labels_dir / f"{image_id}.png", labels)  # atomic: a kill leaves no half file
        return self.labels_dir

    def irnet(self, params: Params) -> tuple[str, Any]:
        """IRNet for the images that ``params.irnet.confidence_cutoff`` keeps: from the cache, or trained."""
        kept = sorted(confident_ids(self.index, params.irnet.confidence_cutoff))
        config = {key: getattr(params.irnet, key) for key in TRAIN_KEYS}
        classifier = tracking.input_hashes({"classifier": self.root / CLASSIFIER_PATH})
        key = checkpoint.fingerprint(kept, self.labels_key, config, params.seed, classifier, *distributed.precision_fingerprint())[:16]
        model_path = self.cache / "irnet" / key / "model.pt"
        if not model_path.is_file():
            labels_dir = self.ir_labels(kept)
            records = [r for r in self.train.records if r.id in set(kept)]
            checkpoint.seed_everything(params.seed)
            model = build_irnet(params, self.root / CLASSIFIER_PATH)
            dataset = IrDataset(self.train, records, labels_dir, params.irnet.train_scales, params.irnet.crop_size,
                                params.irnet.augmentation, params.seed)
            train_irnet(params, model, dataset, model_path.parent, key)
            checkpoint.save(model_path, {"model": model.state_dict(), "backbone": params.irnet.backbone,
                                         "backbone_weights": params.irnet.backbone_weights})
            self.irnet_trainings += 1
        return key, load_irnet(params, model_path, self.root / CLASSIFIER_PATH, self.device)

    def walked_val(self, key: str, model, params: Params) -> list[torch.Tensor]:
        """The random walk on the val images with IRNet ``key`` (kept in memory: the walk's last
        step is all that a threshold or background weight changes)."""
        if key not in self._walked:
            images = self.val_images()
            walked: list[torch.Tensor] = []
            with torch.no_grad():
                size = params.compute.chunk_size
                for start in range(0, len(images), size):
                    chunk = images[start : start + size]
                    floors = None if self.person_merge is None else [
                        self.person_merge.background_floor("val", v.record, v.image.shape[:2], PRESENCE["val"]) for v in chunk]
                    walked += walk_chunk(model, [v.image for v in chunk], [v.cams for v in chunk], params.irnet, floors)
            self._walked[key] = walked
            while len(self._walked) > WALKS_KEPT:  # the oldest goes: memory stays bounded
                self._walked.pop(next(iter(self._walked)))
        return self._walked[key]

    def _masks(self, walked: list[torch.Tensor], items: list, params: Params) -> list[np.ndarray]:
        masks = masks_from_walk(walked, [v.image for v in items], [v.cams for v in items], params.irnet)
        if params.irnet.post_crf:
            tasks = [CrfTask(v.id, v.image, m) for v, m in zip(items, masks, strict=True)]
            masks = [refined for _, refined in crf_many(tasks, params.crf)]
        if self.person_merge is not None:
            masks, _ = self.person_merge.apply("val", [v.record for v in items], lambda p: items[p].image, masks, PRESENCE["val"])
        return masks

    def pseudo_mask_miou(self, params: Params, report=None) -> float:
        """Val mIoU of the pseudo masks made with ``params``; ``report(step, running mIoU)`` after each chunk."""
        key, model = self.irnet(params)
        walked = self.walked_val(key, model, params)
        images = self.val_images()
        matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        bounds = np.linspace(0, len(images), PRUNE_CHUNKS + 1).astype(int)
        for step, (start, stop) in enumerate(itertools.pairwise(bounds)):
            chunk = images[start:stop]
            for item, mask in zip(chunk, self._masks(walked[start:stop], chunk, params), strict=True):
                matrix += confusion_matrix(item.truth, mask, self.num_classes)
            if report is not None and stop < len(images):
                report(step, segmentation_scores(matrix).miou)
        return segmentation_scores(matrix).miou

    def final_miou(self, params: Params, trial_dir: Path, report=None) -> float:
        """Best val mIoU of DeepLabv3+ trained on this trial's pseudo masks of the training images."""
        from wsss.segmentation import SegmentationDataset, train_segmenter
        from wsss.stages.segmenter import encoder_inputs, segmenter_spec

        key, model = self.irnet(params)
        masks_dir = trial_dir / "pseudo_masks"
        masks_dir.mkdir(parents=True, exist_ok=True)
        records = self.train.records
        cams = CamStore(self.root / CAMS_DIR / "train")
        merge = None if self.person_merge is None else (self.person_merge, "train", PRESENCE["train"])
        size = params.compute.chunk_size
        for start in tqdm(range(0, len(records), size), desc="sweep pseudo masks", unit="batch"):
            chunk = records[start : start + size]
            masks, _ = mask_shard(model, self.train, chunk, cams, params, scored=False, merge=merge, ignore=params.irnet.ignore_uncertain)
            for record, stored in zip(chunk, masks, strict=True):
                write_mask_png(masks_dir / f"{record.id}.png", stored[MASK])
        config = params.segmenter
        spec = segmenter_spec(params, self.train)
        encoder_weights, _ = encoder_inputs(params, self.root)
        dataset = SegmentationDataset([self.train.image_path(r) for r in records], [masks_dir / f"{r.id}.png" for r in records],
                                      config.image_size, config.augmentation, params.seed, self.train.num_classes, config.scale_range)
        val = [r for r in self.val_manifest.records if r.mask is not None]
        on_epoch = (lambda record: report(record.epoch, record.val_miou)) if report is not None else None
        result = train_segmenter(config, params.seed, spec, dataset, [self.val_manifest.image_path(r) for r in val],
                                 [self.val_manifest.mask_path(r) for r in val], trial_dir / "checkpoints",
                                 checkpoint.fingerprint(key, config.model_dump(), params.irnet.model_dump()),
                                 encoder_weights=encoder_weights, on_epoch=on_epoch, desc="sweep segmenter")
        return result.best_miou


# ---------------------------------------------------------------------------------------------
# workers, MLflow, results


def _client(params: Params, root: Path):
    from mlflow.tracking import MlflowClient

    experiment_id = tracking.ensure_experiment(params.sweep.experiment, root)
    return MlflowClient(), experiment_id


def _prepare_study(params: Params, root: Path, resume: bool):
    """Create (or, with ``resume``, reopen) the study and its MLflow parent run; with ``resume``,
    trials a killed worker left running are failed and queued again with the same values."""
    import optuna

    fixed = fixed_inputs(params, root)  # hashes the CAMs: once
    name, url = study_name(params, root, fixed), storage_url(params.sweep.storage, root)
    storage = open_storage(url)
    client, experiment_id = _client(params, root)
    if not resume:
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=name, storage=storage)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
    parent_id = study.user_attrs.get(PARENT_ATTR)
    if parent_id is not None and not _run_exists(client, parent_id):
        parent_id = None  # the study outlived its MLflow store (another store, or mlruns removed): a new parent run
    if parent_id is None:
        tags = {**tracking.lineage_tags("sweep", fixed["inputs"], root), "wsss.study": name,
                "wsss.storage": url.split("://")[0] if "://" in url else "journal"}
        parent = client.create_run(experiment_id, run_name=name, tags=tags)
        parent_id = parent.info.run_id
        study.set_user_attr(PARENT_ATTR, parent_id)
        for key, value in {**flatten(params.sweep.model_dump(), "sweep."), **flatten(fixed["irnet"], "irnet.")}.items():
            client.log_param(parent_id, key, str(value)[:500])
    else:
        client.update_run(parent_id, status="RUNNING")
    states = _states()
    if not study.get_trials(deepcopy=False):
        current = current_values(params)
        if current:  # the first trial scores params.yaml as it is: the baseline the others must beat
            study.enqueue_trial(current, user_attrs={"baseline": True})
    for trial in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        study.tell(trial.number, state=states.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        if CHILD_ATTR in trial.user_attrs and _run_exists(client, trial.user_attrs[CHILD_ATTR]):
            client.set_terminated(trial.user_attrs[CHILD_ATTR], status="KILLED")
    return study, url, parent_id


def _run_exists(client, run_id: str) -> bool:
    import mlflow

    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise  # a server that cannot be reached is no reason to start another parent run
    return run.info.lifecycle_stage != "deleted"


def run_worker(params: Params, root: Path, name: str, url: str, parent_id: str, worker: int = 0) -> int:
    """Run trials until the study has ``sweep.trials`` finished ones (or the timeout); returns how many ran here."""
    import optuna

    sweep = params.sweep
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=sweep.seed + worker, n_startup_trials=min(8, sweep.trials))
    # Prune only the bottom quarter, never at the first report: running mIoUs over a quarter of
    # the val images are noisy, and a pruned trial should be one that cannot win.
    pruner = (optuna.pruners.PercentilePruner(25.0, n_startup_trials=5, n_warmup_steps=1) if sweep.pruning
              else optuna.pruners.NopPruner())
    study = optuna.load_study(study_name=name, storage=open_storage(url), sampler=sampler, pruner=pruner)
    client, experiment_id = _client(params, root)
    distributed.init(params.compute)  # compute.device: IRNet, the walk and the segmenter run there
    try:
        return _run_trials(params, root, name, study, client, experiment_id, parent_id, worker)
    finally:
        distributed.shutdown()  # the precision is part of the IRNet cache key: no later caller in this process inherits it


def _run_trials(params: Params, root: Path, name: str, study, client, experiment_id: str, parent_id: str, worker: int) -> int:
    """The trial loop of :func:`run_worker`, in the process context it set up."""
    import optuna

    sweep = params.sweep
    evaluator = TrialEvaluator(params, root)
    started, ran = time.monotonic(), 0
    states = _states()
    progress = tqdm(total=sweep.trials, initial=finished_count(study), desc=f"sweep {name} (worker {worker})", unit="trial")
    while sweep.timeout_s is None or time.monotonic() - started < sweep.timeout_s:
        with _ask_lock(root):
            running = len(study.get_trials(deepcopy=False, states=(states.RUNNING,)))
            if finished_count(study) + running >= sweep.trials:
                break
            trial = study.ask()
        values = suggest(trial, sweep.space)
        child = client.create_run(experiment_id, run_name=f"trial {trial.number}",
                                  tags={"mlflow.parentRunId": parent_id, "wsss.study": name, "wsss.trial": str(trial.number),
                                        "wsss.worker": str(worker)})
        trial.set_user_attr(CHILD_ATTR, child.info.run_id)
        for key, value in values.items():
            client.log_param(child.info.run_id, key, value)

        def report(step: int, value: float, trial=trial, run_id=child.info.run_id) -> None:
            client.log_metric(run_id, "intermediate_miou", value, step=step)
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned()

        begin = time.monotonic()
        trial_params = with_values(params, values)
        try:
            if sweep.objective == "pseudo_masks":
                value = evaluator.pseudo_mask_miou(trial_params, report)
            else:
                value = evaluator.final_miou(trial_params, root / CACHE_DIR / "trials" / f"{name}-{trial.number}", report)
        except optuna.TrialPruned:
            study.tell(trial, state=states.PRUNED)
            state, value = "PRUNED", None
        except ConfigError as error:  # e.g. a cutoff that keeps no training image: as bad as it gets, not a crash
            study.tell(trial, state=states.PRUNED)
            client.set_tag(child.info.run_id, "wsss.pruned_reason", str(error)[:5000])
            state, value = "PRUNED", None
        except (KeyboardInterrupt, SystemExit):  # interrupted, not wrong: the same values run again on the next call
            study.tell(trial, state=states.FAIL)
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            client.set_terminated(child.info.run_id, status="KILLED")
            raise
        except BaseException:
            study.tell(trial, state=states.FAIL)
            client.set_tag(child.info.run_id, "wsss.trial_state", "FAIL")
            client.set_terminated(child.info.run_id, status="FAILED")
            raise
        else:
            study.tell(trial, value)
            state = "COMPLETE"
        ran += 1
        client.log_metric(child.info.run_id, "duration_s", time.monotonic() - begin)
        if value is not None:
            client.log_metric(child.info.run_id, "objective", value)
        client.set_tag(child.info.run_id, "wsss.trial_state", state)
        client.set_terminated(child.info.run_id, status="FINISHED")
        progress.n = finished_count(study)
        progress.set_postfix(last=state if value is None else f"{value:.4f}")
    progress.close()
    return ran


def _worker_entry(params_path: str, root: str, name: str, url: str, parent_id: str, worker: int, threads: int) -> None:
    from wsss.config import load_params

    torch.set_num_threads(threads)
    run_worker(load_params(params_path), Path(root), name, url, parent_id, worker)


def best_values(study) -> dict[str, Any]:
    """``sweeps/best.json``: the best trial's values, its objective and how the study went."""
    states = _states()
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == states.COMPLETE]
    if not complete:
        raise WsssError(f"study {study.study_name}: no trial completed, so there are no best values")
    best = max(complete, key=lambda t: t.value)
    return {"study": study.study_name, "best_trial": best.number, "objective": best.value, "values": best.params,
            "trials_complete": len(complete), "trials_pruned": sum(t.state == states.PRUNED for t in trials),
            "trials_failed": sum(t.state == states.FAIL for t in trials)}


def history_rows(study) -> list[dict[str, Any]]:
    """``sweeps/history.csv``: one row per finished trial in trial order, its state, objective (empty
    when pruned or failed), the best objective so far and the trial's values."""
    best, rows = None, []
    keys = sorted({key for trial in study.get_trials(deepcopy=False) for key in trial.params})
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if not trial.state.is_finished():
            continue
        value = trial.value if trial.state == _states().COMPLETE else None
        if value is not None:
            best = value if best is None else max(best, value)
        rows.append({"trial": trial.number, "state": trial.state.name, "objective": "" if value is None else f"{value:.6f}",
                     "best_so_far": "" if best is None else f"{best:.6f}",
                     **{key: "" if key not in trial.params else f"{trial.params[key]:.6g}" for key in keys}})
    return rows


def apply_command(values: dict[str, float]) -> str:
    """The command that reruns the pipeline with the best values (a DVC experiment)."""
    return "dvc exp run " + " ".join(f"-S {key}={value:.6g}" for key, value in sorted(values.items()))


def _figures(study, space: dict) -> dict[Path, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import warnings

    from optuna.visualization import matplotlib as plots

    figures = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        figures[HISTORY_PLOT] = plots.plot_optimization_history(study).figure
        keys = sorted(space)
        if len(keys) >= 2:
            axes = plots.plot_contour(study, params=keys[:2])
            figures[CONTOUR_PLOT] = np.ravel(axes)[0].figure
        else:
            figures[CONTOUR_PLOT] = plots.plot_slice(study, params=keys)
            figures[CONTOUR_PLOT] = np.ravel(figures[CONTOUR_PLOT])[0].figure
    return figures


def run_sweep(params: Params, root: Path, resume: bool = False, workers: int = 1, params_path: Path | None = None) -> dict:
    """Run the study to ``sweep.trials`` finished trials with ``workers`` processes; write the results."""
    if params.sweep is None:
        raise ConfigError(params_path or "params.yaml", [("sweep", "required key is missing (the sweep group)")])
    if workers < 1:
        raise ConfigError("wsss sweep", [("--workers", f"must be at least 1, got {workers}")])
    problems = sweep_space_problems(params)
    if problems:
        raise ConfigError(params_path or "params.yaml", problems)
    root = Path(root)
    for needed in (SPLITS_DIR / "train.json", SPLITS_DIR / "val.json", CAMS_DIR / INDEX_FILE, CLASSIFIER_PATH):
        if not (root / needed).is_file():
            raise DataError(root / needed, "not found: the sweep starts from the pipeline's CAMs and classifier; "
                                           "run `dvc repro pipelines/sweep/dvc.yaml` (or `dvc repro cams` first)")
    study, url, parent_id = _prepare_study(params, root, resume)
    if workers == 1:
        run_worker(params, root, study.study_name, url, parent_id)
    else:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        threads = max(1, distributed.available_cpus() // workers)
        processes = [context.Process(target=_worker_entry, args=(str(params_path or root / "params.yaml"), str(root), study.study_name,
                                                                 url, parent_id, index, threads)) for index in range(workers)]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        failed = [index for index, process in enumerate(processes) if process.exitcode != 0]
        if failed:
            raise WsssError(f"sweep workers {failed} failed (their trials are FAIL in the study; --resume retries them)")
    return finish_study(params, root, study.study_name, url, parent_id)


def finish_study(params: Params, root: Path, name: str, url: str, parent_id: str) -> dict:
    import optuna

    from wsss import visualize
    from wsss.io import atomic_write_bytes

    study = optuna.load_study(study_name=name, storage=open_storage(url))
    best = best_values(study)
    best["apply"] = apply_command(best["values"])
    client, _ = _client(params, root)
    (root / SWEEPS_DIR).mkdir(parents=True, exist_ok=True)
    for path, figure in _figures(study, params.sweep.space).items():
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        atomic_write_bytes(root / path, buffer.getvalue())
        client.log_artifact(parent_id, str(root / path))
        visualize.close(figure)
    write_json(root / BEST_PATH, best)
    rows = history_rows(study)
    write_csv(root / HISTORY_CSV, rows, fieldnames=list(rows[0]))
    client.log_artifact(parent_id, str(root / HISTORY_CSV))
    client.log_artifact(parent_id, str(root / BEST_PATH))
    for key, value in best["values"].items():
        client.log_metric(parent_id, f"best.{key}", value)
    client.log_metric(parent_id, "best_objective", best["objective"])
    for key in ("trials_complete", "trials_pruned", "trials_failed"):
        client.log_metric(parent_id, key, best[key])
    client.set_terminated(parent_id, status="FINISHED")
    return best

