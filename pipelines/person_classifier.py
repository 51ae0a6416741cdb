"""DVC stage `person_classifier` (see dvc.yaml): a thin entry into `wsss person-classifier`."""

import sys

from wsss.cli import main

if __name__ == "__main__":
    sys.exit(main(["person-classifier", *sys.argv[1:]]))
