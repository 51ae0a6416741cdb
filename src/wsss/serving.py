"""The trained segmenter as an MLflow pyfunc model: an RGB image array in, a class-id mask out.

:func:`log_segmenter_model` logs a model file (``models/segmenter/model.pt``,
``models/oracle/model.pt``) to the active MLflow run as a pyfunc model with a signature and an input
example, and registers the final one as ``wsss-segmenter`` with the alias ``newest`` on the new
version. The model is defined from code (``wsss/serving_model.py``), so loading it unpickles nothing;
the network comes back from the model file with ``torch.load(weights_only=True)``. Loading it needs
this package installed (``mlflow models serve --env-manager local`` from the project's environment).

Prediction is :func:`wsss.tta.predict_labels` (and :func:`wsss.crf.crf_labels`), what ``wsss predict``
runs, so both give the same mask. Params: ``tta`` (default true), ``tta_scales`` (default 0.5 1 2,
each with its mirror) and ``crf`` (default false), as ``--no-tta``, ``--tta-scales`` and ``--crf``.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

REGISTERED_NAME = "wsss-segmenter"
ALIAS = "newest"  # MLflow reserves "latest"
WEIGHTS_ARTIFACT = "segmenter"
MODEL_CODE = Path(__file__).with_name("serving_model.py")
DEFAULT_TTA_SCALES = (0.5, 1.0, 2.0)  # wsss predict's default as well (each scale with its mirror)
# what loading the model imports; the versions are this environment's
_REQUIREMENTS = ("torch", "torchvision", "segmentation-models-pytorch", "timm", "numpy", "pydensecrf2", "pydantic",
                 "pillow", "scikit-image", "mlflow")


def signature():
    """Input: one RGB image ``H x W x 3`` uint8; output: its class ids ``H x W`` uint8; params as the CLI's options."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1))]),
        params=ParamSchema([ParamSpec("tta", "boolean", True),
                            ParamSpec("tta_scales", "double", list(DEFAULT_TTA_SCALES), shape=(-1,)),
                            ParamSpec("crf", "boolean", False)]))


def pip_requirements() -> list[str]:
    """The distributions the model needs, pinned to the installed versions (no inference run)."""
    pinned = []
    for name in _REQUIREMENTS:
        try:
            pinned.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            continue
    return pinned


def example_image(image: np.ndarray, side: int = 64) -> np.ndarray:
    """The input example: the top-left ``side x side`` of an RGB image (a small JSON in the model's folder)."""
    return np.ascontiguousarray(image[:side, :side, :3], dtype=np.uint8)


def predict_mask(model, image: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
    """The class-id mask of ``image`` under the signature's ``params`` (missing ones take their defaults)."""
    from wsss.config import CrfParams
    from wsss.crf import crf_labels
    from wsss.tta import predict_labels

    params = params or {}
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected one RGB image, an H x W x 3 uint8 array; got {image.dtype} {image.shape}")
    scales = None
    if params.get("tta", True):
        scales = [float(scale) for scale in params.get("tta_scales", DEFAULT_TTA_SCALES)]
        if not scales or not all(np.isfinite(scale) and scale > 0 for scale in scales):
            raise ValueError(f"tta_scales must be positive numbers, got {scales}")
    labels = predict_labels(model, image, scales)
    if params.get("crf", False):
        labels = crf_labels(image, labels, CrfParams())
    return labels


def _python_model_class():
    import mlflow

    class SegmenterModel(mlflow.pyfunc.PythonModel):
        """DeepLabv3+ from its wsss model file, on CUDA when present."""

        _skip_type_hint_validation = True  # the logged signature validates the input, not type hints on predict

        def load_context(self, context) -> None:
            from wsss.distributed import select_device
            from wsss.models.segmenter import load_segmenter

            self.network, self.spec = load_segmenter(Path(context.artifacts[WEIGHTS_ARTIFACT]))
            self.network.to(select_device("auto"))

        def predict(self, context, model_input, params=None):
            return predict_mask(self.network, model_input, params)

    return SegmenterModel


def segmenter_model():
    """A new pyfunc model object (what ``serving_model.py`` hands to ``mlflow.models.set_model``)."""
    return _python_model_class()()


def log_segmenter_model(model_file: Path, name: str, example: np.ndarray, register: bool = False):
    """Log ``model_file`` to the active run as the pyfunc model ``name``; with ``register``, as a new
    version of ``wsss-segmenter`` that the alias ``newest`` then points to. Returns MLflow's ModelInfo."""
    import mlflow

    info = mlflow.pyfunc.log_model(
        name=name, python_model=str(MODEL_CODE), artifacts={WEIGHTS_ARTIFACT: str(model_file)}, signature=signature(),
        input_example=(example, {"tta": False}), pip_requirements=pip_requirements(),
        registered_model_name=REGISTERED_NAME if register else None)
    if register:
        mlflow.MlflowClient().set_registered_model_alias(REGISTERED_NAME, ALIAS, info.registered_model_version)
    return info
