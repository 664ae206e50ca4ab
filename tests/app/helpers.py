"""Tiny deterministic models, checkpoints, images and an in-process client for the service tests."""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from fastapi import FastAPI
from PIL import Image
from torch import nn

from app.main import create_app
from app.settings import Settings
from models.checkpoint import Architecture, CheckpointMetadata, save_checkpoint
from models.preprocessing import Preprocessing
from models.registry import register_architecture

# Gates that the test models wait on in forward(): a test closes one to hold the model busy.
GATES: dict[str, threading.Event] = {}
# Inputs each gated/recording model saw, one list of per-image maxima per forward call.
SEEN: dict[str, list[list[float]]] = {}
# Building a "slow-build" model waits here: lets a test observe the service before its models are loaded.
BUILD_GATE = threading.Event()
SAFETY_S = 60.0  # a gate left closed by a failing test must not hang the suite

PNG = {"content-type": "image/png"}  # headers of a raw-body PNG upload


@contextlib.contextmanager
def open_gate(name: str) -> Iterator[threading.Event]:
    """Registers ``GATES[name]``, open: a test closes it to hold the models gated on it busy. Opened again on
    exit, so that a failing test leaves no model waiting."""
    GATES[name] = gate = threading.Event()
    gate.set()
    try:
        yield gate
    finally:
        gate.set()


class PixelNet(nn.Module):
    """Per-pixel linear classifier: logits_k = w_k * x + b_k (a 1x1 convolution), then dropout.

    With mean 0.5 / std 0.25 preprocessing and ``weights=(-1, 1)``, class 1 wins exactly where the 8-bit pixel
    is >= 128, so tests know the right mask. Each output pixel depends on one input pixel, so results are
    bit-identical however requests are batched or tiled; dropout makes a model left in training mode fail the
    "batched equals alone" test. ``gate``: forward waits for ``GATES[gate]``; ``poison``: forward raises when a
    sample is entirely at the minimum (an all-black image), to test that one bad input fails alone.
    """

    def __init__(
        self,
        weights: Sequence[float] = (-1.0, 1.0),
        biases: Sequence[float] | None = None,
        gate: str | None = None,
        poison: bool = False,
        record: str | None = None,
    ) -> None:
        super().__init__()
        k = len(weights)
        self.conv = nn.Conv2d(1, k, kernel_size=1)
        self.conv.weight = nn.Parameter(torch.tensor(weights, dtype=torch.float32).view(k, 1, 1, 1))
        self.conv.bias = nn.Parameter(torch.tensor(biases or [0.0] * k, dtype=torch.float32))
        self.dropout = nn.Dropout(0.5)
        self.gate = gate
        self.poison = poison
        self.record = record

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.record is not None:
            SEEN.setdefault(self.record, []).append([float(v) for v in x.amax(dim=(1, 2, 3))])
        if self.gate is not None:
            GATES[self.gate].wait(SAFETY_S)
        if self.poison and bool((x.amax(dim=(1, 2, 3)) == x.amin(dim=(1, 2, 3))).any()):
            raise RuntimeError("poisoned input")
        return self.dropout(self.conv(x))


class MeanClassifier(nn.Module):
    """Classifies by mean intensity: logits (B, 2) = (-s * m, s * m), m = mean of the normalised image."""

    def __init__(self, scale: float = 4.0, gate: str | None = None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            GATES[self.gate].wait(SAFETY_S)
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([-self.scale * m, self.scale * m], dim=1)


class SleepyNet(PixelNet):
    """PixelNet whose forward also sleeps ``base + per_item * B + quadratic * B**2`` seconds for a batch of B:
    a model with a known cost per batch size, for the batch-size tuning."""

    def __init__(self, base: float = 0.0, per_item: float = 0.0, quadratic: float = 0.0) -> None:
        super().__init__()
        self.cost = (base, per_item, quadratic)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base, per_item, quadratic = self.cost
        time.sleep(base + per_item * x.shape[0] + quadratic * x.shape[0] ** 2)
        return super().forward(x)


def _slow_build(**kwargs: Any) -> nn.Module:
    BUILD_GATE.wait(SAFETY_S)
    return PixelNet(**kwargs)


register_architecture("test-pixel", lambda **kw: PixelNet(**kw))
register_architecture("test-slow-build", _slow_build)
register_architecture("test-mean-classifier", lambda **kw: MeanClassifier(**kw))
register_architecture("test-sleepy", lambda **kw: SleepyNet(**kw))


def save_pixel_model(
    path: Path,
    *,
    classes: Sequence[str] = ("background", "lesion"),
    weights: Sequence[float] = (-1.0, 1.0),
    biases: Sequence[float] | None = None,
    tile: tuple[int, int] = (16, 16),
    architecture: str = "test-pixel",
    working_size: tuple[int, int] | None = None,
    extra: dict[str, Any] | None = None,
    **args: Any,
) -> CheckpointMetadata:
    """Saves a ``PixelNet`` segmentation checkpoint (1 channel, mean 0.5, std 0.25, tiles of ``tile``).

    ``working_size``: the checkpoint fits every image into it (``resize="fit"``) instead of native tiling.
    """
    if architecture == "test-sleepy":
        arch_args = dict(args)
        model: nn.Module = SleepyNet(**arch_args)
    else:
        arch_args = {"weights": list(weights), "biases": None if biases is None else list(biases), **args}
        model = PixelNet(**arch_args)
    meta = CheckpointMetadata(
        task="segmentation",
        architecture=Architecture(name=architecture, args=arch_args),
        classes=list(classes),
        preprocessing=Preprocessing(
            in_channels=1,
            img_size=tile,
            mean=[0.5],
            std=[0.25],
            resize="fit" if working_size else "tile",
            working_size=working_size,
        ),
        metrics={"dice": 0.9},
        extra=extra or {},
    )
    return save_checkpoint(path, model, meta)


@contextlib.contextmanager
def gated_pixel_model(directory: Path, gate: str) -> Iterator[Path]:
    """Saves ``directory/gated.pt``, a PixelNet whose forward waits for ``GATES[gate]`` (open unless a test
    closes it, see ``open_gate``), and yields ``directory``."""
    with open_gate(gate):
        save_pixel_model(directory / "gated.pt", gate=gate)
        yield directory


def save_unet(path: Path, tile: tuple[int, int] = (32, 32)) -> CheckpointMetadata:
    """Saves a tiny random U-Net (channels 4, 8; batch norm) for shape tests."""
    from models.unet import UNet

    torch.manual_seed(0)
    args: dict[str, Any] = {"in_channels": 1, "out_channels": 2, "channels": [4, 8]}
    meta = CheckpointMetadata(
        task="segmentation",
        architecture=Architecture(name="unet", args=args),
        classes=["background", "lesion"],
        preprocessing=Preprocessing(in_channels=1, img_size=tile),
    )
    return save_checkpoint(path, UNet(**args).eval(), meta)


def save_mean_classifier(path: Path, size: tuple[int, int] = (16, 16), **args: Any) -> CheckpointMetadata:
    meta = CheckpointMetadata(
        task="classification",
        architecture=Architecture(name="test-mean-classifier", args=args),
        classes=["dark", "bright"],
        preprocessing=Preprocessing(in_channels=1, img_size=size, resize="resize", mean=[0.5], std=[0.25]),
        extra={"temperature": 2.0},
    )
    return save_checkpoint(path, MeanClassifier(**args), meta)


def random_image(height: int, width: int, seed: int, channels: int = 1) -> np.ndarray:
    """uint8 noise (H, W) or (H, W, C) avoiding 120..135 so the threshold model has no near-ties."""
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 1 else (height, width, channels)
    values = rng.integers(0, 240, size=shape)
    return np.where(values >= 120, values + 16, values).astype(np.uint8)


def encode_image(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def expected_binary_mask(array: np.ndarray) -> np.ndarray:
    """What PixelNet((-1, 1)) must answer for a gray uint8 image: 255 where the pixel is >= 128."""
    return np.where(array >= 128, 255, 0).astype(np.uint8)


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.asarray(image)


def settings(model_dir: Path, **overrides: Any) -> Settings:
    """Service settings for tests: small thread pool, short delays unless a test says otherwise."""
    # Batch-size tuning off: tests need MAX_BATCH_SIZE as given, whatever the machine's timings. PyTorch eager
    # only (no ONNX export per test model, no extra forward passes at load): tests/app/test_runtimes.py runs
    # the other runtimes. Results written in the job worker's threads: a writer process per in-process service
    # would cost each test a spawn (tests/app/pacs/test_writers.py and the real-process tests run them).
    values: dict[str, Any] = {
        "model_dir": model_dir,
        "decode_workers": 2,
        "max_batch_delay_ms": 20.0,
        "batch_autotune": False,
        "runtime": "torch",
        "jobs_writers": 0,
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def serve(
    config: Settings, *, wait_loaded: bool = True
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """Runs the app's lifespan (startup, then shutdown on exit) and yields it with an in-process client."""
    app = create_app(config)
    async with app.router.lifespan_context(app):
        if wait_loaded:
            await app.state.registry.loaded.wait()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://medserve.test") as client:
            yield app, client


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Polls ``predicate`` on the event loop; fails (instead of hanging) if it never becomes true."""
    for _ in range(int(SAFETY_S / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    """Checks an RFC 9457 problem response and returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == f"/problems/{slug}"
    assert body["status"] == status
    assert body["title"] and body["detail"]
    assert body["instance"].startswith("urn:uuid:")
    assert "Traceback" not in response.text
    return body
