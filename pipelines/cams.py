"""DVC stage `cams` (see dvc.yaml): a thin entry into `wsss cams`."""

import sys

from wsss.cli import main

if __name__ == "__main__":
    sys.exit(main(["cams", *sys.argv[1:]]))
