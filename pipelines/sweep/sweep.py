"""DVC stage `sweep` (pipelines/sweep/dvc.yaml): a thin entry into `wsss sweep --resume`."""

import sys

from wsss.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", "--resume", *sys.argv[1:]]))
