from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_document

from wsss.cli import EXIT_USER_ERROR, main
from wsss.config import ConfigError, flatten, load_params, validate_params, with_values


def test_default_params_and_paper_profile_validate():
    default = load_params(REPO / "params.yaml")
    paper = load_params(REPO / "profiles/paper.yaml")
    assert default.data.source == "embedded" and default.classifier.arch == "small_cnn"
    assert paper.classifier.arch == "vgg16_bn_d1" and paper.classifier.extra_convs == 4
    assert (paper.classifier.lr_backbone, paper.classifier.lr_head) == (1e-4, 1e-3)
    assert paper.irnet.backbone == "resnet50" and paper.irnet.confidence_cutoff == 0.8
    assert (paper.irnet.lr_displacement, paper.irnet.lr_boundary) == (0.05, 0.005)
    assert paper.segmenter.encoder == "resnet50" and paper.segmenter.lr == 1e-3
    assert paper.data.source in ("lid", "voc") and paper.data.person_class == "person"


def _problems(overrides: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        validate_params(make_document(overrides, tiny=False))
    return str(caught.value)


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        ({"data.balance.foo": 1}, "data.balance.foo", "unknown key"),
        ({"segmentor": {"lr": 1}}, "segmentor", "unknown key"),
        ({"data.embedded.image_size": "big"}, "data.embedded.image_size", "'big'"),
        ({"data.person_label_drop": 1.5}, "data.person_label_drop", "less than or equal to 1"),
        ({"data.source": "coco"}, "data.source", "'coco'"),
        ({"data.balance.rule": "upsample"}, "data.balance.rule", "'upsample'"),
        ({"data.embedded.objects_per_image": [3, 1]}, "data.embedded.objects_per_image", "greater than maximum"),
        ({"data.embedded.classes": ["t_shirt", "parrot"]}, "data.embedded.classes.1", "'parrot'"),
        ({"data.person_class": "person"}, "data.person_class", "not one of data.embedded.classes"),
        ({"irnet.conf_bg": 0.8}, "irnet.conf_bg", "below conf_fg"),
        ({"irnet.infer_scale": 3}, "irnet.infer_scale", "3"),
        ({"irnet.post_crf": False}, "irnet.ignore_uncertain", "needs post_crf: true"),
        ({"person.background_seed": 1.5}, "person.background_seed", "less than or equal to 1"),
        ({"segmenter.output_stride": 32}, "segmenter.output_stride", "32"),
        ({"irnet.background": "flood"}, "irnet.background", "'flood'"),
        ({"segmenter.scale_range": [2.0, 1.0]}, "segmenter.scale_range", "0 < min <= max"),
        ({"segmenter.optimizer": "lion"}, "segmenter.optimizer", "'lion'"),
        ({"segmenter.batch_size": 1}, "segmenter.batch_size", "greater than or equal to 2"),
        ({"segmenter.ema_decay": 1.0}, "segmenter.ema_decay", "less than 1"),
        ({"segmenter.background_weight": 0}, "segmenter.background_weight", "greater than 0"),
        ({"segmenter.skip_disagreement": 1.5}, "segmenter.skip_disagreement", "less than or equal to 1"),
        ({"segmenter.skip_after_epochs": -1}, "segmenter.skip_after_epochs", "greater than or equal to 0"),
        ({"evaluate.tta_scales": [1.0, -0.5]}, "evaluate.tta_scales", "must be positive"),
        ({"evaluate.crf": "sometimes"}, "evaluate.crf", "valid boolean"),
        ({"segmenter.atrous_rates": [1, 0, 3]}, "segmenter.atrous_rates.1", "greater than 0"),
        ({"segmenter.encoder": "classifier", "segmenter.output_stride": 16}, "segmenter.output_stride", "classifier encoder"),
        ({"segmenter.encoder": "classifier", "segmenter.output_stride": 8, "segmenter.encoder_weights": "imagenet"},
         "segmenter.encoder_weights", "step-1 network"),
    ],
)
def test_bad_values_name_their_key(overrides, key, fragment):
    message = _problems(overrides)
    line = next((line for line in message.splitlines() if f": {key}: " in line), None)
    assert line is not None, message
    assert fragment in line


def test_with_values_puts_values_in_and_checks_them_like_a_params_file():
    params = validate_params(make_document())
    changed = with_values(params, {"irnet.bg_weight": 1.2, "segmenter.ema_decay": None}, "trial 3")
    assert changed.irnet.bg_weight == 1.2 and changed.segmenter.ema_decay is None
    assert params.irnet.bg_weight != 1.2  # the given params are left as they were
    assert changed.model_dump(exclude={"irnet", "segmenter"}) == params.model_dump(exclude={"irnet", "segmenter"})
    with pytest.raises(ConfigError, match=r"trial 3.*irnet.conf_bg: .*below conf_fg"):  # a model-level check
        with_values(params, {"irnet.conf_bg": 0.99}, "trial 3")
    for unknown in ("irnet.bg_wieght", "bg_weight", "nothing.bg_weight", "data.embedded.image_size"):
        with pytest.raises(ConfigError, match=rf"{unknown}: not a group.key"):
            with_values(params, {unknown: 1.0})
    with pytest.raises(ConfigError, match=r"segmenter.epochs: .*greater than or equal to 1"):
        with_values(params, {"segmenter.epochs": 0})


def test_missing_seed_is_reported():
    document = make_document(tiny=False)
    del document["seed"]
    with pytest.raises(ConfigError, match=r"seed: required key is missing"):
        validate_params(document)


def test_cli_rejects_bad_params_with_exit_code(tmp_path: Path, capsys):
    document = make_document({"data.balance.factor": 0.5})
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(document))
    assert main(["check-params", "--root", str(tmp_path), "--params", str(bad)]) == EXIT_USER_ERROR
    assert "data.balance.factor" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("data: [unclosed\n")
    assert main(["check-params", "--root", str(tmp_path), "--params", str(tmp_path / "broken.yaml")]) == EXIT_USER_ERROR
    assert "not valid YAML" in capsys.readouterr().err


def test_flatten_gives_dotted_keys():
    params = validate_params(make_document())
    flat = flatten(params)
    assert flat["data.balance.rule"] == params.data.balance.rule
    assert flat["data.embedded.image_size"] == 32
    assert not any(isinstance(value, dict) for value in flat.values())
