"""DVC stage `prepare` (see dvc.yaml): a thin entry into `wsss prepare`."""

import sys

from wsss.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
