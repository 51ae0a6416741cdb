"""DVC stage `ablation_cell` (pipelines/ablation/dvc.yaml): a thin entry into `wsss ablation-cell`."""

import sys

from wsss.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablation-cell", *sys.argv[1:]]))
