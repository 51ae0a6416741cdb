"""``wsss``: the command line. DVC stages call it through ``pipelines/<stage>.py``.

Errors in the user's data or parameters print one line per problem on stderr and exit with
status 2; the stage's outputs are then absent (they are written atomically at the end).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wsss.errors import WsssError

EXIT_USER_ERROR = 2
# the stages that share their work among torchrun's processes (dvc.yaml starts them with compute.launcher)
PARALLEL_STAGES = ("train-classifier", "cams", "ir-labels", "train-irnet", "pseudo-masks", "train-segmenter", "oracle")


def _stage_parser(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text)
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    parser.add_argument("--root", default=None, help="project root (default: the folder holding dvc.yaml)")
    return parser


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered not in {"true", "false", "yes", "no"}:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return lowered in {"true", "yes"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsss", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _stage_parser(subparsers, "prepare", "materialise the dataset into data/prepared")
    _stage_parser(subparsers, "split", "drop person labels, balance, split train/val/test")
    _stage_parser(subparsers, "train-classifier", "step 1: train the multi-label classifier")
    _stage_parser(subparsers, "cams", "step 1: multi-scale CAMs of train and val, CAM and CAM+CRF mIoU on val")
    _stage_parser(subparsers, "ir-labels", "step 2: IR labels (fg/bg/unsure) of the confident training images")
    _stage_parser(subparsers, "train-irnet", "step 2: train IRNet (boundary and displacement) on the IR labels")
    _stage_parser(subparsers, "pseudo-masks", "step 2: random walk on IRNet's affinities -> pseudo masks, val mIoU")
    _stage_parser(subparsers, "train-segmenter", "step 3: train DeepLabv3+ on the pseudo masks")
    _stage_parser(subparsers, "oracle", "step 3: the same segmenter on the true training masks (upper bound)")
    _stage_parser(subparsers, "evaluate", "step 3: val and test scores with and without TTA, pictures")
    _stage_parser(subparsers, "report", "reports/summary.md and the MLflow pipeline run")
    _stage_parser(subparsers, "check-params", "validate a parameters file and exit")
    sweep = _stage_parser(subparsers, "sweep", "Optuna search of the sweep group's space; every trial in MLflow")
    sweep.add_argument("--resume", action="store_true",
                       help="continue the study of these inputs (trials a killed run left running are run again)")
    sweep.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    _stage_parser(subparsers, "person-classifier", "binary person classifier on the noisy person labels, its CAMs (merged by pseudo-masks)")
    masks = _stage_parser(subparsers, "ablation-masks", "ablation: pseudo masks with IRNet's background knob set to a threshold")
    masks.add_argument("--threshold", type=float, required=True)
    masks.add_argument("--out", type=Path, required=True, help="masks folder (relative to the root)")
    masks.add_argument("--metrics", type=Path, required=True, help="metrics JSON (relative to the root)")
    person = _stage_parser(subparsers, "person-masks", "ablation: merge the person CAMs into a folder of pseudo masks")
    person.add_argument("--masks", type=Path, required=True, help="pseudo masks without the person (relative to the root)")
    person.add_argument("--out", type=Path, required=True)
    person.add_argument("--metrics", type=Path, required=True)
    cell = _stage_parser(subparsers, "ablation-cell", "ablation: one segmenter of the grid, scored on val with and without TTA")
    cell.add_argument("--encoder", required=True)
    cell.add_argument("--threshold", type=float, required=True)
    cell.add_argument("--person", type=_boolean, required=True, help="true | false")
    cell.add_argument("--masks", type=Path, required=True)
    cell.add_argument("--model", type=Path, required=True)
    cell.add_argument("--metrics", type=Path, required=True)
    _stage_parser(subparsers, "ablation-report", "ablation: reports/ablation.md from the grid's MLflow runs")
    from wsss import predict

    predict.add_arguments(subparsers.add_parser("predict", help="segment images with a trained model (palette masks + overlays)"))
    vendor = subparsers.add_parser("vendor-fashion-mnist", help="rebuild the committed Fashion-MNIST subset")
    vendor.add_argument("--from", dest="source", default="/usr/share/datasets/fashion-mnist", help="folder with the four *-ubyte.gz files")
    vendor.add_argument("--out", default="data/sources/fashion-mnist", help="output folder")
    vendor.add_argument("--train-per-class", type=int, default=400)
    vendor.add_argument("--test-per-class", type=int, default=150)
    return parser


def _run(args: argparse.Namespace) -> None:
    from wsss.config import load_params
    from wsss.tracking import project_root

    if args.command == "vendor-fashion-mnist":
        from wsss.data.fashion_mnist import SUBSET_FILE, build_subset, write_subset

        arrays = build_subset(Path(args.source), {"train": args.train_per_class, "test": args.test_per_class})
        write_subset(arrays, Path(args.out) / SUBSET_FILE)
        print(f"wrote {Path(args.out) / SUBSET_FILE}")
        return

    root = Path(args.root).resolve() if args.root else project_root()
    params_path = Path(args.params) if Path(args.params).is_absolute() else root / args.params
    params = load_params(params_path)
    if params.compute.mmap_threshold_mib is not None:  # before any image is decoded
        from wsss.heap import fix_mmap_threshold

        fix_mmap_threshold(params.compute.mmap_threshold_mib << 20)
    if args.command == "check-params":
        import yaml

        from wsss import preflight
        from wsss.config import missing_dvc_params
        from wsss.errors import ConfigError

        problems = missing_dvc_params(yaml.safe_load(Path(params_path).read_text()), root) + preflight.problems(params, root)
        if problems:
            raise ConfigError(params_path, problems)
        print(f"{params_path}: valid, and holds every key the dvc.yaml files read")
        return
    _refuse_at_start(args.command, params, root, params_path)

    if args.command == "sweep":
        from wsss.stages.sweep import run_sweep

        best = run_sweep(params, root, resume=args.resume, workers=args.workers, params_path=params_path)
        print(f"best of {best['trials_complete']} complete trials ({best['trials_pruned']} pruned): "
              f"{best['values']} -> val mIoU {best['objective']:.4f}\nto use them: {best['apply']}")
        return

    from wsss import distributed
    from wsss.errors import ConfigError
    from wsss.stages import ABLATION_STAGES, STAGES

    context = distributed.init(params.compute)  # joins torchrun's process group when started by it
    try:
        if context.distributed and args.command not in PARALLEL_STAGES:
            raise ConfigError(params_path, [("compute.launcher", f"{args.command} runs as one process: start it with python")])
        distributed.check_batch_sizes({"classifier.batch_size": params.classifier.batch_size, "irnet.batch_size": params.irnet.batch_size,
                                       "segmenter.batch_size": params.segmenter.batch_size}, context)
        if args.command in ABLATION_STAGES:
            ABLATION_STAGES[args.command](params, root, args)
            return
        STAGES[args.command](params, root)
    finally:
        distributed.shutdown()


def _refuse_at_start(command: str, params, root: Path, params_path: Path) -> None:
    """The first stage of a pipeline refuses every setting that one of its later stages would refuse;
    ``prepare`` also prints (without refusing) what the sweep's and the ablation's first stages will refuse."""
    from wsss import preflight
    from wsss.errors import ConfigError

    pipeline = preflight.FIRST_STAGES.get(command)
    if pipeline is None:
        return
    problems = preflight.problems(params, root, (pipeline,))
    if problems:
        raise ConfigError(params_path, problems)
    if pipeline == preflight.MAIN:
        for key, message in preflight.problems(params, root, (preflight.SWEEP, preflight.ABLATION)):
            print(f"wsss {command}: warning: {params_path}: {key}: {message} (the main pipeline does not read it; "
                  "the sweep or ablation pipeline will refuse it)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "predict":
        from wsss import predict

        return predict.main_from_args(args)
    try:
        _run(args)
    except WsssError as error:
        print(f"wsss {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
