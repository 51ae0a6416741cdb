"""DVC stage `pseudo_masks` (see dvc.yaml): a thin entry into `wsss pseudo-masks`."""

import sys

from wsss.cli import main

if __name__ == "__main__":
    sys.exit(main(["pseudo-masks", *sys.argv[1:]]))
