"""`medserve train classify`: a short run learns, writes a complete checkpoint, history and curves, and resumes."""

from __future__ import annotations

import json
import logging
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoint import load_checkpoint, load_model
from models.classifier import probabilities
from models.imageio import read_image_file
from models.preprocessing import prepare
from tests.training.helpers import train_argv
from training.classification.metrics import classification_metrics
from training.cli import main


def make_bars(root: Path, n_per_class: int, seed: int) -> Path:
    """A small synthetic set: a bright horizontal vs vertical bar at a random place on noise (32x32 gray)."""
    rng = np.random.default_rng(seed)
    for name in ("horizontal", "vertical"):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = rng.normal(0.4, 0.12, (32, 32))
            pos, half = int(rng.integers(4, 28)), int(rng.integers(1, 3))
            band = slice(pos - half, pos + half + 1)
            if name == "horizontal":
                img[band, :] += rng.uniform(0.25, 0.5)
            else:
                img[:, band] += rng.uniform(0.25, 0.5)
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


COMMON = ["--pretrained", "none", "--img-size", "32", "--device", "cpu", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bars")
    data = make_bars(root / "train", 40, seed=0)
    out = root / "models" / "bars.pt"
    argv = train_argv("classify", data, out, "--backbone", "resnet18", "--head", "fc", "--epochs", "4")
    argv += ["--batch-size", "8", "--lr", "1e-3", "--val-split", "0.25", "--seed", "0", *COMMON]
    assert main(argv) == 0
    return out


def test_short_training_beats_chance_on_held_out_images(trained: Path, tmp_path: Path) -> None:
    test_dir = make_bars(tmp_path / "test", 30, seed=1)
    model, meta = load_model(trained)
    temperature = meta.extra["temperature"]
    images, labels = [], []
    for label, name in enumerate(meta.classes):
        for path in sorted((test_dir / name).glob("*.png")):
            images.append(prepare(read_image_file(path).pixels, meta.preprocessing))
            labels.append(label)
    with torch.no_grad():
        probs = probabilities(model(torch.stack(images)), temperature).numpy()
    metrics = classification_metrics(probs, np.array(labels), meta.classes)
    assert metrics["balanced_accuracy"] >= 0.75, metrics
    assert metrics["auc"] >= 0.85, metrics


def test_checkpoint_metadata_describes_the_model(trained: Path) -> None:
    meta, _ = load_checkpoint(trained)
    assert meta.task == "classification"
    assert meta.architecture.name == "classifier"
    assert meta.architecture.args["backbone"] == "resnet18" and meta.architecture.args["head"] == "fc"
    assert meta.classes == ["horizontal", "vertical"]
    assert meta.preprocessing.resize == "resize" and meta.preprocessing.img_size == (32, 32)
    assert meta.preprocessing.in_channels == 1  # gray PNGs detected
    assert meta.extra["temperature"] > 0
    assert meta.extra["strategy"] == "full" and meta.extra["pretrained"] == "none"
    assert meta.extra["train_data"]["path"] == str((trained.parent.parent / "train").resolve())
    assert meta.extra["train_data"]["n_train"] == 60 and meta.extra["train_data"]["n_val"] == 20
    assert meta.training["epochs"] == 4 and meta.training["balance"] == "loss"
    assert {"val_accuracy", "val_balanced_accuracy", "val_auc", "val_loss", "epoch"} <= set(meta.metrics)
    assert meta.data_fingerprint and meta.version


def test_history_and_learning_curves_are_written(trained: Path) -> None:
    run_dir = trained.with_name("bars-run")
    history = json.loads((run_dir / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2, 3, 4]
    assert all(
        {"train_loss", "val_loss", "val_accuracy", "val_auc", "lr"} <= set(e) for e in history["epochs"]
    )
    assert (run_dir / "learning_curves.png").read_bytes().startswith(b"\x89PNG")
    best_epoch = load_checkpoint(trained)[0].metrics["epoch"]
    best = max(history["epochs"], key=lambda e: (e["val_balanced_accuracy"], -e["val_loss"]))
    assert best_epoch == best["epoch"]


def test_resume_continues_the_run(tmp_path: Path) -> None:
    data = make_bars(tmp_path / "data", 10, seed=2)
    out = tmp_path / "svm.pt"
    argv = train_argv("classify", data, out, "--backbone", "resnet18", "--head", "svm")
    argv += ["--strategy", "partial", "--freeze-stages", "2", "--balance", "sampler", "--batch-size", "4"]
    argv += COMMON
    assert main([*argv, "--epochs", "1"]) == 0
    assert main([*argv, "--epochs", "2", "--resume"]) == 0
    history = json.loads((tmp_path / "svm-run" / "history.json").read_text())["epochs"]
    assert [e["epoch"] for e in history] == [1, 2]
    meta, _ = load_checkpoint(out)
    assert meta.architecture.args["head"] == "svm"
    assert meta.extra["calibration"]["fitted_on"] == "validation images"
    # Changing the architecture while resuming is refused.
    assert main([*argv, "--epochs", "3", "--resume", "--backbone", "resnet34"]) == 2


def test_imagenet_weights_unavailable_is_a_clear_cli_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def refuse(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    data = make_bars(tmp_path / "data", 3, seed=3)
    argv = train_argv("classify", data, tmp_path / "m.pt", "--pretrained", "imagenet")
    with caplog.at_level(logging.ERROR):
        assert main([*argv, "--val-split", "0", "--device", "cpu"]) == 2
    assert "torch-home/hub/checkpoints/resnet18-f37072fd.pth" in caplog.text
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--epochs", "0"], "--epochs"), (["--val-split", "1.5"], "--val-split"), (["--out", "x.pth"], ".pt")],
)
def test_bad_options_are_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, extra: list[str], message: str
) -> None:
    data = make_bars(tmp_path / "data", 3, seed=4)
    argv = train_argv("classify", data, tmp_path / "m.pt", *COMMON, *extra)
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    assert message in caplog.text
