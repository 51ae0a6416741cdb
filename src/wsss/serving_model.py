"""MLflow's models-from-code entry of the segmenter (:mod:`wsss.serving`): MLflow stores this file with
the model and runs it to load it, so no pickled object is read."""

import mlflow

from wsss.serving import segmenter_model

mlflow.models.set_model(segmenter_model())
