"""DVC stage `ablation_masks` (pipelines/ablation/dvc.yaml): a thin entry into `wsss ablation-masks`."""

import sys

from wsss.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablation-masks", *sys.argv[1:]]))
