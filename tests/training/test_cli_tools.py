"""`medserve synth`, `medserve info` and the skip path of `medserve demo`."""

import json
from typing import Any

import numpy as np
import pytest
from PIL import Image

from models.checkpoint import Architecture, CheckpointMetadata, save_checkpoint
from models.preprocessing import Preprocessing
from tests.training.helpers import save_tiny_unet
from training.cli import main as cli_main
from training.segmentation.synthetic import dental_phantom
from training.synth import GENERATORS


def test_synth_dental_writes_matching_images_and_exact_binary_masks(tmp_path, capsys):
    assert (
        cli_main(["synth", "dental", "--out", str(tmp_path), "--n", "3", "--size", "64", "--seed", "7"]) == 0
    )
    images = sorted((tmp_path / "images").glob("*.png"))
    masks = sorted((tmp_path / "masks").glob("*.png"))
    assert [p.name for p in images] == [p.name for p in masks] and len(images) == 3
    for image_path, mask_path in zip(images, masks, strict=True):
        image, mask = np.asarray(Image.open(image_path)), np.asarray(Image.open(mask_path))
        assert image.shape == mask.shape == (64, 64) and image.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 255}
        # Teeth are brighter than their surroundings on average, but not separable by one threshold.
        assert image[mask == 255].mean() > image[mask == 0].mean()
    assert "wrote 3 dental" in capsys.readouterr().out


def test_phantoms_are_reproducible_and_varied():
    a = dental_phantom(np.random.default_rng(1), 64)
    b = dental_phantom(np.random.default_rng(1), 64)
    c = dental_phantom(np.random.default_rng(2), 64)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    with pytest.raises(ValueError):
        dental_phantom(np.random.default_rng(0), 16)
    assert "dental" in GENERATORS


def test_unknown_kind_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        cli_main(["synth", "bananas", "--out", str(tmp_path)])


def _save(path, task="segmentation"):
    return save_tiny_unet(path, task, metrics={"dice": 0.5})


def test_info_prints_the_metadata_as_json(tmp_path, capsys):
    saved = _save(tmp_path / "m.pt")
    assert cli_main(["info", str(tmp_path / "m.pt")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["version"] == saved.version and printed["classes"] == ["background", "tooth"]
    assert printed["metrics"] == {"dice": 0.5}
    (tmp_path / "bad.pt").write_text("nope")
    assert cli_main(["info", str(tmp_path / "bad.pt")]) == 2
    assert "bad.pt" in capsys.readouterr().err


def _save_classifier(path):
    from models.classifier import Classifier

    args: dict[str, Any] = {"backbone": "resnet18", "num_classes": 2, "in_channels": 1, "head": "gap"}
    meta = CheckpointMetadata(
        task="classification",
        architecture=Architecture(name="classifier", args=args),
        classes=["benign", "malignant"],
        preprocessing=Preprocessing(in_channels=1, img_size=(32, 32), resize="resize"),
    )
    return save_checkpoint(path, Classifier(**args), meta)


def test_demo_skips_training_when_models_of_both_tasks_exist(tmp_path, capsys):
    _save(tmp_path / "mine.pt")
    _save_classifier(tmp_path / "lesions-of-mine.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")  # ignored, not fatal
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert cli_main(["demo", "--model-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "segmentation: found" in out and "mine.pt" in out
    assert "classification: found" in out and "lesions-of-mine.pt" in out
    assert out.count("nothing to do") == 2
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
