"""The default pipeline under whole-pipeline seeds: Table 2 (predicted labels), the share of the upper
bound and the person merge's gain, per seed and as mean +/- standard deviation.

``seed`` drives every training step (classifier, person classifier, IRNet, segmenter, upper bound);
``data.seed`` fixes the dataset, so the seeds share ``prepare`` and ``split``. Each seed runs
``dvc repro`` in a scratch clone of this repository's committed ``HEAD`` (this checkout's virtual
environment, the clone's ``src`` first on ``PYTHONPATH``, its own MLflow store); the clones after the
first take ``data/prepared`` and ``data/splits`` from the first and record them with ``dvc commit``
instead of re-running the two stages. A seed whose clone holds a result of ``HEAD`` is not run again, so a
killed benchmark continues where it stopped; after a new commit the clones move to it with their outputs
and ``dvc repro`` re-runs only the stages it changed (the earlier results stay, ``--commit`` shows them). ``--workspace`` counts this checkout's own run as the seed
of its ``params.yaml`` (when ``dvc status`` finds it up to date at ``HEAD``). The text also goes to
``reports/seeds.md`` (linked by the run report) unless ``--set`` changes the default; ``--out`` names another file.

    python benchmarks/seeds.py [--seeds 2020 2021 2022] [--set compute.precision=fp32] [--work DIR] [--workspace]
    python benchmarks/seeds.py --table-only --work DIR [--commit abc1234]     # the table of the seeds already run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from wsss.stages.report import SEEDS_REPORT

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from paper_project import set_dotted  # noqa: E402  (the tests' helper: one copy)
SHARED_STAGES = ("prepare", "split")
SHARED_OUTPUTS = ("data/prepared", "data/splits")
RESULT = "seed-result.json"

# (key, column title, format); the first block is the table, the second the diagnostics.
COLUMNS = (
    ("val_cam_crf", "val CAM + CRF", "pct"),
    ("val_pseudo_masks", "val pseudo masks", "pct"),
    ("val_segmentation_tta", "val seg. + TTA", "pct"),
    ("ordering", "ordering", "bool"),
    ("test_tta_crf", "test TTA + CRF", "pct"),
    ("upper_tta_crf", "upper bound TTA + CRF", "pct"),
    ("share_tta_crf", "share (TTA + CRF)", "pct"),
    ("share_tta", "share (TTA)", "pct"),
    ("merge_gain_predicted", "merge gain, predicted", "pts"),
    ("merge_gain_image_labels", "merge gain, image labels", "pts"),
)
DIAGNOSTICS = (
    ("classifier_macro_f1", "classifier macro-F1", "pct"),
    ("person_best_epoch", "person: epoch of the best F1 at 0.5", "int"),
    ("person_f1", "person F1 (val)", "pct"),
    ("irnet_images", "IRNet images", "int"),
    ("val_pseudo_masks_image_labels", "val pseudo masks, image labels", "pct"),
    ("val_before_merge_image_labels", "... before the merge", "pct"),
    ("segmenter_best_epoch", "segmenter best epoch", "int"),
    ("minutes", "minutes (the stages this call re-ran)", "float"),
)


def seed_row(metrics: dict[str, dict]) -> dict[str, float]:
    """One seed's numbers from its stage metrics (``{stage: metrics JSON}``, as ``metrics/*.json`` hold them)."""
    summary, evaluate, oracle, masks = metrics["summary"], metrics["evaluate"], metrics["oracle"], metrics["pseudo_masks"]
    predicted, labelled = masks["val_predicted"], masks["val"]
    return {
        "val_cam_crf": summary["val_cam_crf_miou"],
        "val_pseudo_masks": summary["val_pseudo_masks_miou"],
        "val_segmentation_tta": summary["val_segmentation_tta_miou"],
        "ordering": bool(summary["table2_ordering_holds"]),
        "test_tta_crf": evaluate["test"]["tta_crf"]["miou"],
        "upper_tta_crf": oracle["test"]["tta_crf"]["miou"],
        "share_tta_crf": evaluate["test"]["tta_crf"]["miou"] / oracle["test"]["tta_crf"]["miou"],
        "share_tta": evaluate["test"]["tta"]["miou"] / oracle["test"]["tta"]["miou"],
        "merge_gain_predicted": predicted["miou"] - predicted["before_person_merge_miou"],
        "merge_gain_image_labels": labelled["miou"] - labelled["before_person_merge_miou"],
        "classifier_macro_f1": metrics["classifier"]["val_macro_f1"],
        "person_best_epoch": metrics["person_classifier"]["best_epoch"],
        "person_f1": metrics["person_classifier"]["val"]["f1"],
        "irnet_images": metrics["irnet"]["images"],
        "val_pseudo_masks_image_labels": labelled["miou"],
        "val_before_merge_image_labels": labelled["before_person_merge_miou"],
        "segmenter_best_epoch": metrics["segmenter"]["best_epoch"],
    }


def aggregate(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, sample standard deviation (0 for one seed), minimum and maximum of every numeric column."""
    out = {}
    for key in rows[0]:
        values = [float(row[key]) for row in rows]
        out[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "min": min(values), "max": max(values)}
    return out


def targets(rows: list[dict[str, float]], share_mean: float = 0.85, share_floor: float = 0.80) -> dict[str, bool]:
    """The issue's targets: the ordering in every seed, the TTA + CRF share's mean and its worst seed."""
    shares = [row["share_tta_crf"] for row in rows]
    return {"ordering in every seed": all(row["ordering"] for row in rows),
            f"mean share >= {share_mean:.0%}": statistics.fmean(shares) >= share_mean,
            f"no seed below {share_floor:.0%}": min(shares) >= share_floor}


def _cell(value: float, kind: str) -> str:
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "pts":
        return f"{100 * value:+.1f}"
    if kind == "bool":
        return "yes" if value else "NO"
    if kind == "int":
        return f"{value:.0f}"
    return f"{value:.1f}"


def _spread(stats: dict[str, float], kind: str) -> str:
    if kind == "bool":
        return f"{stats['mean']:.0%} of seeds"
    scale = 100 if kind in ("pct", "pts") else 1
    return f"{scale * stats['mean']:.1f} +/- {scale * stats['std']:.1f}"


def markdown(seeds: list[int], rows: list[dict[str, float]], columns=COLUMNS) -> str:
    """A table with one column per seed, then mean +/- std and the worst seed (mIoU in %, gains in points)."""
    head = "| " + " | ".join(["", *(f"seed {s}" for s in seeds), "mean +/- std", "min"]) + " |"
    lines = [head, "|---" + "|---:" * (len(seeds) + 2) + "|"]
    stats = aggregate(rows)
    for key, title, kind in columns:
        cells = [_cell(row[key], kind) for row in rows]
        worst = "" if kind == "bool" else _cell(stats[key]["min"], kind)
        lines.append(f"| {title} | " + " | ".join([*cells, _spread(stats[key], kind), worst]) + " |")
    return "\n".join(lines)


def read_project_metrics(project: Path) -> dict[str, dict]:
    names = ("summary", "evaluate", "oracle", "pseudo_masks", "classifier", "person_classifier", "irnet", "segmenter")
    return {name: json.loads((project / "metrics" / f"{name}.json").read_text()) for name in names}


def set_params(params_file: Path, overrides: dict[str, object]) -> dict:
    document = yaml.safe_load(params_file.read_text())
    for dotted, value in overrides.items():
        set_dotted(document, dotted, value)
    params_file.write_text(yaml.safe_dump(document, sort_keys=False))
    return document


def _environment(clone: Path) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(clone / "src"), "MLFLOW_TRACKING_URI": f"sqlite:///{clone / 'mlruns' / 'mlflow.db'}"}
    env.pop("CI", None)
    return env


def _resolved_precision(clone: Path, env: dict[str, str]) -> str:
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(search_all_experiments=True, order_by=["attributes.start_time DESC"])
    tagged = runs["tags.wsss.precision"].dropna() if "tags.wsss.precision" in runs else []
    return str(tagged.iloc[0]) if len(tagged) else "unknown"


def run_seed(seed: int, work: Path, overrides: dict[str, object], shared_from: Path | None, log) -> dict:
    """``dvc repro`` of ``HEAD`` with ``seed`` in ``work/seed-N`` (resumed: a killed repro re-runs from its
    checkpoints); returns and stores the seed's result."""
    clone = work / f"seed-{seed}"
    if not (clone / ".git").exists():
        shutil.rmtree(clone, ignore_errors=True)
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    elif _head(clone) != _head(REPO):
        update_clone(clone)
    set_params(clone / "params.yaml", {**overrides, "seed": seed})
    env = _environment(clone)
    if shared_from is not None and not (clone / SHARED_OUTPUTS[-1]).exists():
        for path in SHARED_OUTPUTS:
            shutil.copytree(shared_from / path, clone / path)
        subprocess.run(["dvc", "commit", "--force", "--quiet", *SHARED_STAGES], cwd=clone, env=env, check=True)
    log(f"seed {seed}: dvc repro in {clone}")
    start = time.perf_counter()
    with open(clone / "repro.log", "a") as out:
        subprocess.run(["dvc", "repro"], cwd=clone, env=env, check=True, stdout=out, stderr=subprocess.STDOUT)
    row = seed_row(read_project_metrics(clone))
    row["minutes"] = (time.perf_counter() - start) / 60
    result = {"seed": seed, "commit": _head(clone), "overrides": overrides, "precision": _resolved_precision(clone, env), "row": row}
    (clone / RESULT).write_text(json.dumps(result, indent=2))
    return result


def update_clone(clone: Path) -> None:
    """Move a seed's clone to this repository's ``HEAD``, keeping its outputs and its ``dvc.lock``: the next
    ``dvc repro`` re-runs only the stages the new commit changed. Its result so far is kept under its commit."""
    result = clone / RESULT
    if result.exists():
        result.rename(clone / f"seed-result-{json.loads(result.read_text())['commit']}.json")
    # the run changed tracked files (dvc.lock, the uncached metrics, plots and report): kept, except params.yaml
    changed = subprocess.run(["git", "diff", "--name-only", "-z"], cwd=clone, capture_output=True, check=True).stdout.decode()
    kept = {name: (clone / name).read_bytes() for name in filter(None, changed.split("\0"))
            if name != "params.yaml" and (clone / name).is_file()}
    subprocess.run(["git", "checkout", "--quiet", "--", "."], cwd=clone, check=True)
    subprocess.run(["git", "pull", "--quiet", "--ff-only", str(REPO), "HEAD"], cwd=clone, check=True)
    for name, content in kept.items():
        (clone / name).write_bytes(content)


def workspace_result(overrides: dict[str, object]) -> dict:
    """This checkout's own run as one seed: only when it is committed, unmodified and up to date."""
    if overrides:
        raise SystemExit("--workspace: the workspace runs its own params.yaml; give no --set")
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True).stdout
    status = subprocess.run(["dvc", "status", "--quiet"], cwd=REPO, env=_environment(REPO))
    if dirty.strip() or status.returncode != 0:
        raise SystemExit("--workspace: the checkout has uncommitted changes or `dvc status` finds stale stages; run `dvc repro` and commit first")
    seed = yaml.safe_load((REPO / "params.yaml").read_text())["seed"]
    row = seed_row(read_project_metrics(REPO))
    row["minutes"] = float("nan")
    return {"seed": seed, "commit": _head(REPO), "overrides": {}, "precision": _resolved_precision(REPO, _environment(REPO)), "row": row}


def _head(project: Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()


def _parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected KEY=VALUE")
    if key == "seed":
        raise argparse.ArgumentTypeError("--set seed: the benchmark sets it (--seeds)")
    return key, yaml.safe_load(value)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[2020, 2021, 2022])
    parser.add_argument("--set", dest="overrides", type=_parse_override, action="append", default=[], metavar="KEY=VALUE",
                        help="a params.yaml key for every seed, e.g. compute.precision=fp32, or data.* for another dataset "
                             "(shared by the seeds; give it its own --work)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/wsss-seeds"), help="scratch clones, one per seed (kept: a re-run resumes)")
    parser.add_argument("--workspace", action="store_true", help="count this checkout's own up-to-date run as its seed")
    parser.add_argument("--table-only", action="store_true", help="print the table of the seeds that have a result; run nothing")
    parser.add_argument("--commit", default=None, help="--table-only: the results of this (short) commit, kept when a clone moved on")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"also write the text to this markdown file (default: {SEEDS_REPORT}, which the run report links, "
                             "when no --set changes the default)")
    args = parser.parse_args()
    overrides = dict(args.overrides)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731

    results = [workspace_result(overrides)] if args.workspace else []
    shared_from = REPO if args.workspace else None
    for seed in args.seeds:
        stored = work / f"seed-{seed}" / (RESULT if args.commit is None else f"seed-result-{args.commit}.json")
        if args.commit is not None and not stored.exists():
            stored = work / f"seed-{seed}" / RESULT
        if any(r["seed"] == seed for r in results):
            continue
        if stored.exists() and (args.table_only or json.loads(stored.read_text())["commit"] == _head(REPO)):
            result = json.loads(stored.read_text())
            if args.commit is not None and result["commit"] != args.commit:
                continue
        elif args.table_only:
            continue
        else:
            result = run_seed(seed, work, overrides, shared_from, log)
        if shared_from is None and (work / f"seed-{seed}" / SHARED_OUTPUTS[-1]).exists():
            shared_from = work / f"seed-{seed}"
        results.append(result)
    if not results:
        raise SystemExit(f"no seed has a result under {work}")
    text = report(results, overrides)
    print(text, end="")
    if args.out is None and not overrides:
        args.out = REPO / SEEDS_REPORT
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# Whole-pipeline seeds: `python benchmarks/seeds.py`\n\n{text}")


def report(results: list[dict], overrides: dict[str, object]) -> str:
    """The benchmark's text: what ran where, the two tables and the targets."""
    rows, seeds = [r["row"] for r in results], [r["seed"] for r in results]
    precisions = sorted({r["precision"] for r in results})
    commits = sorted({r["commit"] for r in results})
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    header = (f"{len(seeds)} seeds, commit {', '.join(commits)}, precision {', '.join(precisions)}, {cpu_name()}, {cores} cores"
              + (f", overrides {overrides}" if overrides else ""))
    met = [f"- {name}: {'met' if held else 'NOT met'}" for name, held in targets(rows).items()]
    return "\n\n".join([header, markdown(seeds, rows), markdown(seeds, rows, DIAGNOSTICS), "\n".join(met)]) + "\n"


if __name__ == "__main__":
    main()
