"""DVC stage `oracle` (see dvc.yaml): a thin entry into `wsss oracle`."""

import sys

from wsss.cli import main

if __name__ == "__main__":
    sys.exit(main(["oracle", *sys.argv[1:]]))
