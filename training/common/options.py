"""Command-line pieces shared by the training and evaluation commands of both tasks."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Protocol

from models.imageio import DEFAULT_INTENSITY, INTENSITY_POLICIES


class ArgumentContainer(Protocol):
    """An ``argparse`` parser or argument group."""

    def add_argument(self, *args: Any, **kwargs: Any) -> Any: ...


def parse_size(text: str) -> tuple[int, int]:
    """``--img-size``: ``"256"`` -> (256, 256); ``"256x320"`` or ``"256,320"`` -> (256, 320) (height x width)."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from exc
    if len(size) == 1:
        size = (size[0], size[0])
    if len(size) != 2 or min(size) < 16:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW with values >= 16, got {text!r}")
    return size[0], size[1]


def add_device_argument(group: ArgumentContainer) -> None:
    """``--device``: where the model runs."""
    group.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")


def add_intensity_argument(group: ArgumentContainer) -> None:
    """``--intensity``: the policy images are read with, stored in the checkpoint and reapplied when serving."""
    group.add_argument(
        "--intensity",
        choices=sorted(INTENSITY_POLICIES),
        default=DEFAULT_INTENSITY,
        help="how image samples map to [0, 1], stored and reapplied when serving: dicom-window (default: "
        "DICOM VOI LUT/window when present) or ignore-window (DICOM min-max like 16-bit PNG); docs/image-formats.md",
    )


def json_args(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed arguments as JSON values (paths as strings, tuples as lists), for a checkpoint's metadata."""
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key.startswith("_") or callable(value):
            continue
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[key] = value
    return out
