"""Typed parameters: the schema of ``params.yaml``, validated when a stage starts.

Every group belongs to one pipeline step (``data``, ``classifier``, ``cams``, ``irnet``,
``segmenter``, ``evaluate``); ``seed`` makes CPU runs repeatable and ``tracking`` names the
MLflow experiment. Unknown keys, wrong types and out-of-range values raise
:class:`~wsss.errors.ConfigError`, whose message names the dotted key (``data.balance.factor``).
The same schema validates the CPU default (``params.yaml``) and the paper profile
(``profiles/paper.yaml``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from wsss.errors import ConfigError

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "t_shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
"""Fashion-MNIST class names in the order of its label ids 0..9."""

SKIMAGE_BACKGROUNDS: tuple[str, ...] = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "rocket",
    "stereo_motorcycle",
)
"""Photos and textures shipped inside the scikit-image wheel (loadable offline)."""


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_range(pair: tuple[float, float], name: str) -> None:
    if pair[0] > pair[1]:
        raise ValueError(f"{name}: minimum {pair[0]} is greater than maximum {pair[1]}")


class EmbeddedParams(_Group):
    """The synthetic dataset: Fashion-MNIST objects pasted on blurred, darkened photo crops."""

    classes: list[Literal[FASHION_MNIST_CLASSES]] = Field(min_length=2)  # type: ignore[valid-type]
    head_classes: list[Literal[FASHION_MNIST_CLASSES]] = []  # type: ignore[valid-type]
    head_weight: float = Field(4.0, ge=1.0)
    num_train: int = Field(ge=1)
    num_heldout: int = Field(ge=2)
    image_size: int = Field(ge=16, le=1024)
    objects_per_image: tuple[int, int] = (1, 2)
    object_scale: tuple[float, float] = (0.45, 0.65)
    person_frequency: float = Field(0.5, ge=0.0, le=1.0)
    person_scale: tuple[float, float] = (0.7, 0.95)
    min_visible: float = Field(0.7, gt=0.0, le=1.0)
    backgrounds: list[Literal[SKIMAGE_BACKGROUNDS]] = Field(min_length=1)  # type: ignore[valid-type]
    background_blur: float = Field(2.5, ge=0.0)
    background_brightness: float = Field(0.45, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _ranges(self) -> EmbeddedParams:
        _check_range(self.objects_per_image, "objects_per_image")
        if self.objects_per_image[0] < 1:
            raise ValueError("objects_per_image: every image needs at least one object")
        for name in ("object_scale", "person_scale"):
            low, high = getattr(self, name)
            _check_range((low, high), name)
            if low <= 0 or high > 1:
                raise ValueError(f"{name}: scales are fractions of the image side in (0, 1]")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("classes: a class is listed twice")
        unknown = sorted(set(self.head_classes) - set(self.classes))
        if unknown:
            raise ValueError(f"head_classes: {unknown} are not in classes")
        return self


class VocParams(_Group):
    """PASCAL VOC 2012 layout under ``data.root`` (labels are derived from the masks).

    ``classes``: None for VOC's 20 classes; for a VOC-format dataset of one's own, the names of the
    mask values 1..N as a list, or the path (inside ``data.root``) of a text file with one name a
    line (a first line ``background`` or ``_background_`` names value 0 and is skipped)."""

    mask_dir: str = "SegmentationClass"
    train_list: str = "ImageSets/Segmentation/train.txt"
    val_list: str = "ImageSets/Segmentation/val.txt"
    classes: list[str] | str | None = None

    @model_validator(mode="after")
    def _class_names(self) -> VocParams:
        if isinstance(self.classes, list):
            check_class_names(self.classes)
        elif isinstance(self.classes, str) and not self.classes.strip():
            raise ValueError("classes: give a list of names, a file inside data.root, or null (VOC's classes)")
        return self


def check_class_names(names: list[str]) -> None:
    """Raise ValueError (naming ``classes``) unless ``names`` are 1..254 distinct, non-empty names."""
    if not names:
        raise ValueError("classes: at least one class is needed")
    if len(names) > 254:
        raise ValueError(f"classes: {len(names)} classes do not fit 8-bit masks (1..254; 255 is ignore)")
    if any(not name.strip() for name in names):
        raise ValueError("classes: a class name is empty")
    if any(name.strip().lower() in ("background", "_background_") for name in names):
        raise ValueError("classes: list the classes 1..N only; background is 0")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"classes: {repeated} appear more than once")


class LidParams(_Group):
    """LID 2020 layout as the authors' code reads it (paths relative to ``data.root``)."""

    train_list: str = "ILSVRC/Data/DET/train/train.json"
    val_list: str = "LID_track1/val/val.json"
    val_masks: str = "LID_track1/val/masks"
    image_extension: str = ".JPEG"


class BalanceParams(_Group):
    """Class balancing of the training split by downsampling.

    ``cap = factor * count(reference class)``, the reference being the rarest class (``min``) or
    the median class (``median``) of the training split; ``none`` keeps every image.
    """

    rule: Literal["none", "min", "median"] = "median"
    factor: float = Field(1.5, ge=1.0)


class DataParams(_Group):
    source: Literal["embedded", "voc", "lid"]
    root: str
    seed: int = Field(2020, ge=0)  # the dataset's: embedded images, person-label drop, balance, val/test split
    person_class: str | None  # the class whose labels are unreliable (LID's person); null: no person handling
    person_label_drop: float = Field(ge=0.0, le=1.0)
    drop_person_labels: bool = True
    balance: BalanceParams = BalanceParams()
    test_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    embedded: EmbeddedParams | None = None
    voc: VocParams = VocParams()
    lid: LidParams = LidParams()

    @model_validator(mode="after")
    def _person_known(self) -> DataParams:
        if self.source == "embedded" and self.embedded is None:
            raise ValueError("embedded: required when data.source is embedded")
        if self.person_class is None and self.person_label_drop > 0:
            raise ValueError(f"person_label_drop: {self.person_label_drop} drops the labels of a person class, "
                             "but data.person_class is null; set 0")
        if self.source == "embedded" and self.person_class is None:
            raise ValueError("person_class: the embedded dataset is built around a person class; name one of data.embedded.classes")
        if self.source == "embedded" and self.person_class not in self.embedded.classes:
            raise ValueError(
                f"person_class: {self.person_class!r} is not one of data.embedded.classes "
                f"{list(self.embedded.classes)}"
            )
        return self


class ClassifierParams(_Group):
    """Step 1 classifier (the ``train_classifier`` stage)."""

    arch: Literal["small_cnn", "mobilenet_v2", "vgg16_bn_d1"]
    weights: str = "none"  # none | imagenet | path to a local state dict of the backbone
    extra_convs: int = Field(4, ge=0)
    image_size: int = Field(ge=16)
    batch_size: int = Field(ge=2)
    epochs: int = Field(ge=1)
    lr_backbone: float = Field(gt=0)
    lr_head: float = Field(gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    scheduler: Literal["cosine", "step", "none"] = "cosine"
    step_size: int = Field(3, ge=1)  # scheduler step: epochs between decays
    gamma: float = Field(0.2, gt=0, le=1)  # scheduler step: decay factor
    augmentation: Literal["strong", "flip", "none"] = "strong"
    workers: int = Field(0, ge=0)  # DataLoader worker processes
    threads: int = Field(0, ge=0)  # torch CPU threads; 0 = every core


class CamParams(_Group):
    """Step 1 CAMs (the ``cams`` stage) and their evaluation on val."""

    scales: list[float] = Field([1.0, 0.5, 1.5, 2.0], min_length=1)
    normalize: Literal["per_class", "global"] = "per_class"
    eval_threshold: float = Field(0.15, gt=0, lt=1)
    batch_size: int = Field(32, ge=1)
    num_overlays: int = Field(6, ge=0)
    # val scored a second time on the classes the classifier predicts (score >= this; its top class
    # when none is): what steps 1-2 give on an image nobody labelled
    predicted_label_threshold: float = Field(0.5, gt=0, lt=1)

    @model_validator(mode="after")
    def _positive_scales(self) -> CamParams:
        if any(scale <= 0 for scale in self.scales):
            raise ValueError(f"scales: every scale must be positive, got {self.scales}")
        return self


class CrfParams(_Group):
    """Dense CRF (pydensecrf) on label maps: CAMs (step 1), IR labels and pseudo masks (step 2), and the
    final predictions under ``evaluate.crf`` (step 3)."""

    gt_prob: float = Field(0.7, gt=0, lt=1)
    gaussian_sxy: float = Field(3, gt=0)
    gaussian_compat: float = Field(3, ge=0)
    bilateral_sxy: float = Field(50, gt=0)
    bilateral_srgb: float = Field(5, gt=0)
    bilateral_compat: float = Field(10, ge=0)
    iterations: int = Field(10, ge=1)
    workers: int = Field(0, ge=0)  # processes; 0 = every core


class IrnetParams(_Group):
    """Step 2: IR labels, IRNet and the random walk (stages ir_labels, train_irnet, pseudo_masks)."""

    backbone: Literal["classifier", "resnet50"] = "classifier"
    backbone_weights: str = "imagenet"  # resnet50 only: imagenet | none | path to a state dict
    confidence_cutoff: float = Field(0.8, ge=0, le=1)
    conf_fg: float = Field(0.30, gt=0, lt=1)
    conf_bg: float = Field(0.05, gt=0, lt=1)
    train_radius: int = Field(10, ge=2)
    infer_radius: int = Field(5, ge=2)
    infer_scale: Literal[1, 2, 4] = 1  # walk on the image enlarged this much (small images)
    train_scales: list[float] = Field([0.5, 1.0, 1.5, 2.0], min_length=1)
    crop_size: int = Field(512, ge=16)
    batch_size: int = Field(32, ge=1)
    epochs: int = Field(3, ge=1)
    lr_displacement: float = Field(0.05, gt=0)
    lr_boundary: float = Field(0.005, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    augmentation: Literal["strong", "flip", "none"] = "strong"
    beta: float = Field(10, gt=0)
    exp_times: int = Field(8, ge=0, le=12)
    # After the walk: "plane" (irn, paper) puts a constant background plane at `threshold`
    # before the class maps (all divided by their common max); "walk" (AffinityNet's way) also
    # walks a background seed 1 - max over the classes of the max-normalised CAMs, divides every
    # walked map by its own max and weighs the background by `bg_weight`.
    background: Literal["plane", "walk"] = "plane"
    threshold: float = Field(0.3, gt=0, lt=1)
    bg_weight: float = Field(1.0, gt=0)
    post_crf: bool = False  # dense CRF (the `crf` group) on the pseudo masks, as step 1 does on CAMs
    # training pseudo masks: pixels where the walk and the CRF disagree become 255 (ignored by the
    # segmenter's loss; wsss.uncertain); needs post_crf
    ignore_uncertain: bool = False
    workers: int = Field(0, ge=0)
    threads: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _thresholds(self) -> IrnetParams:
        if self.conf_bg >= self.conf_fg:
            raise ValueError(f"conf_bg: {self.conf_bg} must be below conf_fg ({self.conf_fg})")
        if self.ignore_uncertain and not self.post_crf:
            raise ValueError("ignore_uncertain: true needs post_crf: true (uncertain pixels are those where the walk "
                             "and the CRF disagree)")
        if any(scale <= 0 for scale in self.train_scales):
            raise ValueError(f"train_scales: every scale must be positive, got {self.train_scales}")
        return self


class SegmenterParams(_Group):
    """Step 3: DeepLabv3+ (segmentation-models-pytorch) trained on the pseudo masks; the
    ``oracle`` stage trains the same network with the same budget on ground-truth masks."""

    encoder: str = Field(min_length=1)  # any smp encoder name: resnet50 (paper), resnet101, resnet18, ...;
    # or classifier: the trained step-1 network (classifier group), output stride 8
    encoder_weights: str = "none"  # none | imagenet | path to a local state dict of the encoder
    output_stride: Literal[8, 16] = 16  # dilation instead of stride in the last stage(s)
    decoder_channels: int = Field(256, ge=8)  # DeepLabv3+ decoder / ASPP width (smp and paper: 256)
    atrous_rates: tuple[PositiveInt, PositiveInt, PositiveInt] = (12, 24, 36)  # the ASPP's dilations (smp's)
    image_size: int = Field(ge=16)  # training side; images and masks are resized to it
    batch_size: int = Field(ge=2)  # the ASPP's image pooling has BatchNorm over one value per image
    epochs: int = Field(ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"  # paper: SGD; from scratch AdamW learns much faster
    lr: float = Field(1e-3, gt=0)
    lr_head_factor: float = Field(1.0, gt=0)  # decoder + head learning rate = lr x this (NPA: 10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-6, ge=0)
    augmentation: Literal["strong", "flip", "none"] = "strong"  # applied to image and mask together
    scale_range: tuple[float, float] = (1.0, 1.0)  # random zoom of each training image (DeepLab: 0.5-2)
    ema_decay: float | None = Field(None, gt=0, lt=1)  # exponential moving average of the weights, this decay per
    # step: the average is what val scores and what is saved; None: the weights themselves (the paper)
    background_weight: float = Field(1.0, gt=0)  # weight of the background class in the cross-entropy (1: unweighted,
    # the paper); below 1 an object pixel called background costs more than the reverse
    skip_disagreement: float | None = Field(None, gt=0, le=1)  # after skip_after_epochs: a labelled pixel whose label the
    # network contradicts (another class, softmax >= this) is left out of the loss; None: every labelled pixel (the paper)
    skip_after_epochs: int = Field(3, ge=0)  # epochs trained on every labelled pixel first
    workers: int = Field(0, ge=0)  # DataLoader worker processes
    threads: int = Field(0, ge=0)  # torch CPU threads, 0 = every core


    @model_validator(mode="after")
    def _scale_range(self) -> SegmenterParams:
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range: needs 0 < min <= max, got {list(self.scale_range)}")
        return self

    @model_validator(mode="after")
    def _divisible_size(self) -> SegmenterParams:
        if self.image_size % self.output_stride:
            raise ValueError(f"image_size: {self.image_size} is not a multiple of output_stride {self.output_stride} "
                             "(DeepLabv3+ trains on images whose sides the encoder's stride divides)")
        return self

    @model_validator(mode="after")
    def _classifier_encoder(self) -> SegmenterParams:
        if self.encoder == "classifier":
            if self.encoder_weights != "none":
                raise ValueError("encoder_weights: the classifier encoder starts from the step-1 network's "
                                 f"weights (models/classifier/model.pt); set none, not {self.encoder_weights!r}")
            if self.output_stride != 8:
                raise ValueError(f"output_stride: the classifier encoder has output stride 8, not {self.output_stride}")
        return self


class EvaluateParams(_Group):
    """Test-time augmentation and evaluation (stage evaluate)."""

    tta_scales: list[float] = Field([0.5, 1.0, 2.0], min_length=1)  # x {image, mirror}
    num_figures: int = Field(6, ge=0)  # val images in the Figure-2 picture
    crf: bool = False  # the dense CRF (crf group) on the TTA predictions of both segmenters (not in the paper)

    @model_validator(mode="after")
    def _positive_scales(self) -> EvaluateParams:
        if any(scale <= 0 for scale in self.tta_scales):
            raise ValueError(f"tta_scales: every scale must be positive, got {self.tta_scales}")
        return self


# Parameters a sweep may search, and where each lives: ``walk`` keys only re-run the random
# walk's last step (cheap); ``ir_labels`` keys change the kept images and so IRNet.
SWEEP_KEYS = {"irnet.threshold": "walk", "irnet.bg_weight": "walk", "irnet.confidence_cutoff": "ir_labels"}


class SweepRange(_Group):
    """A search interval; ``step`` makes it discrete (fewer distinct IRNets for the cutoff)."""

    low: float
    high: float
    step: float | None = Field(None, gt=0)
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> SweepRange:
        if not self.low < self.high:
            raise ValueError(f"low: must be below high, got low {self.low} and high {self.high}")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log: needs low > 0 and no step")
        return self


class SweepParams(_Group):
    """The Optuna sweep (``wsss sweep``, ``pipelines/sweep/dvc.yaml``)."""

    study: str = Field("wsss", min_length=1)  # the study name's prefix (a hash of its inputs follows)
    experiment: str = Field("wsss-sweep", min_length=1)  # MLflow experiment of the parent and trial runs
    objective: Literal["pseudo_masks", "final"] = "pseudo_masks"  # val mIoU of the pseudo masks | of the segmenter
    trials: int = Field(20, ge=1)  # finished trials (complete or pruned) the study ends with
    timeout_s: float | None = Field(None, gt=0)  # stop starting trials after this long (per call)
    seed: int = Field(0, ge=0)  # TPE sampler seed
    storage: str = Field("sqlite", min_length=1)  # sqlite (sweeps/optuna.db) | journal (sweeps/optuna.journal) | an RDB URL
    pruning: bool = True  # prune the bottom quarter of trials on their running val mIoU
    space: dict[str, SweepRange] = Field(min_length=1)

    @model_validator(mode="after")
    def _known_keys(self) -> SweepParams:
        unknown = sorted(set(self.space) - set(SWEEP_KEYS))
        if unknown:
            raise ValueError(f"space: {unknown} cannot be searched; searchable: {sorted(SWEEP_KEYS)}")
        return self


class PersonParams(_Group):
    """The binary person classifier (``person_classifier`` stage) and the merge of its person CAMs
    into pseudo masks: in the main pipeline's ``pseudo_masks`` under ``merge``, in the ablation's
    ``person_masks`` stages. It trains like the step-1 classifier (the ``classifier`` group) on the
    noisy person labels, with its own epochs."""

    merge: bool = False  # main pipeline: the person merged into the pseudo masks (the paper's "Person: yes")
    epochs: int = Field(10, ge=1)
    # which epoch's weights are kept: the last, or the one of the best val F1 at P >= 0.5 (trained on noisy
    # negatives, P(person) hovers about 0.5 and that F1 jumps between epochs: the kept CAMs with it)
    checkpoint: Literal["last", "best"] = "last"
    # P(person) from which an image counts as showing one; auto: the threshold of the best F1 on val, whose
    # labels are complete (the noisy negatives of training bias P down by an amount that changes with the run)
    presence_threshold: float | Literal["auto"] = "auto"
    # person CAM (max-normalised) from which a background pixel becomes person; mean: the image's own mean of that
    # map (how far a run's person CAMs spread varies: the best constant moved from 0.2 to 0.4 between seeds)
    cam_threshold: float | Literal["mean"] = 0.3
    post_crf: bool = True  # dense CRF (crf group) on the merged masks
    # main pipeline, with merge and irnet.background: walk: in an image that shows a person, the walk's background
    # seed is at least this times the person CAM (max-normalised), so objects' CAMs that spill over the person behind
    # them lose that region to the background before the merge gives it to the person (0: off, as the paper)
    background_seed: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _threshold_in_range(self) -> PersonParams:
        if self.presence_threshold != "auto" and not 0 < self.presence_threshold < 1:
            raise ValueError(f"presence_threshold: {self.presence_threshold} is not in (0, 1); give a probability or auto")
        if self.cam_threshold != "mean" and not 0 < self.cam_threshold < 1:
            raise ValueError(f"cam_threshold: {self.cam_threshold} is not in (0, 1); give a fraction of the CAM's peak or mean")
        return self


class AblationParams(_Group):
    """The paper's Table 3 grid (``pipelines/ablation/dvc.yaml``): one segmenter (the ``segmenter``
    group, encoder replaced) per encoder x threshold x person, each scored on val with and without TTA.

    ``thresholds`` are values of IRNet's background knob: ``irnet.threshold`` (the paper's "IRNet
    thr.") under ``irnet.background: plane``, ``irnet.bg_weight`` under ``walk``."""

    experiment: str = Field("ablation", min_length=1)  # MLflow experiment of the grid's cells
    encoders: list[str] = Field(min_length=1)
    thresholds: list[float] = Field(min_length=1)
    person: list[bool] = Field([False, True], min_length=1)
    # The smp encoders' output stride in the grid (None: segmenter.output_stride); the classifier
    # encoder keeps its own 8. On 2 CPU cores a resnet18 cell trains 1.6x faster at 16 than at 8.
    smp_output_stride: Literal[8, 16] | None = None

    @model_validator(mode="after")
    def _distinct(self) -> AblationParams:
        for name in ("encoders", "thresholds", "person"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name}: values repeat: {values}")
        if any(value <= 0 for value in self.thresholds):
            raise ValueError(f"thresholds: every value must be positive, got {self.thresholds}")
        return self


class ComputeParams(_Group):
    """How the stages run, not what they compute: the launcher of the parallel stages (one
    process, or torchrun with N processes), the device, mixed precision, BatchNorm across
    processes. See :mod:`wsss.distributed`."""

    launcher: str = "python"  # python | torchrun --standalone --nproc_per_node N (dvc.yaml: the stages' command)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # training forward passes: auto = bf16 where the device computes it natively, else fp32 (wsss.distributed.resolve_precision);
    # fp16 needs CUDA
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    batchnorm: Literal["local", "sync"] = "local"  # several processes: per-process statistics or SyncBatchNorm (CUDA)
    workers: int = Field(0, ge=0)  # loader processes that read images ahead in the inference stages (cams, evaluation)
    eval_batch_size: int = Field(16, ge=1)  # images per forward pass when a segmenter is scored (evaluate, oracle, cells)
    chunk_size: int = Field(64, ge=1)  # images held together by the random walk, IR labels and each dense-CRF pool
    shard_size: int = Field(128, ge=1)  # images per file of the inference outputs (wsss.shards); readers follow any size
    # glibc: allocations of this many MiB or more get their own mapping (wsss.heap): peak memory stops
    # growing with the number of image sizes seen, at a speed cost on CPU; null = glibc's moving default
    mmap_threshold_mib: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _known_launcher(self) -> ComputeParams:
        # a program and its options, nothing a shell would read as another command
        if not re.fullmatch(r"(python3?|torchrun)( [A-Za-z0-9_=.:/-]+)*", self.launcher):
            raise ValueError(f"launcher: expected 'python' or 'torchrun' and its options, got {self.launcher!r}")
        return self


class TrackingParams(_Group):
    experiment: str = Field("wsss", min_length=1)


class Params(_Group):
    """The whole ``params.yaml``."""

    seed: int = Field(ge=0)
    tracking: TrackingParams = TrackingParams()
    compute: ComputeParams = ComputeParams()
    data: DataParams
    classifier: ClassifierParams
    cams: CamParams = CamParams()
    crf: CrfParams = CrfParams()
    irnet: IrnetParams = IrnetParams()
    segmenter: SegmenterParams
    evaluate: EvaluateParams = EvaluateParams()
    sweep: SweepParams | None = None
    person: PersonParams = PersonParams()
    ablation: AblationParams | None = None

    @model_validator(mode="after")
    def _ablation_stride_fits(self) -> Params:
        stride = self.ablation.smp_output_stride if self.ablation is not None else None
        if stride and self.segmenter.image_size % stride:
            raise ValueError(f"ablation.smp_output_stride: {stride} does not divide segmenter.image_size {self.segmenter.image_size}")
        return self

    @model_validator(mode="after")
    def _sweep_space_fits(self) -> Params:
        if self.sweep is None:
            return self
        bounds = {"irnet.threshold": (0.0, 1.0), "irnet.confidence_cutoff": (0.0, 1.0), "irnet.bg_weight": (0.0, math.inf)}
        for key, interval in self.sweep.space.items():
            low, high = bounds[key]
            if not (low < interval.low and interval.high < high):
                raise ValueError(f"sweep.space.{key}: the range must lie inside ({low}, {high}), got {interval.low}..{interval.high}")
        return self


def sweep_space_problems(params: Params) -> list[tuple[str, str]]:
    """Searched keys that have no effect under the current ``irnet.background`` (checked when a
    sweep starts, not by the schema: changing the background must not stop the main pipeline)."""
    space = params.sweep.space if params.sweep else {}
    background = params.irnet.background
    problems = []
    if "irnet.threshold" in space and background != "plane":
        problems.append(("sweep.space.irnet.threshold", ("irnet.background is 'walk', where the threshold has no effect; "
                                                         "search irnet.bg_weight instead")))
    if "irnet.bg_weight" in space and background != "walk":
        problems.append(("sweep.space.irnet.bg_weight", ("irnet.background is 'plane', where bg_weight has no effect; "
                                                         "search irnet.threshold instead")))
    return problems


def _format_location(location: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in location) or "<top level>"


def validate_params(raw: Any, source: str | Path = "params.yaml") -> Params:
    """Validate a parsed YAML document; raise :class:`ConfigError` naming every bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(source, [("<top level>", "expected a mapping of parameter groups")])
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            location = _format_location(item["loc"])
            if item["type"] == "extra_forbidden":
                message = "unknown key"
            elif item["type"] == "missing":
                message = "required key is missing"
            else:
                message = item["msg"].removeprefix("Value error, ")
                field, sep, rest = message.partition(": ")
                if sep and all(part.isidentifier() for part in field.split(".")):
                    # a model-level check names its field first: make it part of the key
                    location = field if location == "<top level>" else f"{location}.{field}"
                    message = rest
                elif "input" in item and not isinstance(item["input"], dict):
                    message += f" (got {item['input']!r})"
            problems.append((location, message))
        raise ConfigError(source, problems) from None


def with_values(params: Params, values: dict[str, Any], source: str | Path = "params") -> Params:
    """``params`` with each ``group.key`` of ``values`` put in, checked by the schema like a params file:
    an unknown key or a bad value raises :class:`ConfigError` naming it (``source`` says whose values)."""
    document = params.model_dump()
    for name, value in values.items():
        group, _, key = name.partition(".")
        if not key or "." in key or not isinstance(document.get(group), dict) or key not in document[group]:
            raise ConfigError(source, [(name, "not a group.key of params.yaml")])
        document[group][key] = value
    return validate_params(document, source)


DVC_PIPELINES = ("dvc.yaml", "pipelines/ablation/dvc.yaml", "pipelines/sweep/dvc.yaml")
_ABSENT = object()


# Keys that change how fast a stage runs, not what it computes: no stage lists them as a DVC param (nor
# a group holding them), so changing one re-runs nothing (tests/test_dvc_deps.py). ``compute`` holds
# only such keys but ``device``, ``precision`` and ``batchnorm`` (listed one by one by the stages they
# change) and ``launcher``, part of the parallel stages' command (a new command re-runs the stage).
SPEED_KNOBS = ("classifier.workers", "classifier.threads", "cams.batch_size", "crf.workers", "irnet.workers",
               "irnet.threads", "segmenter.workers", "segmenter.threads", "compute.workers",
               "compute.eval_batch_size", "compute.chunk_size", "compute.shard_size", "compute.mmap_threshold_mib")


def dvc_param_keys(root: str | Path) -> dict[str, set[str]]:
    """The dotted params.yaml keys each pipeline under ``root`` reads: its stages' ``params:`` entries
    and the ``${...}`` variables of its commands and paths (``item.*`` of ``matrix:`` aside)."""
    keys: dict[str, set[str]] = {}
    for pipeline in DVC_PIPELINES:
        path = Path(root) / pipeline
        if not path.is_file():
            continue
        text = path.read_text()
        found = set()
        for stage in (yaml.safe_load(text) or {}).get("stages", {}).values():
            for entry in stage.get("params") or []:
                if isinstance(entry, str):
                    found.add(entry)
                elif isinstance(entry, dict):  # {file: [keys]}: only params.yaml's keys are this file's
                    found.update(key for file, keys_ in entry.items() if Path(file).name == "params.yaml" for key in keys_ or [])
        found.update(name for name in re.findall(r"\$\{([^}]+)\}", text) if not name.startswith("item."))
        keys[pipeline] = found
    return keys


def lookup(document: Any, dotted: str) -> Any:
    """The value at a dotted key of a parsed YAML document, or ``_ABSENT``."""
    node = document
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def missing_dvc_params(document: Any, root: str | Path) -> list[tuple[str, str]]:
    """Keys the ``dvc.yaml`` files under ``root`` read that ``document`` lacks (the schema fills defaults,
    DVC does not: `dvc repro` would stop with "Parameters ... are missing")."""
    problems = {}
    for pipeline, keys in dvc_param_keys(root).items():
        for key in sorted(keys):
            if lookup(document, key) is _ABSENT:
                problems.setdefault(key, []).append(pipeline)
    return [(key, f"missing, and {', '.join(pipelines)} reads it (write it out, e.g. as in params.yaml)")
            for key, pipelines in problems.items()]


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a parameters file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(path, [("<file>", "parameters file not found")]) from None
    except yaml.YAMLError as error:
        raise ConfigError(path, [("<file>", f"not valid YAML: {error}")]) from None
    return validate_params(raw, path)


def flatten(params: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested groups into dotted keys (``data.balance.rule``) for MLflow."""
    mapping = params.model_dump() if isinstance(params, BaseModel) else params
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat
