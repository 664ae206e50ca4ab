"""An unloaded version releases its memory: 30 replace cycles of a checkpoint leave the process's memory where the
first cycle left it.

Each cycle writes a new version of a real checkpoint file (a ``PixelNet`` carrying a 4 MiB parameter, so that a
version kept alive by mistake shows plainly), reloads it through the registry (``ModelRegistry.rescan``, what
``POST /admin/models/reload`` and the watcher call), runs a request through the new version, waits until the
version it displaced has drained, stopped and released its memory (``ModelRegistry.drained``), and measures the resident set size (``/proc/self/statm``, after
``gc.collect()``); on CUDA also ``torch.cuda.memory_allocated``. After the 30th cycle both must be within 5% of
their value after the first (``KEEP_VERSIONS=1``: two versions are loaded at every measurement).

The control test runs the same cycles while holding on to every displaced version (what a registry that kept its
old runners in a list would do) and checks that the same measurement then grows past the 5%: the bound can fail.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from app.registry import ModelRegistry, ModelVersion
from models.checkpoint import Architecture, CheckpointMetadata, save_checkpoint
from models.preprocessing import Preprocessing
from models.registry import register_architecture
from tests.app.helpers import PixelNet, settings, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CYCLES = 30
TOLERANCE = 0.05
BALLAST = 1024 * 1024  # float32 values: 4 MiB per loaded version


class BallastNet(PixelNet):
    """``PixelNet`` plus an unused parameter of ``size`` values: a model whose weights weigh something."""

    def __init__(self, size: int = BALLAST, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ballast = nn.Parameter(torch.zeros(size))


register_architecture("test-ballast", lambda **kw: BallastNet(**kw))


def save_version(path: Path, cycle: int) -> str:
    model = BallastNet()
    with torch.no_grad():
        model.ballast.fill_(float(cycle))  # a new version each cycle, every page of it written
    meta = CheckpointMetadata(
        task="segmentation",
        architecture=Architecture(name="test-ballast", args={}),
        classes=["background", "lesion"],
        preprocessing=Preprocessing(in_channels=1, img_size=(16, 16), mean=[0.5], std=[0.25]),
    )
    return save_checkpoint(path, model, meta).version


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(device: torch.device) -> tuple[int, int]:
    gc.collect()
    allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    return resident_bytes(), allocated


async def replace_cycles(model_dir: Path, device: torch.device, kept: list[ModelVersion] | None) -> list[Any]:
    """Runs the cycles; returns (RSS, CUDA allocated) after each. ``kept``: displaced versions are held there."""
    path = model_dir / "big.pt"
    save_version(path, 0)
    config = settings(model_dir, keep_versions=1, model_poll_s=0.0, max_batch_size=2, device=str(device))
    registry = ModelRegistry(config, device)
    await registry.load_all()
    measurements = []
    try:
        for cycle in range(1, CYCLES + 1):
            version = save_version(path, cycle)
            handle = registry.models["big"]
            displaced = handle.versions[-1] if len(handle.versions) > 1 else None
            report = await registry.rescan()
            assert report.replaced == ["big"] and report.versions == {"big": version}
            served = registry.resolve("segmentation", "big")
            outputs = await served.batcher.submit(served.runner.warmup_input())
            assert outputs.shape[0] == 2
            if kept is not None and displaced is not None:
                kept.append(displaced)
            del served, outputs, displaced, handle
            if kept is None:
                await registry.drained()  # stopped, and its memory released
            else:  # a version held here is never released: its drain would wait for that in vain
                await wait_until(lambda: not registry.draining, "the displaced version stops")
            measurements.append(measure(device))
    finally:
        await registry.close()
    return measurements


def growth(first: int, last: int) -> float:
    return (last - first) / first


@pytest.mark.parametrize(
    "device",
    [
        pytest.param("cpu"),
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
            ],
        ),
    ],
)
async def test_30_replace_cycles_leave_memory_within_5_percent_of_the_first(
    tmp_path: Path, device: str
) -> None:
    measurements = await replace_cycles(tmp_path, torch.device(device), kept=None)
    (rss_first, gpu_first), (rss_last, gpu_last) = measurements[0], measurements[-1]
    print(f"RSS after cycle 1: {rss_first / 2**20:.1f} MiB, after cycle {CYCLES}: {rss_last / 2**20:.1f} MiB")
    assert growth(rss_first, rss_last) <= TOLERANCE, [round(m[0] / 2**20, 1) for m in measurements]
    if device == "cuda":
        print(f"CUDA allocated after cycle 1: {gpu_first} B, after cycle {CYCLES}: {gpu_last} B")
        assert gpu_first > 0 and growth(gpu_first, gpu_last) <= TOLERANCE


async def test_the_bound_fails_when_displaced_versions_are_kept(tmp_path: Path) -> None:
    kept: list[ModelVersion] = []
    measurements = await replace_cycles(tmp_path, torch.device("cpu"), kept=kept)
    (rss_first, _), (rss_last, _) = measurements[0], measurements[-1]
    assert len(kept) == CYCLES - 1 and all(not v.batcher.running for v in kept)
    assert growth(rss_first, rss_last) > TOLERANCE, (rss_first, rss_last)
