"""The demo classifier: a small CNN trained on the synthetic lesion phantom, so ``/classify`` answers on a fresh
machine without any download.

``build_demo_classifier(model_dir)`` returns the first classification checkpoint already in ``model_dir``; when
there is none it generates the phantom (``training.classification.lesions``: benign = round and smooth,
malignant = irregular and spiculated) under ``model_dir/demo-data/lesions`` and trains a from-scratch ResNet-18
at 64x64 gray (a couple of minutes on two CPU cores), saving ``model_dir/lesions.pt``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from models.checkpoint import SUFFIX
from training.classification import train
from training.classification.lesions import generate_lesion_dataset
from training.common.checkpoints import find_checkpoints

log = logging.getLogger(__name__)

DEMO_NAME = "lesions"


def find_classification_checkpoint(model_dir: Path) -> Path | None:
    """The first (sorted) readable classification checkpoint in ``model_dir``, if any."""
    found = find_checkpoints(model_dir, "classification")
    return found[0] if found else None


def demo_arguments(
    data_dir: Path,
    out: Path,
    *,
    epochs: int = 6,
    img_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
) -> argparse.Namespace:
    """The ``medserve train classify`` arguments of the demo model."""
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    return parser.parse_args(
        [
            "--data", str(data_dir),
            "--out", str(out),
            "--run-dir", str(data_dir.parent / f"{DEMO_NAME}-run"),
            "--backbone", "resnet18",
            "--head", "gap",
            "--pretrained", "none",
            "--in-channels", "1",
            "--img-size", str(img_size),
            "--epochs", str(epochs),
            "--batch-size", "32",
            "--lr", "2e-3",
            "--val-split", "0.2",
            "--seed", str(seed),
            "--device", device,
            "--no-progress",
            "--hflip",
            "--vflip",  # the phantom has no orientation, so flips are free extra data
        ]
    )  # fmt: skip


def build_demo_classifier(
    model_dir: str | Path,
    *,
    n_per_class: int = 250,
    size: int = 64,
    epochs: int = 6,
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    """Returns a classification checkpoint in ``model_dir``, training the lesion demo model if there is none.

    Args:
        model_dir: the service's model folder.
        n_per_class: phantom images per class.
        size: phantom image size (also the model's input size).
        epochs: training epochs.
        seed: seed of the phantom and the training.
        device: where to train (``--device``: auto | cpu | cuda).
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    existing = find_classification_checkpoint(model_dir)
    if existing is not None:
        log.info("classification model present: %s", existing)
        return existing
    data_dir = model_dir / "demo-data" / DEMO_NAME
    if not data_dir.is_dir() or not any(data_dir.rglob("*.png")):
        log.info("generating the lesion phantom (%d images per class) in %s", n_per_class, data_dir)
        generate_lesion_dataset(data_dir, n_per_class, size, seed)
    out = model_dir / f"{DEMO_NAME}{SUFFIX}"
    log.info("training the demo classifier %s (ResNet-18 from scratch, %d epochs, %s)", out, epochs, device)
    args = demo_arguments(data_dir, out, epochs=epochs, img_size=size, seed=seed, device=device)
    result = train.run(args)
    log.info(
        "demo classifier: validation accuracy %.3f in %.0f s",
        result.metadata.metrics.get("val_accuracy", float("nan")) if result.metadata else float("nan"),
        result.seconds,
    )
    return result.checkpoint
