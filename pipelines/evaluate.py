"""DVC stage `evaluate` (see dvc.yaml): a thin entry into `wsss evaluate`."""

import sys

from wsss.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
