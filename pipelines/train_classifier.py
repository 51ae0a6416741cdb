"""DVC stage `train_classifier` (see dvc.yaml): a thin entry into `wsss train-classifier`."""

import sys

from wsss.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-classifier", *sys.argv[1:]]))
