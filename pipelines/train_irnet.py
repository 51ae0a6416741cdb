"""DVC stage `train_irnet` (see dvc.yaml): a thin entry into `wsss train-irnet`."""

import sys

from wsss.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-irnet", *sys.argv[1:]]))
