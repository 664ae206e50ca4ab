"""Command lines of the training CLI (``training.cli.main``) for the tests."""

from __future__ import annotations

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


def tolerance_threshold(scores: np.ndarray, percentile: float, confidence: float = 0.9) -> tuple[float, str]:
    """The OOD threshold models.ood should set on these calibration scores, from the definition of a one-sided
    tolerance limit: the smallest k-th order statistic for which P(fewer than k of the n scores fall below the
    distribution's percentile) >= confidence, i.e. P(Binomial(n, p) >= k) <= 1 - confidence; the largest
    score, rule ``maximum``, when no k qualifies."""
    from scipy.stats import binom

    values = np.sort(np.asarray(scores, dtype=np.float64))
    for k in range(1, values.size + 1):
        if binom.sf(k - 1, values.size, percentile / 100.0) <= 1.0 - confidence:
            return float(values[k - 1]), "tolerance"
    return float(values[-1]), "maximum"
