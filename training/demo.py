"""`medserve demo --model-dir DIR`: make sure DIR holds demo models, building them on synthetic data if needed.

Segmentation: when DIR holds no segmentation checkpoint, a small U-Net is trained on dental-X-ray-like phantoms
(``training.segmentation.demo``) and saved as ``DIR/dental.pt``. Classification: likewise, a small classifier on
benign/malignant lesion phantoms (``training.classification.demo``), saved as ``DIR/lesions.pt``. Both train on
``--device``, in a few minutes on a CPU. Existing models are never retrained.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from training.classification.demo import build_demo_classifier
from training.common.checkpoints import find_checkpoints
from training.common.options import add_device_argument
from training.segmentation.demo import build_demo_segmenter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=Path, default=Path("checkpoints"), help="where models live")
    parser.add_argument("--seed", type=int, default=0, help="seed of the phantom data and the training")
    add_device_argument(parser)


def segmentation_demo(model_dir: Path, seed: int, device: str) -> str:
    """Trains ``model_dir/dental.pt`` on phantoms unless a segmentation model exists; returns what it did."""
    started = time.monotonic()
    demo = build_demo_segmenter(model_dir, seed=seed, device=device)
    if demo.trained is None:
        return f"segmentation: found {', '.join(str(p) for p in demo.checkpoints)}; nothing to do"
    dice = demo.trained.best.get("dice", float("nan"))
    return (
        f"segmentation: trained a U-Net on synthetic dental phantoms in {time.monotonic() - started:.0f} s "
        f"({len(demo.trained.history)} epochs, validation Dice {dice:.3f}); wrote {demo.checkpoints[0]}"
    )


def classification_demo(model_dir: Path, seed: int, device: str) -> str:
    """Trains ``model_dir/lesions.pt`` on lesion phantoms unless a classification model exists."""
    found = find_checkpoints(model_dir, "classification")
    if found:
        return f"classification: found {', '.join(str(p) for p in found)}; nothing to do"
    started = time.monotonic()
    path = build_demo_classifier(model_dir, seed=seed, device=device)
    return (
        f"classification: trained a lesion classifier (benign vs malignant phantoms) in "
        f"{time.monotonic() - started:.0f} s; wrote {path}"
    )


# Each demo step takes (model_dir, seed, device) and returns a one-line summary.
DEMOS: list[tuple[str, Callable[[Path, int, str], str]]] = [
    ("segmentation", segmentation_demo),
    ("classification", classification_demo),
]


def main(args: argparse.Namespace) -> int:
    model_dir = Path(args.model_dir)
    for _name, step in DEMOS:
        print(step(model_dir, args.seed, args.device))
    print(f"demo models are in {model_dir}")
    return 0
