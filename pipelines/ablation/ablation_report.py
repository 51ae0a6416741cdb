"""DVC stage `ablation_report` (pipelines/ablation/dvc.yaml): a thin entry into `wsss ablation-report`."""

import sys

from wsss.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablation-report", *sys.argv[1:]]))
