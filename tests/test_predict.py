"""``wsss predict``: images of any size, a corrupt file among good ones, bad models and arguments."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsss import checkpoint, predict
from wsss.io import read_mask, write_image_png
from wsss.models.segmenter import SegmenterSpec, build_segmenter, save_segmenter

NUM_CLASSES = 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    spec = SegmenterSpec("resnet18", NUM_CLASSES, 16, 16, ("background", "a", "b"))
    save_segmenter(path, build_segmenter(spec), spec)
    return path


def random_image(path: Path, height: int, width: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    if path.suffix == ".png":
        write_image_png(path, pixels)
    else:
        Image.fromarray(pixels).save(path)


def run(argv: list[str]) -> int:
    return predict.main_from_args(predict.add_arguments(argparse.ArgumentParser()).parse_args(argv))


def test_a_corrupt_file_is_named_and_skipped_and_the_rest_is_written(tmp_path, model_file, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    random_image(photos / "a.png", 40, 52)
    random_image(photos / "b.JPG", 33, 47, seed=1)
    (photos / "bad.png").write_bytes(b"not an image")
    (photos / "notes.txt").write_text("hello")
    (photos / "nested").mkdir()
    out = tmp_path / "out"

    assert run(["--model", str(model_file), str(photos), "--out", str(out)]) == 1

    for stem, size in (("a", (40, 52)), ("b", (33, 47))):
        mask = read_mask(out / f"{stem}.png")
        assert mask.shape == size and mask.max() < NUM_CLASSES
        assert Image.open(out / f"{stem}.png").mode == "P"
        assert Image.open(out / f"{stem}_overlay.png").size == (size[1], size[0])
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a_overlay.png", "b.png", "b_overlay.png"]
    captured = capsys.readouterr()
    assert f"skipped {photos / 'bad.png'}: not a readable image" in captured.err
    assert f"skipped {photos / 'notes.txt'}: not an image" in captured.err
    assert "2 written, 2 failed" in captured.out


def test_good_files_exit_0_and_equal_stems_do_not_overwrite_each_other(tmp_path, model_file, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    random_image(photos / "a.png", 20, 30)
    random_image(photos / "a.jpg", 24, 18, seed=1)
    random_image(photos / "c.bmp", 16, 16, seed=2)
    out = tmp_path / "out"
    assert run(["--model", str(model_file), str(photos), "--out", str(out), "--tta-scales", "1", "1.5"]) == 0
    assert read_mask(out / "a.png.png").shape == (20, 30) and read_mask(out / "a.jpg.png").shape == (24, 18)
    assert read_mask(out / "c.png").shape == (16, 16) and (out / "a.jpg_overlay.png").is_file()

    single = tmp_path / "single"
    assert run(["--model", str(model_file), str(photos / "c.bmp"), "--out", str(single), "--no-tta"]) == 0
    assert sorted(p.name for p in single.iterdir()) == ["c.png", "c_overlay.png"]
    assert "1 written, 0 failed" in capsys.readouterr().out


def test_output_names_never_clash():
    files = ["x/a.png", "x/a.jpg", "x/b.png", "x/b_overlay.png", "y/c.png", "z/c.png"]
    names = predict.output_names([Path(file) for file in files])
    assert names == ["a.png", "a.jpg", "b.png", "b_overlay.png", "c.png", None]


def test_a_bad_model_or_input_exits_2_naming_it(tmp_path, model_file, capsys):
    random_image(tmp_path / "a.png", 16, 16)
    (tmp_path / "bogus.pt").write_bytes(b"not a model")
    checkpoint.save(tmp_path / "classifier.pt", {"model": {}, "arch": "small_cnn"})
    for name in ("missing.pt", "bogus.pt", "classifier.pt"):
        assert run(["--model", str(tmp_path / name), str(tmp_path / "a.png"), "--out", str(tmp_path / "out")]) == 2
        assert f"{tmp_path / name}: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    assert run(["--model", str(model_file), str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "nowhere: input not found" in capsys.readouterr().err

    (tmp_path / "empty").mkdir()
    assert run(["--model", str(model_file), str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 1

    with pytest.raises(SystemExit) as exit_info:
        run(["--model", str(model_file), str(tmp_path / "a.png"), "--out", str(tmp_path / "out"), "--tta-scales", "0"])
    assert exit_info.value.code == 2


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_device_cuda_without_cuda_exits_2_naming_the_option_and_cpu_works(tmp_path, model_file, capsys):
    random_image(tmp_path / "a.png", 16, 16)
    assert run(["--model", str(model_file), str(tmp_path / "a.png"), "--out", str(tmp_path / "out"), "--device", "cuda"]) == 2
    assert "--device: cuda is requested but torch sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert run(["--model", str(model_file), str(tmp_path / "a.png"), "--out", str(tmp_path / "out"), "--device", "cpu", "--no-tta"]) == 0
    assert (tmp_path / "out/a.png").is_file()


def test_crf_refines_each_prediction_on_its_image(tmp_path, model_file):
    from wsss.config import CrfParams
    from wsss.crf import crf_labels
    from wsss.io import read_image

    image = np.zeros((40, 48, 3), dtype=np.uint8)
    image[8:30, 10:40] = (220, 200, 30)
    write_image_png(tmp_path / "square.png", image)
    assert run(["--model", str(model_file), str(tmp_path / "square.png"), "--out", str(tmp_path / "plain"), "--no-tta"]) == 0
    assert run(["--model", str(model_file), str(tmp_path / "square.png"), "--out", str(tmp_path / "crf"), "--no-tta", "--crf"]) == 0
    plain, refined = read_mask(tmp_path / "plain/square.png"), read_mask(tmp_path / "crf/square.png")
    assert np.array_equal(refined, crf_labels(read_image(tmp_path / "square.png"), plain, CrfParams()))
