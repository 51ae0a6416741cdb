"""DVC stage `split` (see dvc.yaml): a thin entry into `wsss split`."""

import sys

from wsss.cli import main

if __name__ == "__main__":
    sys.exit(main(["split", *sys.argv[1:]]))
