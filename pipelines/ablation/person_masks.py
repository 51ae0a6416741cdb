"""DVC stage `person_masks` (pipelines/ablation/dvc.yaml): a thin entry into `wsss person-masks`."""

import sys

from wsss.cli import main

if __name__ == "__main__":
    sys.exit(main(["person-masks", *sys.argv[1:]]))
