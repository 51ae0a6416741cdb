"""DVC stage `report` (see dvc.yaml): a thin entry into `wsss report`."""

import sys

from wsss.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
