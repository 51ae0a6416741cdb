"""DVC stage `ir_labels` (see dvc.yaml): a thin entry into `wsss ir-labels`."""

import sys

from wsss.cli import main

if __name__ == "__main__":
    sys.exit(main(["ir-labels", *sys.argv[1:]]))
