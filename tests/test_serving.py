"""The segmenter as an MLflow pyfunc model (wsss.serving): signature, params, registry alias."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from wsss import serving
from wsss.config import CrfParams
from wsss.crf import crf_labels
from wsss.models.segmenter import SegmenterSpec, build_segmenter, save_segmenter
from wsss.tta import predict_labels


@pytest.fixture
def model_file(tmp_path):
    spec = SegmenterSpec("classifier", 3, 8, 16, ("background", "a", "b"), classifier_arch="small_cnn", classifier_extra_convs=1)
    path = tmp_path / "model.pt"
    save_segmenter(path, build_segmenter(spec), spec)
    return path


def _image(height: int = 40, width: int = 52, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


def test_registered_model_predicts_with_the_cli_params_and_rejects_other_inputs(model_file, mlflow_store):
    with mlflow.start_run():
        info = serving.log_segmenter_model(model_file, "segmenter", serving.example_image(_image(80, 90)), register=True)
    assert info.registered_model_version == 1
    loaded = mlflow.pyfunc.load_model(f"models:/{serving.REGISTERED_NAME}@{serving.ALIAS}")
    network = loaded.unwrap_python_model().network
    image = _image()
    assert np.array_equal(loaded.predict(image), predict_labels(network, image, list(serving.DEFAULT_TTA_SCALES)))
    assert np.array_equal(loaded.predict(image, params={"tta": False}), predict_labels(network, image, None))
    assert np.array_equal(loaded.predict(image, params={"tta_scales": [1.0]}), predict_labels(network, image, [1.0]))
    plain = predict_labels(network, image, None)
    assert np.array_equal(loaded.predict(image, params={"tta": False, "crf": True}), crf_labels(image, plain, CrfParams()))
    assert loaded.predict(image).shape == image.shape[:2]
    for bad in (image[..., 0], image.astype(np.float32), image[..., :2]):  # grey, float, two channels
        with pytest.raises(mlflow.exceptions.MlflowException, match="schema"):
            loaded.predict(bad)
    with pytest.raises(ValueError, match="tta_scales must be positive"):
        loaded.predict(image, params={"tta_scales": [0.0]})
    folder = mlflow.artifacts.download_artifacts(info.model_uri)
    example = mlflow.models.Model.load(folder).load_input_example(folder)
    assert np.asarray(example).shape == (64, 64, 3)  # the top-left corner of the example image


def test_the_alias_moves_to_the_newest_version_and_unregistered_models_stay_out_of_the_registry(model_file, mlflow_store):
    client = mlflow.MlflowClient()
    for register in (True, False, True):
        with mlflow.start_run() as run:
            serving.log_segmenter_model(model_file, "segmenter" if register else "upper_bound", serving.example_image(_image()),
                                        register=register)
    versions = client.search_model_versions(f"name = '{serving.REGISTERED_NAME}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    newest = client.get_model_version_by_alias(serving.REGISTERED_NAME, serving.ALIAS)
    assert int(newest.version) == 2 and newest.run_id == run.info.run_id


def test_pinned_requirements_are_this_environments():
    pinned = dict(line.split("==") for line in serving.pip_requirements())
    assert pinned["torch"] == __import__("torch").__version__.split("+")[0]
    assert {"segmentation-models-pytorch", "numpy", "mlflow"} <= pinned.keys()
