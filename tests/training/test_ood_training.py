"""Out-of-distribution statistics from training (`train classify`, `train segment`) and `medserve calibrate-ood`."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoint import Architecture, CheckpointMetadata, load_checkpoint, load_model, save_checkpoint
from models.classifier import Classifier
from models.imageio import read_image_file
from models.ood import extract_features
from models.preprocessing import Preprocessing
from tests.training.helpers import save_tiny_unet, tolerance_threshold, train_argv
from training.classification.data import discover
from training.cli import main
from training.common.ood import model_input
from training.segmentation.synthetic import generate_dental

pytestmark = pytest.mark.usefixtures("single_thread")

CLASSES = ("dark", "light")
COMMON = ["--pretrained", "none", "--img-size", "32", "--device", "cpu", "--threads", "1", "--no-progress"]


def make_classes(root: Path, n_per_class: int, seed: int = 0) -> Path:
    """``root/dark`` and ``root/light``: 24x24 gray noise around 0.3 and 0.7."""
    rng = np.random.default_rng(seed)
    for name, level in zip(CLASSES, (0.3, 0.7), strict=True):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            pixels = np.clip(rng.normal(level, 0.1, (24, 24)), 0, 1)
            Image.fromarray((pixels * 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
    return root


def make_images(folder: Path, n: int, seed: int = 0) -> Path:
    """``folder/images/*.png`` only (no masks): 40x40 gray noise."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(
            folder / "images" / f"{i:02d}.png"
        )
    return folder


def scores_of(path: Path, files: list[Path]) -> np.ndarray:
    """The OOD scores the checkpoint at ``path`` gives ``files``, computed here independently of the command."""
    model, meta = load_model(path)
    assert meta.ood is not None
    tiled = meta.task == "segmentation"
    inputs = [model_input(read_image_file(f).pixels, meta) for f in files]
    with torch.inference_mode():
        features = extract_features(model, inputs, tile=meta.preprocessing.img_size if tiled else None)
    return meta.ood.scores(features)


def save_small_classifier(path: Path) -> CheckpointMetadata:
    torch.manual_seed(0)
    model = Classifier("resnet18", num_classes=2, in_channels=1, head="gap")
    meta = CheckpointMetadata(
        task="classification",
        architecture=Architecture(name="classifier", args=model.architecture_args()),
        classes=list(CLASSES),
        preprocessing=Preprocessing(
            in_channels=1, img_size=(32, 32), resize="resize", mean=[0.45], std=[0.22]
        ),
        training={"val_split": 0.25, "seed": 3},
    )
    return save_checkpoint(path, model.eval(), meta)


def test_calibrate_ood_adds_statistics_to_a_classifier_as_a_new_file(tmp_path: Path) -> None:
    data = make_classes(tmp_path / "data", 8)
    original = save_small_classifier(tmp_path / "cls.pt")
    out = tmp_path / "cls-ood.pt"
    assert (
        main(["calibrate-ood", "--model", str(tmp_path / "cls.pt"), "--data", str(data), "--out", str(out)])
        == 0
    )
    meta, state = load_checkpoint(out)
    before, before_state = load_checkpoint(tmp_path / "cls.pt")
    assert before.ood is None and before.version == original.version  # --out: the original is untouched
    assert meta.ood is not None and meta.version != original.version
    assert all(torch.equal(state[k], before_state[k]) for k in state)  # the weights are the same
    assert meta.ood.groups == list(CLASSES) and meta.ood.percentile == 95.0
    # ResNet-18: mean and std of the first stage (64 channels) and of the last (512).
    assert meta.ood.layers == ["features.0", "features.4"] and meta.ood.pooling == "mean+std"
    assert meta.ood.blocks == [64, 64, 512, 512] and meta.ood.dim == 1152
    # The split recorded in the checkpoint (val_split 0.25, seed 3): 12 training, 4 validation images.
    split = discover(data, 0.25, 3)
    assert (meta.ood.n_fit, meta.ood.n_calibration) == (12, 4)
    validation = scores_of(out, [s.path for s in split.val])
    # 4 validation images are too few to bound the flag rate at 5 % with confidence 0.9: their largest score.
    assert tolerance_threshold(validation, 95.0)[1] == "maximum" == meta.ood.threshold_rule
    assert meta.ood.threshold == pytest.approx(float(validation.max()), rel=1e-6)


def test_calibrate_ood_replaces_a_segmentation_checkpoint_in_place(tmp_path: Path) -> None:
    data = make_images(tmp_path / "data", 10)
    path = tmp_path / "unet.pt"
    original = save_tiny_unet(path)
    argv = ["calibrate-ood", "--model", str(path), "--data", str(data), "--percentile", "90"]
    assert main(argv) == 0
    meta, _ = load_checkpoint(path)
    assert meta.ood is not None and meta.version != original.version
    assert meta.ood.groups == ["all"] and meta.ood.percentile == 90.0
    assert meta.ood.n_fit + meta.ood.n_calibration == 10 and meta.ood.n_calibration == 1  # val split 0.1
    # Calibrating again on the same data gives the same statistics, hence the same version.
    assert main(argv) == 0
    assert load_checkpoint(path)[0].version == meta.version


def test_calibrate_ood_uses_a_val_folder_when_there_is_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_images(tmp_path / "data", 6)
    make_images(data / "val", 50, seed=1)
    save_tiny_unet(tmp_path / "unet.pt")
    assert main(["calibrate-ood", "--model", str(tmp_path / "unet.pt"), "--data", str(data)]) == 0
    assert (
        "at most 5% of images like the 50 validation images flagged, with confidence 0.9"
        in capsys.readouterr().out
    )
    meta, _ = load_checkpoint(tmp_path / "unet.pt")
    assert meta.ood is not None and (meta.ood.n_fit, meta.ood.n_calibration) == (6, 50)
    validation = scores_of(tmp_path / "unet.pt", sorted((data / "val" / "images").glob("*.png")))
    threshold, rule = tolerance_threshold(validation, 95.0)
    assert rule == "tolerance" == meta.ood.threshold_rule and meta.ood.confidence == 0.9
    assert meta.ood.threshold == pytest.approx(threshold, rel=1e-6)
    # The largest of 50: the 49th would leave more than 5 % above it with probability 0.28 (> 0.1).
    assert meta.ood.threshold == pytest.approx(float(validation.max()), rel=1e-6)
    # --confidence 0: the conformal rank, at the 80th percentile ceil(51 * 0.8) = 41.
    argv = ["calibrate-ood", "--model", str(tmp_path / "unet.pt"), "--data", str(data), "--percentile", "80"]
    assert main([*argv, "--confidence", "0"]) == 0
    conformal = load_checkpoint(tmp_path / "unet.pt")[0].ood
    assert conformal is not None and conformal.threshold_rule == "conformal" and conformal.confidence is None
    assert conformal.threshold == pytest.approx(float(np.sort(validation)[40]), rel=1e-6)  # ceil(51 * 0.8)
    assert main(argv) == 0
    strict = load_checkpoint(tmp_path / "unet.pt")[0].ood
    assert strict is not None and strict.threshold == pytest.approx(tolerance_threshold(validation, 80.0)[0])
    assert strict.threshold > conformal.threshold


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--percentile", "0"], "--percentile"),
        (["--confidence", "1.5"], "confidence"),
        (["--out", "x.pth"], "--out must end in .pt"),
    ],
)
def test_calibrate_ood_refuses_bad_options(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, extra: list[str], message: str
) -> None:
    data = make_images(tmp_path / "data", 4)
    save_tiny_unet(tmp_path / "unet.pt")
    with caplog.at_level(logging.ERROR):
        assert main(["calibrate-ood", "--model", str(tmp_path / "unet.pt"), "--data", str(data), *extra]) == 2
    assert message in caplog.text


def test_calibrate_ood_refuses_class_folders_the_model_does_not_know(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = make_classes(tmp_path / "data", 4)
    (data / "light").rename(data / "other")
    save_small_classifier(tmp_path / "cls.pt")
    with caplog.at_level(logging.ERROR):
        assert main(["calibrate-ood", "--model", str(tmp_path / "cls.pt"), "--data", str(data)]) == 2
    assert "not among the model's classes" in caplog.text
    assert load_checkpoint(tmp_path / "cls.pt")[0].ood is None


def test_train_classify_stores_statistics_fitted_on_training_and_thresholded_on_validation(
    tmp_path: Path,
) -> None:
    data = make_classes(tmp_path / "data", 10)
    out = tmp_path / "m.pt"
    argv = train_argv(
        "classify", data, out, "--epochs", "1", "--batch-size", "8", "--val-split", "0.2", *COMMON
    )
    assert main([*argv, "--ood-percentile", "80"]) == 0
    meta, _ = load_checkpoint(out)
    assert meta.ood is not None and meta.ood.groups == list(CLASSES) and meta.ood.percentile == 80.0
    assert (meta.ood.n_fit, meta.ood.n_calibration) == (16, 4)
    split = discover(data, 0.2, 0)
    validation = scores_of(out, [s.path for s in split.val])
    threshold, rule = tolerance_threshold(validation, 80.0)
    assert rule == "maximum" == meta.ood.threshold_rule  # 4 images: 0.8 ** 4 = 0.41 > 0.1
    assert meta.ood.threshold == pytest.approx(threshold, rel=1e-6)
    assert main([*argv, "--ood-percentile", "0"]) == 0  # no statistics
    assert load_checkpoint(out)[0].ood is None


def test_train_classify_refuses_a_bad_percentile(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = make_classes(tmp_path / "data", 3)
    argv = train_argv("classify", data, tmp_path / "m.pt", *COMMON, "--ood-percentile", "150")
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    assert "--ood-percentile" in caplog.text


def test_train_segment_stores_statistics_of_the_bottleneck(tmp_path: Path) -> None:
    generate_dental(tmp_path / "data", 8, 64, seed=0)
    out = tmp_path / "dental.pt"
    options = ["--epochs", "1", "--img-size", "32", "--channels", "4,8", "--batch-size", "4"]
    options += ["--samples-per-epoch", "8", "--val-split", "0.25", "--device", "cpu"]
    assert main(train_argv("segment", tmp_path / "data", out, *options)) == 0
    meta, _ = load_checkpoint(out)
    assert meta.ood is not None and meta.ood.groups == ["all"]
    # The first (4 channels) and the last encoder block (8), mean and std of each: 24 features.
    assert meta.ood.layers == ["down.0", "down.1"] and meta.ood.blocks == [4, 4, 8, 8] and meta.ood.dim == 24
    assert (meta.ood.n_fit, meta.ood.n_calibration) == (6, 2)
    assert "first and last U-Net encoder block" in meta.ood.features
    validation = [tmp_path / "data" / "images" / f"{stem}.png" for stem in meta.extra["split"]["val"]]
    threshold, rule = tolerance_threshold(scores_of(out, validation), 95.0)
    assert meta.ood.threshold == pytest.approx(threshold, rel=1e-6) and rule == meta.ood.threshold_rule
