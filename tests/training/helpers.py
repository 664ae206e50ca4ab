"""Command lines of the training CLI (``training.cli.main``) for the tests."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np

from models.checkpoint import Architecture, CheckpointMetadata, save_checkpoint
from models.preprocessing import Preprocessing
from models.unet import UNet


def train_argv(task: str, data: Path, out: Path, *options: str) -> list[str]:
    """``train TASK --data DATA --out OUT OPTIONS...``"""
    return ["train", task, "--data", str(data), "--out", str(out), *options]


def eval_argv(task: str, model: Path, data: Path, out: Path, *options: str) -> list[str]:
    """``eval TASK --model MODEL --data DATA --out OUT OPTIONS...``"""
    return ["eval", task, "--model", str(model), "--data", str(data), "--out", str(out), *options]


def tiny_unet_args() -> dict[str, Any]:
    """Constructor arguments of a two-level, 4-8 wide U-Net with two classes (a fresh dict per call)."""
    return {"in_channels": 1, "out_channels": 2, "channels": [4, 8], "norm": "batch", "dropout": 0.0}


def save_tiny_unet(
    path: Path,
    task: Literal["segmentation", "classification"] = "segmentation",
    metrics: dict[str, Any] | None = None,
) -> CheckpointMetadata:
    """Saves a ``tiny_unet_args`` U-Net (classes background, tooth; 32x32 gray) as a checkpoint claiming ``task``."""
    args = tiny_unet_args()
    meta = CheckpointMetadata(
        task=task,
        architecture=Architecture(name="unet", args=args),
        classes=["background", "tooth"],
        preprocessing=Preprocessing(in_channels=1, img_size=(32, 32)),
        metrics=metrics or {},
    )
    return save_checkpoint(path, UNet(**args), meta)


def conformal_threshold(scores: np.ndarray, percentile: float) -> tuple[float, str]:
    """The OOD threshold models.ood should set on these calibration scores, from its definition: the k-th
    smallest score, k the smallest integer with k / (n + 1) >= percentile / 100 (exact arithmetic); the
    largest score, rule ``maximum``, when k > n."""
    values = np.sort(np.asarray(scores, dtype=np.float64))
    k = math.ceil(Fraction(values.size + 1) * Fraction(str(percentile)) / 100)
    if k > values.size:
        return float(values[-1]), "maximum"
    return float(values[k - 1]), "conformal"
