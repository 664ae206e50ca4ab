"""The demo segmentation model: a small U-Net trained on synthetic dental phantoms, so ``/segment`` answers on a
fresh machine without any download.

``build_demo_segmenter(model_dir)`` returns the segmentation checkpoints already in ``model_dir``; when there is
none it generates a dental-X-ray-like phantom set (``training.segmentation.synthetic``) in a temporary folder and
trains a small U-Net on it in a few minutes (bounded by a time limit), saving ``model_dir/dental.pt``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from training.common.checkpoints import find_checkpoints
from training.common.run import TrainResult
from training.segmentation import train
from training.segmentation.synthetic import generate_dental

log = logging.getLogger(__name__)

# The demo U-Net: small enough to train in about two minutes on a 2-core CPU, accurate on the phantom.
DEMO_NAME = "dental"
# 120 phantoms, half held out: 60 to train on and 60 validation images, which also set the OOD threshold
# (models.ood's conformal rule needs 19 at the 95th percentile, and a threshold from 20 still varies by a few
# percent of flagged images from one draw to the next; the demo once held out 7 of 48).
DEMO_IMAGES = 120
DEMO_SIZE = 192
DEMO_TRAIN_ARGS = [
    "--epochs", "8",
    "--img-size", "128",
    "--batch-size", "8",
    "--channels", "16,32,64,128",
    "--lr", "3e-3",
    "--samples-per-epoch", "96",
    "--val-split", "0.5",
    "--time-limit", "150",
]  # fmt: skip


@dataclass
class DemoSegmenter:
    """``build_demo_segmenter``'s answer: the checkpoints, and the training run when one was needed."""

    checkpoints: list[Path]
    trained: TrainResult | None = None


def demo_arguments(data_dir: Path, out: Path, *, seed: int = 0, device: str = "auto") -> argparse.Namespace:
    """The ``medserve train segment`` arguments of the demo model."""
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    return parser.parse_args(
        [
            "--data",
            str(data_dir),
            "--out",
            str(out),
            "--seed",
            str(seed),
            "--device",
            device,
            *DEMO_TRAIN_ARGS,
        ]
    )


def build_demo_segmenter(model_dir: str | Path, *, seed: int = 0, device: str = "auto") -> DemoSegmenter:
    """The segmentation checkpoints in ``model_dir``, training ``model_dir/dental.pt`` if there are none.

    Args:
        model_dir: the service's model folder.
        seed: seed of the phantom and the training.
        device: where to train (``--device``: auto | cpu | cuda).
    """
    model_dir = Path(model_dir)
    found = find_checkpoints(model_dir, "segmentation")
    if found:
        return DemoSegmenter(found)
    target = model_dir / f"{DEMO_NAME}.pt"
    with tempfile.TemporaryDirectory(prefix="medserve-demo-") as tmp:
        data_dir = Path(tmp) / DEMO_NAME
        generate_dental(data_dir, DEMO_IMAGES, DEMO_SIZE, seed)
        print(
            f"segmentation: generated {DEMO_IMAGES} dental phantoms ({DEMO_SIZE}x{DEMO_SIZE}); training a U-Net"
        )
        result = train.run(
            demo_arguments(data_dir, Path(tmp) / "model" / target.name, seed=seed, device=device)
        )
        model_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result.checkpoint, target)
    return DemoSegmenter([target], result)
