"""Where the stages read and write, relative to the project root (the names ``dvc.yaml`` uses too).

The paths that one stage writes and another reads live here, so that a stage module imports
another stage's *paths* without importing its *code*: a stage's code dependencies in ``dvc.yaml``
are then what it runs (``tests/test_dvc_deps.py`` checks them against its imports).
"""

from __future__ import annotations

from pathlib import Path

PREPARED_DIR = Path("data/prepared")
SPLITS_DIR = Path("data/splits")
CLASSIFIER_PATH = Path("models/classifier/model.pt")
CAMS_DIR = Path("cams")
INDEX_FILE = "index.json"  # the index of a folder of per-image outputs (cams, ir_labels, person CAMs)
CAMS_METRICS = Path("metrics/cams.json")
IR_LABELS_DIR = Path("ir_labels")
IRNET_PATH = Path("models/irnet/model.pt")
PSEUDO_DIR = Path("pseudo_masks")
PREDICTED = "val_predicted"  # val with the classifier's predicted labels: its folder in cams/ and pseudo_masks/
PERSON_MODEL = Path("models/person_classifier/model.pt")
PERSON_CAMS = Path("cams_person")
PERSON_METRICS = Path("metrics/person_classifier.json")
SEGMENTER_PATH = Path("models/segmenter/model.pt")
ORACLE_PATH = Path("models/oracle/model.pt")
SEGMENTER_METRICS = Path("metrics/segmenter.json")
ORACLE_METRICS = Path("metrics/oracle.json")
EVALUATE_METRICS = Path("metrics/evaluate.json")
