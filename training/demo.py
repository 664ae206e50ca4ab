"""`medserve demo --model-dir DIR`: make sure DIR holds demo models, building them on synthetic data if needed.

Segmentation: when DIR holds no segmentation checkpoint, a dental-X-ray-like phantom set is generated with
``training.synthetic`` and a small U-Net is trained on it on the CPU in a few minutes (bounded by a time
limit), then saved as ``DIR/dental.pt``. Existing models are never retrained.

Classification: likewise, a benign/malignant lesion phantom set (``training.lesions``) and a small classifier,
saved as ``DIR/lesions.pt``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from models.checkpoint import CheckpointError, load_checkpoint
from training import train_segment
from training.synthetic import generate_dental

log = logging.getLogger(__name__)

# The demo U-Net: small enough to train in about two minutes on a 2-core CPU, accurate on the phantom.
DEMO_IMAGES = 48
DEMO_SIZE = 192
DEMO_TRAIN_ARGS = [
    "--epochs", "8",
    "--img-size", "128",
    "--batch-size", "8",
    "--channels", "16,32,64,128",
    "--lr", "3e-3",
    "--samples-per-epoch", "96",
    "--val-split", "0.15",
    "--time-limit", "150",
]  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=Path, default=Path("checkpoints"), help="where models live")
    parser.add_argument("--seed", type=int, default=0, help="seed of the phantom data and the training")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")


def existing_models(model_dir: Path, task: str) -> list[Path]:
    """Checkpoints in ``model_dir`` whose metadata says ``task`` (unreadable files are skipped)."""
    found = []
    for path in sorted(model_dir.glob("*.pt")):
        try:
            meta, _ = load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("ignoring %s: %s", path, exc)
            continue
        if meta.task == task:
            found.append(path)
    return found


def segmentation_demo(model_dir: Path, seed: int, device: str) -> str:
    """Trains ``model_dir/dental.pt`` on phantoms unless a segmentation model exists; returns what it did."""
    found = existing_models(model_dir, "segmentation")
    if found:
        return f"segmentation: found {', '.join(str(p) for p in found)}; nothing to do"
    started = time.monotonic()
    target = model_dir / "dental.pt"
    with tempfile.TemporaryDirectory(prefix="medserve-demo-") as tmp:
        data_dir = Path(tmp) / "dental"
        generate_dental(data_dir, DEMO_IMAGES, DEMO_SIZE, seed)
        print(
            f"segmentation: generated {DEMO_IMAGES} dental phantoms ({DEMO_SIZE}x{DEMO_SIZE}); training a U-Net"
        )
        parser = argparse.ArgumentParser()
        train_segment.add_arguments(parser)
        args = parser.parse_args(
            [
                "--data", str(data_dir),
                "--out", str(Path(tmp) / "model" / "dental.pt"),
                "--seed", str(seed),
                "--device", device,
                *DEMO_TRAIN_ARGS,
            ]
        )  # fmt: skip
        result = train_segment.run(args)
        model_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result.checkpoint, target)
    dice = result.best.get("dice", float("nan"))
    return (
        f"segmentation: trained a U-Net on synthetic dental phantoms in {time.monotonic() - started:.0f} s "
        f"({len(result.history)} epochs, validation Dice {dice:.3f}); wrote {target}"
    )


def classification_demo(model_dir: Path, seed: int, device: str) -> str:
    """Trains ``model_dir/lesions.pt`` on lesion phantoms unless a classification model exists."""
    from training.demo_classify import build_demo_classifier

    found = existing_models(model_dir, "classification")
    if found:
        return f"classification: found {', '.join(str(p) for p in found)}; nothing to do"
    started = time.monotonic()
    path = build_demo_classifier(model_dir, seed=seed)
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
