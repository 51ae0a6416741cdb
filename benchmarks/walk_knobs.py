"""Step 2's inference knobs searched together: val pseudo masks per setting (Optuna TPE).

Walks the val images with this checkout's IRNet, CAMs and person CAMs (run ``dvc repro pseudo_masks``
first) as the ``pseudo_masks`` stage does (``mask_shard``: walk, CRF, person merge and floor), once per
trial, and scores them with the image labels (the objective, irn's protocol) and with the classifier's
predicted labels. Searched: ``irnet.beta``, ``irnet.exp_times``, ``irnet.bg_weight``,
``person.background_seed``, ``person.cam_threshold`` and the dense CRF's ``gt_prob``, ``bilateral_srgb``,
``bilateral_sxy``, ``bilateral_compat``. IRNet stays the one trained on the current IR labels (the
``crf`` group also makes those): a setting worth adopting must be re-measured through the whole
pipeline (``benchmarks/pipeline.py``). Trial 0 is ``params.yaml``'s setting. About 35 s per trial on 2 cores.

    python benchmarks/walk_knobs.py --trials 40
    python benchmarks/walk_knobs.py --settings default irnet.infer_radius=7 'irnet.infer_radius=3,irnet.exp_times=4'

``--settings``: no search; each argument (comma-separated ``group.key=value``, YAML values, checked by the
schema; ``default``: ``params.yaml`` as it is) is one setting of any walk-time knob, scored the same way.
"""

from __future__ import annotations

import argparse
import json
import time

import optuna
import yaml
from person_floor import val_scores, walk_inputs
from wsss.config import lookup, with_values
from wsss.errors import ConfigError
from wsss.stages.paths import PREDICTED


# dotted params key -> Optuna search space: (low, high[, step]) for numbers, a list for a categorical
KNOBS = {
    "irnet.beta": (4, 14, 2), "irnet.exp_times": (2, 5, 1), "irnet.bg_weight": (1.2, 2.0),
    "person.background_seed": (0.3, 0.7), "person.cam_threshold": (0.35, 0.55),
    "crf.gt_prob": (0.6, 0.9), "crf.bilateral_srgb": [3, 5, 8, 13, 20], "crf.bilateral_sxy": [20, 35, 50, 80],
    "crf.bilateral_compat": [5, 10, 15],
}


def suggest(trial: optuna.Trial, name: str, space):
    if isinstance(space, list):
        return trial.suggest_categorical(name, space)
    if len(space) == 3:
        return trial.suggest_int(name, space[0], space[1], step=space[2])
    return trial.suggest_float(name, *space)


def with_knobs(base, values: dict):
    """``base`` with each ``group.key`` of ``values`` put in, checked by the schema (an unknown key or a
    bad value exits naming it)."""
    try:
        return with_values(base, values, "walk_knobs.py")
    except ConfigError as error:
        raise SystemExit(str(error)) from None


def parse_setting(text: str) -> dict:
    """The ``group.key: value`` pairs of one ``--settings`` argument (comma-separated ``group.key=value``,
    YAML values); ``default``: none."""
    if text == "default":
        return {}
    values = {}
    for pair in text.split(","):
        name, _, value = pair.partition("=")
        if not value:
            raise SystemExit(f"--settings {text!r}: {pair!r} is not group.key=value")
        values[name] = yaml.safe_load(value)
    return values


def score_settings(base, manifests, model, settings: list[str]) -> None:
    """One row per setting: val mIoU with the image labels and with the predicted labels, per-class IoU."""
    rows = []
    for text in settings:
        params, start = with_knobs(base, parse_setting(text)), time.perf_counter()
        miou, iou = val_scores(params, manifests, model, "val")
        predicted, _ = val_scores(params, manifests, model, PREDICTED)
        rows.append((text, miou, predicted, iou, time.perf_counter() - start))
        print(f"{text}: val {miou:.4f}, predicted labels {predicted:.4f}", flush=True)
    names = list(rows[0][3])
    print("\n| setting | val mIoU (image labels) | val mIoU (predicted labels) | " + " | ".join(names) + " | seconds |")
    print("|---|---:|---:|" + "---:|" * len(names) + "---:|")
    for text, miou, predicted, iou, seconds in rows:
        print(f"| {text} | {miou:.4f} | {predicted:.4f} | " + " | ".join(f"{iou[n]:.3f}" for n in names) + f" | {seconds:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    parser.add_argument("--top", type=int, default=8, help="trials shown in the table")
    parser.add_argument("--settings", nargs="+", default=None, help="score these settings instead of searching")
    args = parser.parse_args()
    base, manifests, model = walk_inputs("the search covers its knobs")
    if args.settings:
        score_settings(base, manifests, model, args.settings)
        return

    def objective(trial: optuna.Trial) -> float:
        params, start = with_knobs(base, {name: suggest(trial, name, space) for name, space in KNOBS.items()}), time.perf_counter()
        miou, _ = val_scores(params, manifests, model, "val")
        predicted, _ = val_scores(params, manifests, model, PREDICTED)
        trial.set_user_attr("predicted", predicted)
        print(f"trial {trial.number}: {json.dumps(trial.params)} val {miou:.4f}, predicted labels {predicted:.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        return miou

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=args.seed))
    study.enqueue_trial({name: lookup(base.model_dump(), name) for name in KNOBS})  # trial 0: params.yaml
    study.optimize(objective, n_trials=args.trials)
    trials = sorted(study.trials, key=lambda t: -t.value)
    names = list(study.trials[0].params)
    print("\n| trial | " + " | ".join(names) + " | val mIoU (image labels) | val mIoU (predicted labels) |")
    print("|---:|" + "---:|" * (len(names) + 2))
    for trial in [*trials[: args.top], *([study.trials[0]] if study.trials[0] not in trials[: args.top] else [])]:
        values = " | ".join(f"{trial.params[n]:.3g}" for n in names)
        print(f"| {trial.number} | {values} | {trial.value:.4f} | {trial.user_attrs['predicted']:.4f} |")


if __name__ == "__main__":
    main()
