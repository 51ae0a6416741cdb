"""DVC stage `train_segmenter` (see dvc.yaml): a thin entry into `wsss train-segmenter`."""

import sys

from wsss.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-segmenter", *sys.argv[1:]]))
