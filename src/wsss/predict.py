"""``wsss predict``: segment images of any size with a trained segmenter model file.

For every input image it writes ``<out>/<stem>.png`` (palette mask of class ids) and
``<out>/<stem>_overlay.png`` (the mask blended over the image). A file that is not a readable
image is named on stderr with the reason and skipped; the others are still processed. Two inputs
whose outputs would share a name (``a.png`` and ``a.jpg``) use their full file names instead
(``a.png.png``, ``a.jpg.png``); a clash that remains is reported as a failure, never overwritten.
Exit status: 0 when every file was segmented, 1 when any failed (or none was found), 2 for a
bad model file or argument.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from wsss.config import CrfParams
from wsss.errors import DataError, WsssError
from wsss.serving import DEFAULT_TTA_SCALES  # the served model's default too: both give the same masks

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
EXIT_OK, EXIT_SOME_FAILED, EXIT_USER_ERROR = 0, 1, 2
OVERLAY_SUFFIX = "_overlay"


@dataclass
class PredictReport:
    """What a prediction run did: (input, mask file) written, (input, reason) failed."""

    written: list[tuple[Path, Path]] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        return EXIT_OK if self.written and not self.failed else EXIT_SOME_FAILED

    def summary(self, out_dir: Path) -> str:
        return f"wsss predict: {len(self.written)} written, {len(self.failed)} failed -> {out_dir}"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"scales must be positive numbers, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--model``, the inputs, ``--out``, ``--no-tta``, ``--tta-scales``, ``--crf`` and ``--device`` to ``parser``."""
    parser.add_argument("--model", required=True, type=Path,
                        help="segmenter model file (e.g. models/segmenter/model.pt)")
    parser.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE_OR_FOLDER",
                        help="an image file or a folder of images (not recursive)")
    parser.add_argument("--out", required=True, type=Path, help="output folder for <name>.png and <name>_overlay.png")
    tta = parser.add_mutually_exclusive_group()
    tta.add_argument("--no-tta", action="store_true", help="one forward pass per image, no flip or scale averaging")
    tta.add_argument("--tta-scales", nargs="+", type=_positive_float, default=list(DEFAULT_TTA_SCALES), metavar="SCALE",
                     help="test-time scales, each with its mirror (default: 0.5 1 2)")
    parser.add_argument("--crf", action="store_true",
                        help="refine each prediction with the dense CRF on its image (the crf group's defaults, "
                             "as under evaluate.crf)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto (default): CUDA when present, else the CPU")
    return parser


def collect_inputs(paths: list[Path]) -> list[Path]:
    """Files to segment: each file as given, each folder's regular files (sorted, not recursive)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted((entry for entry in path.iterdir() if entry.is_file()), key=lambda p: p.name))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(path, "input not found (expected an image file or a folder)")
    return files


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _outputs(name: str) -> tuple[str, str]:
    return f"{name}.png", f"{name}{OVERLAY_SUFFIX}.png"


def output_names(files: list[Path]) -> list[str | None]:
    """Output base name of each image file: its stem, or its full name where stems would clash (a.png, a.jpg).

    None for a file whose outputs would still replace those of an earlier file (compared case-insensitively)."""
    def keys(name: str) -> list[str]:
        return [output.casefold() for output in _outputs(name)]

    names = [file.stem for file in files]
    owners = Counter(key for name in names for key in keys(name))
    names = [file.name if any(owners[key] > 1 for key in keys(name)) else name
             for file, name in zip(files, names, strict=True)]
    used: set[str] = set()
    unique: list[str | None] = []
    for name in names:
        if used.isdisjoint(keys(name)):
            used.update(keys(name))
            unique.append(name)
        else:
            unique.append(None)
    return unique


def run_predict(model_path: Path, inputs: list[Path], out_dir: Path, tta_scales: list[float] | None,
                device: str = "auto", crf: CrfParams | None = None) -> PredictReport:
    """Segment ``inputs`` (files) into ``out_dir`` on ``device`` (auto | cpu | cuda), each
    prediction refined by the dense CRF when ``crf`` is given; unreadable files are reported, not fatal."""
    import torch

    from wsss.crf import crf_labels
    from wsss.distributed import select_device
    from wsss.errors import ConfigError
    from wsss.io import read_image, write_image_png, write_mask_png
    from wsss.models.segmenter import load_segmenter
    from wsss.tta import predict_labels
    from wsss.visualize import overlay

    model, _ = load_segmenter(Path(model_path))
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("command line", [("--device", "cuda is requested but torch sees no CUDA device")])
    model.to(select_device(device))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = PredictReport()
    names = iter(output_names([file for file in inputs if is_image_name(file)]))
    input_files = {file.resolve() for file in inputs}

    def fail(file: Path, reason: str) -> None:
        report.failed.append((file, reason))
        tqdm.write(f"skipped {file}: {reason}", file=sys.stderr)

    for file in tqdm(inputs, desc="predict", unit="image"):
        if not is_image_name(file):
            fail(file, f"not an image (extension {file.suffix or 'none'!r})")
            continue
        name = next(names)
        if name is None:
            fail(file, "its output names are those of an earlier input")
            continue
        mask_path, overlay_path = (out_dir / output for output in _outputs(name))
        if {mask_path.resolve(), overlay_path.resolve()} & input_files:
            fail(file, f"its output {mask_path} would overwrite an input")
            continue
        try:
            image = read_image(file)
        except DataError as error:
            fail(file, f"not a readable image ({str(error).removeprefix(f'{file}: ')})")
            continue
        labels = predict_labels(model, image, tta_scales)
        if crf is not None:
            labels = crf_labels(image, labels, crf)
        write_mask_png(mask_path, labels)
        write_image_png(overlay_path, overlay(image, labels))
        report.written.append((file, mask_path))
    return report


def main_from_args(args: argparse.Namespace) -> int:
    """Run ``wsss predict`` from parsed arguments; returns the exit status."""
    try:
        files = collect_inputs(list(args.inputs))
        report = run_predict(args.model, files, args.out, None if args.no_tta else list(args.tta_scales), args.device,
                             CrfParams() if args.crf else None)
    except WsssError as error:
        print(f"wsss predict: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    if not files:
        print("wsss predict: no files found in " + ", ".join(str(p) for p in args.inputs), file=sys.stderr)
    print(report.summary(args.out))
    return report.exit_status
