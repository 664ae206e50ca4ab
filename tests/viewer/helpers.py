"""Checkpoints a real ``medserve serve`` process can load (built-in architectures only), the process itself and
a headless Chromium driven by Playwright, for the viewer's browser tests."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.checkpoint import Architecture, CheckpointMetadata, save_checkpoint
from models.ood import OODStatistics
from models.preprocessing import Preprocessing
from models.unet import UNet
from tests.components import missing
from tests.deploy.helpers import ROOT, Service, free_port, start, wait_for_status

CHROMIUM = "/usr/bin/chromium"
KEY = "viewer-test-key-0123456789"
ADMIN_KEY = "viewer-admin-key-0123456789"  # a key with the admin scope only

# The threshold U-Net's classes and the 8-bit grey levels between them: a pixel of value v is class 0 below
# 70.5, class 1 up to 140.5, class 2 above (half-integer bounds: no pixel is ever on a boundary).
THRESHOLD_CLASSES = ("background", "bone", "tooth")
THRESHOLDS = (70.5, 140.5)


def _convolutions(block: nn.Module) -> list[nn.Conv2d]:
    return [layer for layer in block.modules() if isinstance(layer, nn.Conv2d)]


def _bias(layer: nn.Conv2d) -> torch.Tensor:
    assert layer.bias is not None
    return layer.bias


def threshold_unet() -> UNet:
    """A real ``UNet`` (two levels, no normalisation) whose weights make it a per-pixel threshold classifier.

    The first block passes ``f = x + 2`` on (x: the normalised pixel, mean 0.5, std 0.25, so f = 4 v / 255 for
    an 8-bit value v, never negative) through its centre taps; the deeper level and the up-convolution are zero;
    the last block passes the skip's ``f`` on; the head scores class k as ``k * f - sum(t_1..t_k)``, so the
    arg-max is the number of thresholds ``t`` (in f units) below f. Every output pixel depends on its own input
    pixel only: the mask is known exactly, whatever the tiling.
    """
    model = UNet(in_channels=1, out_channels=len(THRESHOLD_CLASSES), channels=(2, 4), norm="none")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        first = _convolutions(model.down[0])
        first[0].weight[0, 0, 1, 1] = 1.0
        _bias(first[0])[0] = 2.0
        first[1].weight[0, 0, 1, 1] = 1.0
        last = _convolutions(model.up[0])
        last[0].weight[0, 0, 1, 1] = 1.0  # channel 0 of the concatenation is the skip's channel 0
        last[1].weight[0, 0, 1, 1] = 1.0
        bounds = [4.0 * t / 255.0 for t in THRESHOLDS]
        for k in range(len(THRESHOLD_CLASSES)):
            model.head.weight[k, 0, 0, 0] = float(k)
            _bias(model.head)[k] = -float(sum(bounds[:k]))
    return model.eval()


def expected_labels(image: np.ndarray) -> np.ndarray:
    """The class index the threshold U-Net gives each pixel of an 8-bit grey image."""
    return np.digitize(image.astype(np.float64), THRESHOLDS).astype(np.uint8)


def ood_statistics(groups: Sequence[str], dim: int, threshold: float) -> OODStatistics:
    """Out-of-distribution statistics whose verdict is known whatever the features: every score is a distance
    (>= 0), so ``threshold=-1`` flags every image and a huge threshold none."""
    return OODStatistics(
        features="test statistics",
        groups=list(groups),
        dim=dim,
        threshold=threshold,
        percentile=95.0,
        n_fit=1,
        n_calibration=1,
        means=torch.zeros(len(groups), dim, dtype=torch.float64),
        precision=torch.eye(dim, dtype=torch.float64),
    )


FLAG_ALL = -1.0
FLAG_NONE = 1e12


def save_threshold_unet(
    path: Path, *, extra: dict[str, Any] | None = None, ood_threshold: float | None = None
) -> CheckpointMetadata:
    model = threshold_unet()
    args: dict[str, Any] = {
        "in_channels": 1,
        "out_channels": len(THRESHOLD_CLASSES),
        "channels": [2, 4],
        "norm": "none",
    }
    meta = CheckpointMetadata(
        task="segmentation",
        architecture=Architecture(name="unet", args=args),
        classes=list(THRESHOLD_CLASSES),
        preprocessing=Preprocessing(in_channels=1, img_size=(64, 64)),
        metrics={"dice": 1.0},
        extra=extra or {},
        # The U-Net's OOD feature is its pooled bottleneck: 4 channels here.
        ood=None if ood_threshold is None else ood_statistics(["all"], 4, ood_threshold),
    )
    return save_checkpoint(path, model, meta)


def save_lesion_classifier(
    path: Path, *, seed: int = 0, ood_threshold: float | None = None
) -> CheckpointMetadata:
    """An untrained ResNet-18 lesion classifier (benign, malignant) on 64x64 grey images: its probabilities
    are arbitrary but well defined, which is all the page needs."""
    from models.classifier import Classifier

    torch.manual_seed(seed)
    net_classes = ["benign", "malignant"]
    net = Classifier(backbone="resnet18", num_classes=2, in_channels=1, head="gap", pretrained="none")
    meta = CheckpointMetadata(
        task="classification",
        architecture=Architecture(name="classifier", args=net.architecture_args()),
        classes=net_classes,
        preprocessing=Preprocessing(in_channels=1, img_size=(64, 64), resize="resize"),
        # ResNet-18's pooled backbone features: 512.
        ood=None if ood_threshold is None else ood_statistics(net_classes, 512, ood_threshold),
    )
    return save_checkpoint(path, net.eval(), meta)


@contextlib.contextmanager
def running_service(model_dir: Path, workdir: Path, env: dict[str, str] | None = None) -> Iterator[Service]:
    """``medserve serve`` (this checkout's code) on a free loopback port, until the block ends."""
    port = free_port()
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "MEDSERVE_TORCH_THREADS": "1",
        "MEDSERVE_DECODE_WORKERS": "2",
        "MEDSERVE_BATCH_AUTOTUNE": "false",
        "MEDSERVE_LOG_FORMAT": "text",
        **(env or {}),
    }
    command = [sys.executable, "-m", "training.cli", "serve", "--model-dir", str(model_dir)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    service = start(command, environment, port, workdir / "service.log", cwd=ROOT)
    try:
        wait_for_status(service, "/health/ready", 200)
        yield service
    finally:
        service.stop()


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright (no browser download); skips (fails in CI) without it."""
    if not Path(CHROMIUM).is_file():
        missing("chromium", f"{CHROMIUM} is not installed (Debian package 'chromium')")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("chromium", "the Python package 'playwright' is not installed")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            yield browser
        finally:
            browser.close()
