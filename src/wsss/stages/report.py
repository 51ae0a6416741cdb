"""The ``report`` stage: ``reports/summary.md`` (the paper's Tables 1 and 2 for this run, the gap to
the upper bound), ``metrics/summary.json`` (a few headline numbers in one flat file, the columns of
``dvc exp show``) and one MLflow run "pipeline" with every stage's metrics and all params flattened.
"""

from __future__ import annotations

import math
from pathlib import Path

from wsss import tracking
from wsss.config import Params, flatten
from wsss.errors import DataError
from wsss.evaluation import MODE_NAMES, MODES, mode_suffix
from wsss.io import atomic_write_bytes, read_json, write_json
from wsss.stages.paths import EVALUATE_METRICS, ORACLE_METRICS, PREDICTED, SEGMENTER_METRICS

REPORT = Path("reports/summary.md")
SEEDS_REPORT = Path("reports/seeds.md")  # written by benchmarks/seeds.py (the default over seeds)
SUMMARY = Path("metrics/summary.json")
# The paper's numbers (LID 2020), for orientation beside this run's.
PAPER_TABLE2_VAL = {"cam_crf": 0.3106, "irnet": 0.3187, "segmentation_tta": 0.3964}
PAPER_TABLE1_TEST = {"miou": 0.3734, "mean_accuracy": 0.5487, "pixel_accuracy": 0.8364}


def _pct(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _ratio(weak: float, upper: float) -> float:
    return weak / upper if upper > 0 else float("nan")


def table2_steps(stage_metrics: dict[str, dict]) -> list[tuple[str, dict, dict, float | None]]:
    """Table 2's rows: (step, val scores with the image labels, with the predicted labels, paper's
    value); the segmenter's rows are the same in both columns (it needs no labels)."""
    cams, pseudo, evaluate = stage_metrics["cams"], stage_metrics["pseudo_masks"], stage_metrics["evaluate"]
    rows = [("Classification + CRF", cams["cam_crf"], cams[PREDICTED]["cam_crf"], PAPER_TABLE2_VAL["cam_crf"]),
            ("IRNet (pseudo masks)" + (", person merged" if pseudo.get("person_merge") else ""), pseudo["val"], pseudo[PREDICTED],
             PAPER_TABLE2_VAL["irnet"])]
    rows += [(f"Segmentation{mode_suffix(mode)}", evaluate["val"][mode], evaluate["val"][mode],
              PAPER_TABLE2_VAL["segmentation_tta"] if mode == "tta" else None) for mode in MODES if mode in evaluate["val"]]
    return rows


def table2_ordering(steps: list[tuple[str, dict, dict, float | None]]) -> dict:
    """The paper's claim on this run, from :func:`table2_steps`' rows: CAM + CRF < pseudo masks <
    segmentation + TTA on val, steps 1-2 with the predicted labels and the segmenter without a CRF after it."""
    tta = next(row for row in steps if row[0] == f"Segmentation{mode_suffix('tta')}")
    chosen = [(name, predicted["miou"]) for name, _, predicted, _ in (steps[0], steps[1], tta)]
    return {"steps": chosen, "holds": all(a[1] < b[1] for a, b in zip(chosen, chosen[1:]))}


def summary_markdown(stage_metrics: dict[str, dict]) -> str:
    """``reports/summary.md`` from the stages' metrics (pure: a test can feed it made-up numbers)."""
    evaluate = stage_metrics["evaluate"]
    oracle = stage_metrics.get("oracle", {})
    final = evaluate.get("final_mode", "tta")
    test_final = evaluate["test"][final]
    test_modes = list(dict.fromkeys(mode for mode in (final, *reversed(MODES)) if mode in evaluate["test"]))
    steps = table2_steps(stage_metrics)
    ordering = table2_ordering(steps)
    lines = [
        "# wsss: summary of this run",
        "",
        "One run of one `seed`: steps 1-2 move the numbers below by several points from seed to seed. The CPU default's "
        f"mean and spread over whole-pipeline seeds: `{SEEDS_REPORT}` (`python benchmarks/seeds.py`).",
        "",
        "## Table 2: each step on val (mIoU, %)",
        "",
        "Steps 1-2 need an image's class labels. Scored with the image labels (irn's protocol, the paper's Table 2) they "
        "know what the segmenter has to find out; scored with the labels the step-1 classifier predicts they give what "
        "they would on an image nobody labelled, the footing of the segmenter (which needs no labels).",
        "",
        "| step | image labels | predicted labels | predicted labels, without the person class | paper (LID val) |",
        "|---|---:|---:|---:|---:|",
        *(f"| {name} | {_pct(labelled['miou'])} | {_pct(predicted['miou'])} | {_pct(predicted.get('miou_without_person'))} | "
          f"{'' if paper is None else _pct(paper)} |" for name, labelled, predicted, paper in steps),
        "",
        f"Each step improves on the last (predicted labels, no CRF after the segmenter: {' < '.join(name for name, _ in ordering['steps'])}): "
        f"**{'yes' if ordering['holds'] else 'no'}** ({', '.join(f'{_pct(value)}' for _, value in ordering['steps'])}).",
        "",
        "## Table 1: the final model on test (%)",
        "",
        "| | mIoU | mean accuracy | pixel accuracy |",
        "|---|---:|---:|---:|",
        *(f"| this run, {MODE_NAMES[mode]} | {_pct(evaluate['test'][mode]['miou'])} | {_pct(evaluate['test'][mode]['mean_accuracy'])} | "
          f"{_pct(evaluate['test'][mode]['pixel_accuracy'])} |" for mode in test_modes),
        f"| paper (LID test) | {_pct(PAPER_TABLE1_TEST['miou'])} | {_pct(PAPER_TABLE1_TEST['mean_accuracy'])} | {_pct(PAPER_TABLE1_TEST['pixel_accuracy'])} |",
        "",
        "## Weak against full supervision",
        "",
    ]
    if oracle.get("available") and final not in oracle["test"]:
        lines.append(f"The upper bound was not scored with {MODE_NAMES[final]}: re-run the oracle stage (`dvc repro oracle`).")
    elif oracle.get("available"):
        upper = oracle["test"][final]
        lines += [
            "The upper bound is the same segmenter, trained with the same budget on the ground-truth training masks.",
            "",
            f"| model (test, {MODE_NAMES[final]}) | mIoU | without the person class | mean accuracy | pixel accuracy |",
            "|---|---:|---:|---:|---:|",
            f"| weakly supervised (image labels only) | {_pct(test_final['miou'])} | {_pct(test_final.get('miou_without_person'))} | "
            f"{_pct(test_final['mean_accuracy'])} | {_pct(test_final['pixel_accuracy'])} |",
            f"| upper bound (true masks) | {_pct(upper['miou'])} | {_pct(upper.get('miou_without_person'))} | "
            f"{_pct(upper['mean_accuracy'])} | {_pct(upper['pixel_accuracy'])} |",
            "",
            f"Weak / full supervision: **{_pct(_ratio(test_final['miou'], upper['miou']))} %** of the upper bound's test mIoU"
            + (f"; {_pct(_ratio(test_final['miou_without_person'], upper['miou_without_person']))} % without the person class, "
               "whose labels the weak model never sees (the paper drops them)." if "miou_without_person" in upper else "."),
        ]
        if "miou_person_as_background" in upper:
            lines += ["", "Ceiling of a model that never predicts the person class (the paper's, which drops its labels): the upper "
                          f"bound's own predictions with every person pixel turned background score {_pct(upper['miou_person_as_background'])} "
                          f"mIoU, **{_pct(_ratio(upper['miou_person_as_background'], upper['miou']))} %** of the upper bound."]
        if final != "tta" and "tta" in oracle["test"]:
            tta_upper = oracle["test"]["tta"]
            ceiling = (f" (ceiling {_pct(_ratio(tta_upper['miou_person_as_background'], tta_upper['miou']))} %)"
                       if "miou_person_as_background" in tta_upper else "")
            lines += ["", f"With TTA only (no CRF on either model): {_pct(_ratio(evaluate['test']['tta']['miou'], tta_upper['miou']))} %{ceiling}."]
    else:
        lines.append(f"No upper bound: {oracle.get('reason', 'the oracle stage did not run')}.")
    lines += ["", "Per-class IoU, the confusion matrix and Figure 2 (image | CAM + CRF | pseudo mask | prediction | "
              "ground truth): `plots/evaluate/`, and the MLflow runs of this pipeline.", ""]
    return "\n".join(lines)


def headline_metrics(stage_metrics: dict[str, dict]) -> dict[str, float | str | bool]:
    """The flat ``metrics/summary.json``: each step on val (Table 2), the final model on test (Table 1) and
    its share of the upper bound's, under the final post-processing (``final_mode``); the upper bound's
    keys only where it exists (not on LID)."""
    evaluate, oracle = stage_metrics["evaluate"], stage_metrics.get("oracle", {})
    final = evaluate.get("final_mode", "tta")
    steps = table2_steps(stage_metrics)
    cam_crf, pseudo = steps[:2]
    headline: dict[str, float | str | bool] = {
        "val_cam_crf_miou": cam_crf[2]["miou"],  # steps 1-2 with the predicted labels (the segmenter's footing)
        "val_pseudo_masks_miou": pseudo[2]["miou"],
        "val_cam_crf_miou_image_labels": cam_crf[1]["miou"],  # irn's protocol
        "val_pseudo_masks_miou_image_labels": pseudo[1]["miou"],
        "val_segmentation_tta_miou": evaluate["val"]["tta"]["miou"],
        "val_segmentation_miou": evaluate["val"][final]["miou"],
        "table2_ordering_holds": table2_ordering(steps)["holds"],
        "test_miou": evaluate["test"][final]["miou"],
        "test_pixel_accuracy": evaluate["test"][final]["pixel_accuracy"],
        "final_mode": final,
    }
    if oracle.get("available") and final in oracle.get("test", {}):
        upper = oracle["test"][final]["miou"]
        headline["upper_bound_test_miou"] = upper
        if upper > 0:
            headline["share_of_upper_bound"] = evaluate["test"][final]["miou"] / upper
        upper_without = oracle["test"][final].get("miou_without_person")
        if upper_without:  # the same share with the person class left out of both means
            headline["share_of_upper_bound_without_person"] = evaluate["test"][final]["miou_without_person"] / upper_without
    return {key: round(value, 6) if isinstance(value, float) else value for key, value in headline.items()}


REPORT_INPUTS = {"prepare": "metrics/prepare.json", "data": "metrics/data.json", "classifier": "metrics/classifier.json",
                 "cams": "metrics/cams.json", "ir_labels": "metrics/ir_labels.json", "irnet": "metrics/irnet.json",
                 "pseudo_masks": "metrics/pseudo_masks.json", "segmenter": str(SEGMENTER_METRICS), "oracle": str(ORACLE_METRICS),
                 "evaluate": str(EVALUATE_METRICS)}


def _numbers(payload, prefix: str = "") -> dict[str, float]:
    """Every number in a metrics document, flattened to ``a.b.c`` keys (MLflow metric names)."""
    flat: dict[str, float] = {}
    items = payload.items() if isinstance(payload, dict) else enumerate(payload) if isinstance(payload, list) else ()
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            flat[name] = float(value)
        elif isinstance(value, (dict, list)):
            flat.update(_numbers(value, name + "."))
    return flat


def run_report(params: Params, root: Path) -> dict:
    import mlflow

    stage_metrics = {}
    for stage, relative in REPORT_INPUTS.items():
        if not (root / relative).is_file():
            raise DataError(root / relative, f"metrics of stage {stage} not found: run `dvc repro` (the report reads every stage's metrics)")
        stage_metrics[stage] = read_json(root / relative)
    text = summary_markdown(stage_metrics)
    (root / REPORT).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(root / REPORT, text.encode())
    write_json(root / SUMMARY, headline_metrics(stage_metrics))
    hashes = tracking.input_hashes({name: root / relative for name, relative in REPORT_INPUTS.items()})
    with tracking.stage_run("pipeline", params.tracking.experiment, flatten(params), root=root, hashes=hashes) as run:
        metrics = {}
        for stage, payload in stage_metrics.items():
            metrics.update(_numbers(payload, f"{stage}."))
        # MLflow metric names: letters, digits and _ - . / space
        mlflow.log_metrics({name.replace("(", "").replace(")", ""): value for name, value in metrics.items()})
        mlflow.log_artifact(str(root / REPORT))
        mlflow.log_artifact(str(root / SUMMARY))
        mlflow.set_tag("wsss.kind", "pipeline")
        tracking.link_pipeline_runs(run.info.run_id)  # the stage runs of this repro, by id
    return {"report": str(REPORT), "metrics_logged": len(metrics)}
